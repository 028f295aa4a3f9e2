"""sandbox: what the model-load sandbox costs per convert — bubblewrap vs MODELYARD_SANDBOX=off.

    python scripts/bench/sandbox.py [--quick] [--reps R] [--threads T]

Two conversions, each with the convert stage's own call (``worker.sandbox.convert_model``):

* small: a 64→32→10 MLP as an ONNX file (format onnx: validate, copy, reference outputs with
  ONNX Runtime);
* minilm: all-MiniLM-L6-v2 (format hf-transformers: torch load, ONNX export, torch reference on
  batch 2 x sequence 64).

Three modes per round, order alternating (cold, warm, off, then off, warm, cold) so that a busy
machine weighs on all alike: a sandbox started for the convert (cold: a worker's first), the
sandbox a worker process starts after a convert (``worker.sandbox.warm``: frameworks imported
before the model arrives; given ``WARM_UP_S`` first, as between jobs), and no sandbox. The
unsandboxed side is warmed up once before timing, as in a worker process that already converted
a model. Figures: seconds per convert (median, min–max) and the seconds each sandbox adds
(median of the paired differences), with the sandbox's own figures: time inside the child and
peak memory of everything in it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common
from common import Stat

WARM_UP_S = 8  # seconds a warm sandbox is given to import before its convert arrives


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
    from worker.sandbox import sandbox_status, warm

    modes = {"bwrap": Settings(sandbox="bwrap", bench_threads=args.threads),
             "off": Settings(sandbox="off", bench_threads=args.threads)}
    status = sandbox_status(modes["bwrap"])
    if not status.works:
        raise SystemExit(f"the sandbox does not work here: {status.problem}")
    report.log(f"sandbox check: {status.seconds:.2f} s")
    report.table(["model", "cold sandbox (s)", "warm sandbox (s)", "off (s)", "added cold (s)", "added warm (s)",
                  "inside child, cold / warm (s)", "sandbox peak (MB)"])
    with tempfile.TemporaryDirectory(prefix="modelyard-sandbox-bench-") as tmp:
        tmp = Path(tmp)
        for name, (text, source) in cases(tmp).items():
            spec = parse_job(text)
            convert_once(spec, source, tmp, modes["off"])  # warm: the worker process has converted before
            times: dict[str, list[float]] = {"cold": [], "warm": [], "off": []}
            inside: dict[str, list[float]] = {"cold": [], "warm": []}
            peak = []
            for rep in range(args.reps):
                order = ("cold", "warm", "off") if rep % 2 == 0 else ("off", "warm", "cold")
                for mode in order:
                    if mode == "warm":  # a worker between jobs: the next sandbox started, given time to import
                        warm.enable()
                        warm.prestart(modes["bwrap"])
                        time.sleep(WARM_UP_S)
                    seconds, record = convert_once(spec, source, tmp, modes["off" if mode == "off" else "bwrap"])
                    warm.disable()  # the cold side always starts its own sandbox
                    times[mode].append(seconds)
                    if mode != "off":
                        assert record["warm"] == (mode == "warm"), record
                        inside[mode].append(record["load_s"])
                        peak.append(record["max_rss_mb"])
                report.log(f"{name} round {rep + 1}: cold {times['cold'][-1]:.2f} s, warm {times['warm'][-1]:.2f} s, "
                           f"off {times['off'][-1]:.2f} s")
            stats = {mode: Stat(values) for mode, values in times.items()}
            added = {mode: Stat([b - o for b, o in zip(times[mode], times["off"])]) for mode in ("cold", "warm")}
            report.row(name, stats["cold"].show(), stats["warm"].show(), stats["off"].show(), added["cold"].show(),
                       added["warm"].show(),
                       f"{statistics.median(inside['cold']):.2f} / {statistics.median(inside['warm']):.2f}",
                       f"{max(peak):.0f}")
            report.data[name] = {**{mode: stat.to_dict() for mode, stat in stats.items()},
                                 **{f"added_{mode}": stat.to_dict() for mode, stat in added.items()},
                                 "inside_child_s": inside, "peak_mb": peak}
    report.notes.append("added = median of per-round (sandbox - off); the off side is a warm worker process; "
                        f"warm: the sandbox a worker starts after a convert, given {WARM_UP_S} s to import first")
    report.finish()


if __name__ == "__main__":
    main()
