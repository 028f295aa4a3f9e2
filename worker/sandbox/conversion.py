"""One converter call in the sandbox (``boxed.run_boxed``): the request in, the ConvertResult out.

The answer is read as untrusted input (``exchange``), and the workdir is vetted (``output``)
before the stage touches it.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Converter, ConvertRequest, ConvertResult
from worker.sandbox import exchange
from worker.sandbox.boxed import run_boxed
from worker.sandbox.output import check_workdir


def convert_in_sandbox(converter: type[Converter], request: ConvertRequest, *,
                       architecture: dict | None = None) -> tuple[ConvertResult, dict]:
    """Run ``converter.convert(request)`` in a sandbox: its result and the sandbox's figures."""
    data = exchange.convert_request(request, converter=converter.name, architecture=architecture)
    result, record = run_boxed(request.settings, source=Path(request.source), workdir=Path(request.workdir),
                               request=data, write_inputs=lambda io: exchange.write_samples(io, request),
                               read=exchange.read_result)
    check_workdir(Path(request.workdir).resolve(), result.model_file)
    return result, record
