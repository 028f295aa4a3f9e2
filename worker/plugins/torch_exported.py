"""A ``torch.export`` program saved as ``.pt2`` (``torch.export.save``) -> ONNX.

``torch.export.load`` is not safe on an untrusted file in torch 2.13, although the format is
mostly JSON (read in ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/``):

- the sample inputs (``data/sample_inputs/<model>.pt``) go through ``deserialize_torch_artifact``,
  which tries ``torch.load(weights_only=True)`` and, when that fails, *again with
  weights_only=False*: a pickle payload there runs (reproduced: a GLOBAL ``builtins.open``);
- weights and constants marked ``use_pickle`` go through ``torch.load`` with ``weights_only`` off,
  ``opaque_obj_*`` constants through ``pickle.loads``, ``custom_obj_*`` through TorchScript's
  unpickler; legacy-format files keep a pickled state dict;
- ``data/aotinductor/`` holds compiled shared libraries, which ``load_pt2`` loads;
- a node's target is resolved by ``getattr`` from the ``torch`` module (``torch.os.system``
  resolves) and any callable is accepted and called when the program runs;
- symbolic shape expressions are parsed with ``sympy.sympify``, which evaluates its string with
  Python builtins in scope; ``ep.module()`` compiles the ``guards_code`` strings with ``exec``;
- torch reads the zip with its own reader, which may return another copy of a duplicated member
  than a check reading with ``zipfile`` (reproduced: the check read a clean copy, torch the payload).

So the archive is read once, by ``worker.support.zip_check`` (one copy of each name, nothing hidden),
and checked with nothing loaded (``worker.support.pt2_check``): only the members a plain exported
program has; no pickled weights or constants, no AOTInductor code, no legacy files; only tensor
user inputs; every node target a torch ATen/prims operator (or a symbolic-shape helper); every
shape expression and guard within the grammar of ``worker.support.sym_expr``.
``torch.export.load`` is then given a fresh archive written from the checked members, with the
sample inputs emptied: it has no pickle to unpickle at all (and without sample inputs
``ep.module()`` compiles no guard code), and ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set around the
load so that no ``torch.load`` in it can fall back to ``weights_only=False``.

Inputs are the program's own (dim 0 symbolic: ``batch``) unless the job gives ``model.inputs``.
A graph that never reads an input size is traced to ONNX like the other PyTorch formats
(``worker.support.torch_onnx``); one that computes with sizes (a GRU's initial state, an attention
reshape) goes through torch.onnx's dynamo exporter, which keeps those sizes symbolic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.support.pt2_check import check_program
from worker.support.zip_check import open_checked_zip

DYNAMO_MIN_OPSET = 18  # the lowest opset torch.onnx's dynamo exporter writes
_ENVIRONMENT_LOCK = threading.Lock()


class TorchExported(Converter):
    name = "torch-exported"
    targets = ("onnx",)
    tools = ("torch", "onnx", "onnxruntime", "onnxscript")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch

        from worker.support.torch_onnx import convert_module, input_specs, single_file

        label = f"model.source {request.model.source}"
        source = single_file(Path(request.source), label, ".pt2 file", (".pt2",))
        with tempfile.TemporaryDirectory(prefix="modelyard-pt2-") as scratch:
            with open_checked_zip(source, label, max_bytes=request.settings.max_archive_bytes) as archive:
                emptied = check_program(archive, label)
                clean = archive.rewrite(Path(scratch) / "model.pt2", replace=emptied)
            try:
                with weights_only_loads():
                    program = torch.export.load(str(clean))
                module = program.module()
            except UserInputError:
                raise
            except Exception as exc:
                raise UserInputError(f"{label}: torch.export.load cannot load the program: {one_line(exc)}") from None
        for sub in module.modules():
            sub.training = False  # .eval() is refused by exported modules; the graph already fixed the mode
        declared = _declared_inputs(program)
        inputs = _match_inputs(input_specs(request, declared=declared), declared, label)
        if _reads_input_sizes(program):
            return _convert_symbolic(program, module, inputs, request, label)
        _drop_input_constraint_hook(module)
        return convert_module(module, inputs, request, label, preserve_training=True)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block runs with weights_only=True, whatever its caller asks for.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on each call (``torch/serialization.py``), so this
    also closes the ``weights_only=False`` fallback of ``deserialize_torch_artifact``. The
    environment is process-wide: the lock keeps two loads from restoring it under each other.
    """
    with _ENVIRONMENT_LOCK:
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _reads_input_sizes(program) -> bool:
    """Whether the graph computes with input sizes (``aten.sym_size``): the tracer would freeze them."""
    import torch

    return bool(program.graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int))


