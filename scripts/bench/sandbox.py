"""sandbox: what the model-load sandbox costs per convert — bubblewrap vs MODELYARD_SANDBOX=off.

    python scripts/bench/sandbox.py [--quick] [--reps R] [--threads T]

Two conversions, each with the convert stage's own call (``worker.sandbox.convert_model``):

* small: a 64→32→10 MLP as an ONNX file (format onnx: validate, copy, reference outputs with
  ONNX Runtime);
* minilm: all-MiniLM-L6-v2 (format hf-transformers: torch load, ONNX export, torch reference on
  batch 2 x sequence 64).

Rounds alternate the two modes (sandbox, off, off, sandbox, ...) so that a busy machine weighs on
both alike. The unsandboxed side is warmed up once before timing, as in a worker process that
already converted a model (torch, transformers and ONNX Runtime imported); a sandboxed convert
always starts a fresh interpreter, which is the cost being measured. Figures: seconds per
convert (median, min–max) and the seconds the sandbox adds (median of the paired differences),
with the sandbox's own figures: time inside the child and peak memory of everything in it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import common
from common import Stat


def small_onnx(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def cases(tmp: Path) -> dict[str, tuple[str, Path]]:
    from services import minilm_dir

    small = small_onnx(tmp / "small" / "model.onnx")
    return {
        "small": (f"model: {{name: small, source: '{small}', format: onnx}}\n"
                  "convert: {to: onnx, samples: {batch: 2}}\n", small),
        "minilm": (f"model: {{name: minilm, source: '{minilm_dir()}', format: hf-transformers, "
                   "task: feature-extraction}\nconvert: {to: onnx, opset: 17, samples: {batch: 2, sequence: 64}}\n",
                   minilm_dir()),
    }


def convert_once(spec, source: Path, tmp: Path, settings) -> tuple[float, dict]:
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest
    from worker.sandbox import convert_model

    out = Path(tempfile.mkdtemp(dir=tmp)) / "out"
    out.mkdir()
    request = ConvertRequest(source=source, model=spec.model, convert=spec.convert, workdir=out, settings=settings)
    seconds, (_, record) = common.timed(lambda: convert_model(registry.converters[spec.model.format], request))
    return seconds, record


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 2), threads=2)
    args = common.resolve(parser.parse_args())
    common.pin_threads(args.threads)
    report = common.Report("sandbox", args)

    from shared.jobspec import parse_job
    from shared.settings import Settings
    from worker.sandbox import sandbox_status

    modes = {"bwrap": Settings(sandbox="bwrap", bench_threads=args.threads),
             "off": Settings(sandbox="off", bench_threads=args.threads)}
    status = sandbox_status(modes["bwrap"])
    if not status.works:
        raise SystemExit(f"the sandbox does not work here: {status.problem}")
    report.log(f"sandbox check: {status.seconds:.2f} s")
    report.table(["model", "sandbox (s)", "off (s)", "added (s)", "ratio", "inside child (s)", "sandbox peak (MB)"])
    with tempfile.TemporaryDirectory(prefix="modelyard-sandbox-bench-") as tmp:
        tmp = Path(tmp)
        for name, (text, source) in cases(tmp).items():
            spec = parse_job(text)
            convert_once(spec, source, tmp, modes["off"])  # warm: the worker process has converted before
            times: dict[str, list[float]] = {"bwrap": [], "off": []}
            inside, peak = [], []
            for rep in range(args.reps):
                for mode in (("bwrap", "off") if rep % 2 == 0 else ("off", "bwrap")):
                    seconds, record = convert_once(spec, source, tmp, modes[mode])
                    times[mode].append(seconds)
                    if mode == "bwrap":
                        inside.append(record["load_s"])
                        peak.append(record["max_rss_mb"])
                report.log(f"{name} round {rep + 1}: sandbox {times['bwrap'][-1]:.2f} s, off {times['off'][-1]:.2f} s")
            added = Stat([b - o for b, o in zip(times["bwrap"], times["off"])])
            sandbox, off = Stat(times["bwrap"]), Stat(times["off"])
            report.row(name, sandbox.show(), off.show(), added.show(), f"{sandbox.median / off.median:.1f}x",
                       f"{statistics.median(inside):.2f}", f"{max(peak):.0f}")
            report.data[name] = {"sandbox": sandbox.to_dict(), "off": off.to_dict(), "added": added.to_dict(),
                                 "inside_child_s": inside, "peak_mb": peak}
    report.notes.append("added = median of per-round (sandbox - off); the off side is a warm worker process")
    report.finish()


if __name__ == "__main__":
    main()
