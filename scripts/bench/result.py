"""result: what the deployed model is worth — MiniLM FP32 vs modelyard's INT8 vs Optimum's INT8.

    python scripts/bench/result.py [--quick] [--reps R] [--runs N] [--threads T] [--skip-optimum]

Converts all-MiniLM-L6-v2 with modelyard's hf-transformers plugin (the FP32 ONNX export, plus the
torch reference outputs on batch 8 x sequence 128 real-sentence samples), builds the
``int8-dynamic`` variant with its default parameters and lets the optimize stage's own rule
select (gate cosine_min 0.99, objective latency), and quantizes the *same* FP32 export with
``optimum-cli onnxruntime quantize --avx512_vnni`` (Optimum's defaults, in
bench-results/optimum-venv, made on first use). Then, in this process, for each model:

* size: bytes of the model file(s);
* p50: ``--reps`` rounds (≥ 5), each timing every model in turn (rotating order, ``--runs`` timed
  runs after 3 warm-up runs, ``--threads`` intra-op threads); the figure is the median over
  rounds of each round's p50, with min and max;
* cosine-min: per-token cosine of ``last_hidden_state`` against the torch reference.

Targets: INT8 size ≤ 0.26x FP32, p50 ≤ 0.45x FP32 and ≤ Optimum's, cosine-min ≥ 0.99.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common
from common import Stat


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 5), threads=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per model per round (20; quick 5)")
    parser.add_argument("--skip-optimum", action="store_true", help="leave out the Optimum row")
    args = common.resolve(parser.parse_args(), runs=(20, 5))
    common.pin_threads(args.threads)
    report = common.Report("result", args)

    import pipeline_inline
    from services import job_yaml, minilm_dir

    from shared.inference.fidelity import compare
    from shared.inference.latency import measure
    from shared.inference.runtime import load_session
    from shared.jobspec import parse_job
    from shared.settings import Settings
    from worker.stages.optimize import _model_files, gate_verdict

    optimum = common.optimum_for(report, args.skip_optimum)

    settings = Settings(bench_threads=args.threads, bench_runs=max(args.runs, 3))
    source = minilm_dir()
    spec = parse_job(job_yaml(source=source, variants=["int8-dynamic"], repository=None, batch=8, sequence=128,
                              objective="latency"))
    with tempfile.TemporaryDirectory(prefix="modelyard-result-bench-") as tmp:
        tmp = Path(tmp)
        report.log("converting MiniLM and building int8-dynamic")
        fp32, converted = pipeline_inline.convert(spec, source, tmp, settings)
        int8 = pipeline_inline.build_variant(spec, "int8-dynamic", fp32, converted, tmp)
        rows = []
        for variant, model in (("fp32", fp32), ("int8-dynamic", int8)):
            metrics = pipeline_inline.measure(model, converted, settings)
            passed, reason = gate_verdict(spec.optimize.gate, metrics)
            rows.append({"variant": variant, "step_key": str(model), "size_bytes": metrics["size_bytes"],
                         "passed": passed, "reason": reason})
        selection = pipeline_inline.select_rows(spec, rows, converted, settings)  # timed side by side, as the job
        best, table = selection.best, selection.table
        selected = best["variant"] if best else None
        verdicts = {row["variant"]: row["verdict"] for row in table}
        report.log(f"selected: {selected} ({verdicts})")

        models = {"FP32 (modelyard export)": fp32, "INT8 modelyard (int8-dynamic)": int8}
        if optimum:
            export_dir = tmp / "optimum-in"
            export_dir.mkdir()
            for path in _model_files(fp32):
                shutil.copy2(path, export_dir / ("model.onnx" if path == fp32 else path.name))
            shutil.copy2(source / "config.json", export_dir / "config.json")
            wall = common.run_checked([str(optimum), "onnxruntime", "quantize", "--avx512_vnni", "--onnx_model",
                                       str(export_dir), "-o", str(tmp / "optimum-out")])
            found = sorted((tmp / "optimum-out").glob("*.onnx"))
            if len(found) != 1:
                raise RuntimeError(f"optimum quantize wrote {found}, expected one .onnx file")
            models["INT8 Optimum (--avx512_vnni)"] = found[0]
            report.log(f"optimum quantize: {wall:.1f} s")

        sessions = {name: load_session(path, threads=args.threads) for name, path in models.items()}
        fidelity = {name: compare(converted.reference, s.run(converted.samples)) for name, s in sessions.items()}
        sizes = {name: sum(p.stat().st_size for p in _model_files(path)) for name, path in models.items()}
        p50s: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                p50s[name].append(measure(sessions[name], converted.samples, runs=args.runs, warmup=3)["p50_ms"])
            report.log(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n.split(' (')[0]} {p50s[n][-1]:.1f} ms"
                                                                    for n in names))

    stats = {name: Stat(values) for name, values in p50s.items()}
    base = "FP32 (modelyard export)"
    ours = "INT8 modelyard (int8-dynamic)"
    theirs = "INT8 Optimum (--avx512_vnni)"
    report.table(["model", "size", "size vs FP32", "p50 ms, median (min–max)", "p50 vs FP32",
                  "cosine-min vs torch", "cosine-mean"])
    for name in names:
        report.row(name, common.mb(sizes[name]), f"{sizes[name] / sizes[base]:.3f}", stats[name].show(1),
                   f"{stats[name].median / stats[base].median:.3f}", f"{fidelity[name]['cosine_min']:.4f}",
                   f"{fidelity[name]['cosine_mean']:.4f}")
    report.ratio("INT8 size / FP32", sizes[ours] / sizes[base], "<= 0.26")
    report.ratio("INT8 p50 / FP32 p50", stats[ours].median / stats[base].median, "<= 0.45")
    if optimum:
        report.ratio("INT8 p50 / Optimum INT8 p50", stats[ours].median / stats[theirs].median, "<= 1.0")
    else:
        report.ratio("INT8 p50 / Optimum INT8 p50", None, "<= 1.0", "Optimum not available")
    report.ratio("INT8 cosine-min vs torch", fidelity[ours]["cosine_min"], ">= 0.99",
                 f"Optimum's: {fidelity[theirs]['cosine_min']:.4f}" if optimum else "")
    if selected != "int8-dynamic":
        report.notes.append(f"the selection did not pick int8-dynamic: {verdicts}")
    report.notes.append(f"batch 8 x sequence 128, {args.threads} intra-op threads, {args.reps} rounds x "
                        f"{args.runs} runs; selected variant: {selected}")
    report.data = {"sizes": sizes, "p50_ms": p50s, "fidelity": {k: {m: v for m, v in f.items() if m != "outputs"}
                                                                for k, f in fidelity.items()},
                   "selection": table}
    report.finish()


if __name__ == "__main__":
    main()
