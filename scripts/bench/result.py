"""result: what modelyard's INT8 MiniLM is worth, against fp32, Optimum's INT8 and plain ONNX Runtime, in one run.

    python scripts/bench/result.py [--quick] [--reps ROUNDS] [--runs N] [--threads T] [--skip-optimum]

Converts all-MiniLM-L6-v2 with modelyard's hf-transformers plugin (batch 8 x 128 real-sentence
rows, the torch reference on them) and splits the rows as the optimize stage does (every 4th row
held out for the gate). Then builds, from that same FP32 export:

* **modelyard int8-dynamic**: the plugin with its defaults, called as the optimize stage calls it
  (calibration rows, their reference, the job's gate cosine_min 0.99): accuracy-aware INT8;
* **Optimum avx2 / avx512_vnni**: ``optimum-cli onnxruntime quantize --avx2`` / ``--avx512_vnni``
  (its presets as they come, in bench-results/optimum-venv, made on first use);
* **ORT per-channel**: ``quantize_dynamic(per_channel=True)``, ONNX Runtime's defaults otherwise.

Measured in this process:

* latency: every model timed paired and interleaved with fp32 (``shared.inference.paired``:
  ``--reps`` rounds, each running every model ``--runs`` times in turn, order rotated), so a load
  change hits all alike; the p50 ratio to fp32 is the geometric mean of per-round ratios with its
  confidence interval, and ours against Optimum's comes from the same rounds;
* fidelity: per-token cosine-min of ``last_hidden_state`` against the torch model, on the gate rows
  (held out of calibration by the stage) and on two sets of sentences no step saw: natural
  sentences (``int8_recipe.HELD_OUT``) and generated ones (``examples/build_corpus.py``), each
  converted for its own torch reference.

Targets (issue 17): modelyard's p50 <= 0.75x fp32 on AVX2 without VNNI (<= 0.42x with AVX-512
VNNI or AMX) at held-out cosine-min >= 0.99, and faster and closer than both Optimum presets.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import common

OURS = "modelyard int8-dynamic"
OPTIMUM_PRESETS = ("avx2", "avx512_vnni")


def main() -> None:
    parser = common.parser(__doc__, reps=(12, 5), threads=2)
    parser.add_argument("--runs", type=int, default=None, help="runs of each model per paired round (3; quick 2)")
    parser.add_argument("--skip-optimum", action="store_true", help="leave out the Optimum rows")
    args = common.resolve(parser.parse_args(), runs=(3, 2))
    common.pin_threads(args.threads)
    report = common.Report("result", args)

    import pipeline_inline
    from services import job_yaml, minilm_dir

    from shared.inference.hardware import describe
    from shared.jobspec import parse_job
    from shared.settings import Settings
    from worker.stages.optimize import model_files
    from worker.support.quant_recipes import cpu_isa

    optimum = common.optimum_for(report, args.skip_optimum)
    settings = Settings(bench_threads=args.threads)
    source = minilm_dir()
    spec = parse_job(job_yaml(source=source, variants=["int8-dynamic"], repository=None, batch=8, sequence=128,
                              objective="latency"))
    with tempfile.TemporaryDirectory(prefix="modelyard-result-bench-") as folder:
        tmp = Path(folder)
        report.log("converting MiniLM (fp32 export + torch reference)")
        fp32, converted = pipeline_inline.convert(spec, source, tmp, settings)
        models, build_s = {"fp32": fp32}, {}
        report.log("building modelyard int8-dynamic (the plugin, as the optimize stage calls it)")
        build_s[OURS], models[OURS] = common.timed(
            lambda: pipeline_inline.build_variant(spec, "int8-dynamic", fp32, converted, tmp))
        build_s["ORT per-channel"], models["ORT per-channel"] = common.timed(lambda: _ort_per_channel(fp32, tmp))
        if optimum:
            export = _optimum_input(fp32, source, tmp, model_files)
            for preset in OPTIMUM_PRESETS:
                report.log(f"optimum-cli onnxruntime quantize --{preset}")
                name = f"Optimum {preset}"
                build_s[name], models[name] = common.timed(lambda p=preset: _optimum(optimum, export, tmp, p))
        part = pipeline_inline.holdout(converted)
        held = {"gate rows": (part.gate, part.gate_reference)}
        report.log("converting the held-out sentences (torch reference on each set)")
        held.update(_held_out_sets(spec, source, tmp, settings, quick=args.quick))
        fidelity = _fidelity(models, held, args.threads)
        report.log(f"timing {len(models)} models paired, {args.reps} rounds x {args.runs} runs")
        measured = _paired(models, converted.samples, args)
        sizes = {name: sum(p.stat().st_size for p in model_files(path)) for name, path in models.items()}
        meta = _metadata(models[OURS])

    isa = cpu_isa()
    hardware = describe(threads=args.threads, provider="CPUExecutionProvider")
    _table(report, models, sizes, build_s, measured, fidelity, held)
    _targets(report, measured, fidelity, isa, optimum is not None)
    report.notes.append(f"hardware: {hardware['class']} ({hardware['cpu']}; ISA {' '.join(hardware['isa'])}), "
                        f"{args.threads} intra-op threads, {hardware['runtime']} {hardware['version']}")
    int8 = {key.removeprefix("modelyard.int8."): value for key, value in meta.items()}
    report.notes.append(f"modelyard recipe: {int8.get('weight_type')} weights, reduce_range "
                        f"{int8.get('reduce_range')}, smoothing alpha {int8.get('smooth_alpha')}; float nodes: "
                        f"{int8.get('float_nodes')}; saturation: {int8.get('saturation')}")
    report.notes.append("held-out rows: " + ", ".join(f"{name} {len(next(iter(x.values())))} x 128"
                                                      for name, (x, _) in held.items()))
    report.data = {"paired": measured, "fidelity": fidelity, "sizes": sizes, "build_s": build_s,
                   "hardware": hardware, "int8_metadata": meta}
    report.finish()


def _ort_per_channel(fp32: Path, tmp: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tmp / "ort-per-channel" / "model.onnx"
    target.parent.mkdir()
    quantize_dynamic(str(fp32), str(target), per_channel=True, weight_type=QuantType.QInt8)
    return target


def _optimum_input(fp32: Path, source: Path, tmp: Path, model_files) -> Path:
    """The same FP32 export, laid out as Optimum expects it (model.onnx + config.json)."""
    export = tmp / "optimum-in"
    export.mkdir()
    for path in model_files(fp32):
        shutil.copy2(path, export / ("model.onnx" if path == fp32 else path.name))
    shutil.copy2(source / "config.json", export / "config.json")
    return export


def _optimum(cli: Path, export: Path, tmp: Path, preset: str) -> Path:
    out = tmp / f"optimum-{preset}"
    common.run_checked([str(cli), "onnxruntime", "quantize", f"--{preset}", "--onnx_model", str(export),
                        "-o", str(out)])
    found = sorted(out.glob("*.onnx"))
    if len(found) != 1:
        raise RuntimeError(f"optimum quantize --{preset} wrote {found}, expected one .onnx file")
    return found[0]


def _held_out_sets(spec, source: Path, tmp: Path, settings, *, quick: bool) -> dict:
    """Sentences no step saw, converted with the same converter (rows of 128 tokens, torch reference)."""
    from int8_recipe import HELD_OUT

    from tests.data_gen import sentences
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    sets = {"natural sentences": list(HELD_OUT), "generated sentences": sentences(80 if quick else 200, seed=11)}
    converted = {}
    for name, lines in sets.items():
        workdir = tmp / f"held-{name.split()[0]}"
        workdir.mkdir()
        result = registry.converters[spec.model.format]().convert(ConvertRequest(
            source=source, model=spec.model, convert=spec.convert, workdir=workdir, settings=settings,
            sample_text=lines))
        converted[name] = (result.samples, result.reference)
    return converted


def _fidelity(models: dict[str, Path], held: dict, threads: int) -> dict[str, dict[str, float]]:
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session

    result = {}
    for name, path in models.items():
        session = load_session(path, threads=threads)
        result[name] = {part: compare(reference, session.run(samples))["cosine_min"]
                        for part, (samples, reference) in held.items()}
    return result


def _paired(models: dict[str, Path], samples: dict, args) -> dict:
    import functools

    from shared.inference.paired import PairedPlan, measure_paired
    from shared.inference.runtime import load_session

    runners = {}
    for name, path in models.items():
        session = load_session(path, threads=args.threads)
        runners[name] = functools.partial(session._run, session._prepare(samples))
    plan = PairedPlan(runs_per_round=args.runs, min_rounds=args.reps, max_rounds=args.reps, max_seconds=3600)
    started = time.perf_counter()
    measured = measure_paired(runners, "fp32", plan)
    measured["wall_s"] = round(time.perf_counter() - started, 1)
    return measured


def _metadata(model: Path) -> dict[str, str]:
    from worker.support.onnx_files import metadata

    return {key: value for key, value in metadata(model).items() if key.startswith("modelyard.int8.")}


def _table(report, models, sizes, build_s, measured, fidelity, held) -> None:
    report.table(["model", "size MB", "build s", "p50 ms", "p50 / fp32 (95% interval)", "verdict",
                  *[f"cosine-min, {part}" for part in held]])
    for name in models:
        p50 = measured["models"][name]["p50_ms"]
        if name == "fp32":
            ratio, verdict = "1", "baseline"
        else:
            r = measured["ratios"][name]
            ratio, verdict = f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})", r["verdict"]
        report.row(name, f"{sizes[name] / 1e6:.1f}", f"{build_s[name]:.1f}" if name in build_s else "-", f"{p50:.1f}",
                   ratio, verdict, *[f"{fidelity[name][part]:.4f}" for part in held])


def _targets(report, measured, fidelity, isa, with_optimum: bool) -> None:
    from shared.inference.paired import pairwise

    vnni = isa.x86 and isa.int32_dot_products
    report.ratio(f"{OURS} p50 / fp32 (paired, {isa.label})", measured["ratios"][OURS]["ratio"],
                 "<= 0.42" if vnni else "<= 0.75", _interval(measured["ratios"][OURS]))
    for part in ("natural sentences", "generated sentences", "gate rows"):
        report.ratio(f"{OURS} cosine-min, held-out {part}", fidelity[OURS][part], ">= 0.99")
    if not with_optimum:
        report.ratio(f"{OURS} p50 / Optimum p50", None, "< 1", "Optimum not available")
        return
    for preset in OPTIMUM_PRESETS:
        theirs = f"Optimum {preset}"
        versus = pairwise(measured, OURS, theirs)
        report.ratio(f"{OURS} p50 / {theirs} p50 (same rounds)", versus.ratio, "< 1",
                     f"interval {versus.low:.3f}-{versus.high:.3f}" if versus.low is not None else "")
        worst = min(fidelity[OURS][part] - fidelity[theirs][part]
                    for part in ("natural sentences", "generated sentences"))
        report.ratio(f"{OURS} held-out cosine-min minus {theirs}'s (worse of the two sets)", worst, "> 0")


def _interval(ratio: dict) -> str:
    if ratio.get("low") is None:
        return f"{ratio['rounds']} rounds"
    return f"interval {ratio['low']:.3f}-{ratio['high']:.3f}, {ratio['rounds']} rounds, {ratio['verdict']}"


if __name__ == "__main__":
    main()