def _drop_input_constraint_hook(module) -> None:
    """Remove the unlifted module's input-constraint pre-hook, which fails under the JIT tracer.

    Without sample inputs (the loader gets them emptied) ``ep.module()`` checks each call's inputs
    against the program's symbolic shapes in a forward pre-hook; traced, that raises "JIT Tracing
    of SymInts isn't supported". The inputs were matched against the program already
    (``_match_inputs``), and tracing a graph that never reads input sizes is exact.
    """
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]


def _convert_symbolic(program, module, inputs: list[TensorInfo], request: ConvertRequest,
                      label: str) -> ConvertResult:
    """torch.onnx's dynamo exporter on the program itself: its symbolic sizes stay symbolic.

    The JIT tracer (``torch_onnx.export_onnx``) records the sizes a graph reads as constants: a GRU's
    initial state or an attention reshape would then fix the batch. The dynamo exporter writes
    opset 18 or later; symbolic dims are renamed from torch's symbols (``s77``) to the input's
    dim names (``batch``).
    """
    import numpy as np
    import onnx
    import torch

    from shared.inference.runtime import save_onnx
    from worker.support.samples import samples_for
    from worker.support.torch_onnx import run_module

    samples, origin = samples_for(request, inputs)
    output_names, reference = run_module(module, samples, inputs, label)
    args = tuple(torch.from_numpy(np.ascontiguousarray(samples[t.name])) for t in inputs)
    opset = max(request.convert.opset, DYNAMO_MIN_OPSET)
    staging = Path(request.workdir) / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                exported = torch.onnx.export(program, args, input_names=[t.name for t in inputs],
                                             output_names=output_names, opset_version=opset, dynamo=True,
                                             verbose=False)
                exported.save(str(staging / "model.onnx"), external_data=True)
        except Exception as exc:
            raise UserInputError(f"{label}: the program could not be exported to ONNX (opset {opset}): "
                                 f"{one_line(exc)}") from None
        proto = onnx.load(str(staging / "model.onnx"), load_external_data=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outputs = _rename_symbolic_dims(proto, inputs, reference)
    save_onnx(proto, Path(request.workdir) / "model.onnx")
    return ConvertResult(model_file="model.onnx", samples=samples, reference=reference, inputs=inputs,
                         outputs=outputs, extra={"torch": torch.__version__, "samples": origin, "opset": opset,
                                                 "exporter": "torch.onnx dynamo"})


def _rename_symbolic_dims(proto, inputs: list[TensorInfo], reference) -> list[TensorInfo]:
    """Give the graph's symbolic dims the inputs' names; the outputs as TensorInfo."""
    names: dict[str, str] = {}
    by_name = {t.name: t for t in inputs}
    for value in proto.graph.input:
        info = by_name.get(value.name)
        for dim, want in zip(value.type.tensor_type.shape.dim, info.shape if info else []):
            if dim.HasField("dim_param") and isinstance(want, str):
                names.setdefault(dim.dim_param, want)
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    return [
        TensorInfo(value.name, reference[value.name].dtype.name,
                   [d.dim_param if d.HasField("dim_param") else int(d.dim_value)
                    for d in value.type.tensor_type.shape.dim])
        for value in proto.graph.output
    ]


def _declared_inputs(program) -> list[TensorInfo]:
    """The program's user inputs: static dims as ints, symbolic ones named (dim 0: batch)."""
    import torch

    names = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    infos = []
    for name in names:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"the program's input {name} is not a tensor; only tensor inputs are supported")
        shape: list[int | str] = [
            int(dim) if isinstance(dim, int) else ("batch" if i == 0 else f"{name}_dim{i}")
            for i, dim in enumerate(value.shape)
        ]
        infos.append(TensorInfo(name, str(value.dtype).removeprefix("torch."), shape))
    return infos


def _match_inputs(given: list[TensorInfo], declared: list[TensorInfo], label: str) -> list[TensorInfo]:
    """model.inputs (or the samples) checked against the program; returned in the program's order."""
    by_name = {t.name: t for t in given}
    names = [t.name for t in declared]
    if set(by_name) != set(names):
        raise UserInputError(
            f"model.inputs names {', '.join(by_name)} do not match the program's inputs {', '.join(names)}"
        )
    result = []
    for program_input in declared:
        tensor = by_name[program_input.name]
        if len(tensor.shape) != len(program_input.shape):
            raise UserInputError(f"model.inputs: {tensor.name} has {len(tensor.shape)} dimensions, "
                                 f"the program's has {len(program_input.shape)} {program_input.shape}")
        for i, (dim, fixed) in enumerate(zip(tensor.shape, program_input.shape)):
            if isinstance(fixed, int) and dim != fixed:
                raise UserInputError(
                    f"model.inputs: {tensor.name} dimension {i} is {dim!r}, but {label} fixes it at {fixed} "
                    "(export with dynamic_shapes to make it dynamic)"
                )
        result.append(TensorInfo(tensor.name, program_input.dtype, list(tensor.shape)))
    return result
