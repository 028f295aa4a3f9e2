"""llm: a decoder-only LM from a Hugging Face folder to fp32 and INT4 with modelyard's text-generation path.

    python scripts/bench/llm.py [--quick] [--threads T] [--hidden 1536 --layers 16 --heads 12 --kv-heads 4]
                                [--skip-olive] [--job-layers N]

1. **Speed and size** on a random-initialized Llama built from a config (no download; default
   hidden 1536, 16 layers, 12 heads, 4 KV heads, FFN 4096: 0.41 B parameters, 1.6 GB in fp32)
   with the 512-token byte-level BPE of ``examples/build_tiny_llm.py`` in a 1024-row vocabulary (a
   vocabulary as wide as a layer, 512 here, makes the builder miswire the LM head; modelyard refuses
   such a folder). The token embeddings stay float in INT4 (the builder quantizes the MatMuls): a
   larger ``--vocab`` adds float bytes. fp32 is built as the convert stage builds it
   (``worker.support.genai_builder.build``: the ONNX Runtime GenAI model builder) and INT4 by the
   ``int4`` optimizer plugin with its default params (block 128, RTN, accuracy level 4); wall time
   and the peak RSS of the builder process; then timed as ``modelyard serve`` runs them (ONNX Runtime GenAI, batch
   1) by the select stage's own measurement (``shared.inference.generation_timing``): load time,
   time to first token for a 128-token prompt and decode tokens/s, fp32 and INT4 in one process,
   paired and interleaved; the peak RSS of a child that loads each model and generates once.
2. **Olive** (``olive-ai`` 0.13 in ``bench-results/olive-venv``, set up on first use, with
   onnxruntime-genai 0.13.2: Olive 0.13's ModelBuilder pass needs a module 0.17 removed): the same
   INT4 export by ``olive auto-opt --use_model_builder``, its wall time, size, and agreement with
   modelyard's INT4 (greedy continuation of the prompt, 32 tokens).
3. **Quality** on the tiny trained Llama (``examples/build_tiny_llm.py``: a loss near 1): the
   convert stage's fp32 export, ``int4`` (its default block 128; block 32 with RTN and k-quant) and
   ``int8-weights``,
   scored teacher-forced on its 48 held-out sentences against torch: perplexity and next-token
   agreement (``shared.inference.generation``).
4. ``--job-layers N``: a larger random model (N layers of the same width) through the whole job
   with ``modelyard run`` (convert → fp32 + int4 → paired select → deploy), with the peak RSS of
   the job's process tree and its wall time.

Targets (issue 18): INT4 >= 4x fp32's decode tokens/s at <= 0.16x its bytes; time to first token
no slower than fp32's; on the tiny trained model INT4 perplexity <= 1.10x fp32's and next-token
agreement >= 0.9.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

OLIVE_VENV = common.RESULTS / "olive-venv"
# olive-ai 0.13.0's ModelBuilder pass imports onnxruntime_genai.models.quantized_model, which onnxruntime-genai
# 0.17 removed: its venv keeps 0.13.2 (the newest that has it). It also imports requests without declaring it.
OLIVE_REQUIREMENTS = ["olive-ai==0.13.0", "onnxruntime-genai==0.13.2", "onnx-ir", "torch==2.13.0", "transformers",
                      "onnxruntime", "requests"]


def random_llama(folder: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 vocab: int) -> int:
    """A random-initialized Llama with the example's tokenizer, saved to folder; returns its parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    example = common_example()
    tokenizer = example.train_tokenizer(example.corpus_module().sentences(2000, seed=3), folder)
    config = example.llama_config(vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                  intermediate=intermediate, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                                  context=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def common_example():
    from tests.examples import load

    return load("build_tiny_llm")


def peak_tree_rss(run, *, interval: float = 0.2) -> tuple[float, float, object]:
    """(wall s, peak RSS MB of this process's children and their children, result) of ``run()``."""
    import psutil

    me, peak, done = psutil.Process(), [0.0], threading.Event()

    def poll() -> None:
        while not done.wait(interval):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total / 2**20)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        result = run()
    finally:
        done.set()
        watcher.join()
    return time.perf_counter() - started, peak[0], result


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def olive_cli(report: common.Report) -> Path | None:
    """``olive`` from bench-results/olive-venv (made on first use); None, with the reason noted, if it cannot be."""
    cli = OLIVE_VENV / "bin" / "olive"
    if cli.is_file():
        return cli
    steps = [[sys.executable, "-m", "venv", "--clear", str(OLIVE_VENV)],
             [str(OLIVE_VENV / "bin" / "pip"), "install", "--quiet", *OLIVE_REQUIREMENTS]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            report.notes.append(f"Olive rows skipped: {' '.join(step[:4])} failed: "
                                f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            return None
    return cli if cli.is_file() else None


def greedy(folder: Path, prompt, count: int, threads: int) -> list[int]:
    from worker.support.genai_smoke import greedy_tokens

    return greedy_tokens(folder, prompt, count, threads=threads)


def speed_and_size(args, report: common.Report, work: Path) -> None:
    from shared.inference.generation_timing import measure_generation
    from shared.inference.paired import PairedPlan
    from worker.support.genai_builder import build

    source = work / "random-llama"
    source.mkdir()
    report.log(f"building a random Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
               f"{args.kv_heads} KV heads")
    parameters = random_llama(source, hidden=args.hidden, layers=args.layers, heads=args.heads,
                              kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab)
    report.data["parameters"] = parameters
    folders, builds = {}, {}
    for precision in ("fp32", "int4"):
        out = work / precision
        make = (lambda out=out: build(source, out, precision="fp32")) if precision == "fp32" else (
            lambda out=out: int4_variant(folders["fp32"], source, out))
        wall, rss, _ = peak_tree_rss(make)
        folders[precision], builds[precision] = out, {"build_s": wall, "build_peak_rss_mb": rss}
        report.log(f"{precision}: built in {wall:.0f} s, builder peak RSS {rss:.0f} MB, "
                   f"{folder_bytes(out) / 1e6:.0f} MB")
    prompt = __import__("numpy").random.default_rng(0).integers(2, 500, 128)
    plan = PairedPlan(runs_per_round=args.runs_per_round, min_rounds=args.min_rounds, max_rounds=args.rounds,
                      max_seconds=args.max_seconds)
    result = measure_generation(folders, "fp32", prompt, threads=args.threads, plan=plan)
    report.data["timing"] = result
    fp32, int4 = result["models"]["fp32"], result["models"]["int4"]
    sizes = {name: folder_bytes(folder) for name, folder in folders.items()}
    for name in ("fp32", "int4"):
        figures = result["models"][name]
        report.row(f"{name} ({parameters / 1e9:.2f} B params)", common.mb(sizes[name]),
                   f"{builds[name]['build_s']:.0f} s / {builds[name]['build_peak_rss_mb']:.0f} MB",
                   f"{figures['load_s']:.2f} s", f"{figures['ttft_ms']:.0f} ms", f"{figures['decode_tok_s']:.1f}",
                   f"{figures.get('peak_rss_mb', float('nan')):.0f} MB")
    decode = result["decode"]["ratios"]["int4"]
    ttft = result["ttft"]["ratios"]["int4"]
    report.ratio("int4 decode tokens/s over fp32's (paired)", int4["decode_speedup"], ">= 4",
                 f"ratio interval {decode['low']:.3f}-{decode['high']:.3f}, {decode['rounds']} rounds")
    report.ratio("int4 bytes over fp32's", sizes["int4"] / sizes["fp32"], "<= 0.16")
    report.ratio("int4 time to first token over fp32's (paired)", ttft["ratio"], "<= 1.05",
                 f"verdict: {ttft['verdict']} (interval {ttft['low']:.3f}-{ttft['high']:.3f})")
    report.data["fp32_ttft_ms"], report.data["int4_ttft_ms"] = fp32["ttft_ms"], int4["ttft_ms"]
    if not args.skip_olive:
        olive(args, report, source, folders["fp32"], prompt, work)


def int4_variant(fp32: Path, source: Path, out: Path, **params) -> Path:
    """The ``int4`` optimizer plugin (its default params unless given), as the optimize stage runs it."""
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    if not (fp32 / "hf_source").exists():
        (fp32 / "hf_source").symlink_to(source, target_is_directory=True)  # where the convert stage keeps it
    out.mkdir()
    request = OptimizeRequest(model=fp32 / "model.onnx", workdir=out, samples={}, task="text-generation",
                              inputs=[], outputs=[], params=params)
    return registry.optimizer("int4").optimize(request)


def olive(args, report: common.Report, source: Path, fp32: Path, prompt, work: Path) -> None:
    cli = olive_cli(report)
    if cli is None:
        return
    out = work / "olive"
    command = [str(cli), "auto-opt", "-m", str(source), "-o", str(out), "--device", "cpu", "--provider",
               "CPUExecutionProvider", "--precision", "int4", "--use_model_builder", "--use_ort_genai",
               "--log_level", "3"]
    report.log("olive auto-opt ...")
    try:
        # An empty working folder: Olive turns an argument that names a file there ("int4") into its path.
        (work / "olive-cwd").mkdir()
        wall = common.run_checked(command, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
                                  cwd=work / "olive-cwd")
    except RuntimeError as exc:
        report.notes.append(f"Olive row skipped: {exc}")
        return
    found = sorted(out.rglob("genai_config.json"))
    if not found:
        report.notes.append(f"Olive row skipped: auto-opt wrote no genai_config.json under {out}")
        return
    theirs = found[0].parent
    # Olive's ModelBuilder pass keeps the builder's block size, 32: compare with modelyard's int4 at block 32.
    started = time.perf_counter()
    ours = int4_variant(fp32, source, work / "int4-block32", block_size=32).parent
    ours_wall = time.perf_counter() - started
    count = 32
    a, b = greedy(ours, prompt, count, args.threads), greedy(theirs, prompt, count, args.threads)
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
    report.row("olive auto-opt int4 (block 32)", common.mb(folder_bytes(theirs)), f"{wall:.0f} s", "", "", "", "")
    report.row("modelyard int4, block_size: 32", common.mb(folder_bytes(ours)), f"{ours_wall:.0f} s", "", "", "", "")
    report.notes.append(f"Olive auto-opt (ModelBuilder of onnxruntime-genai 0.13.2, int4) vs modelyard's int4 at "
                        f"block 32 (builder 0.18): greedy continuation of the 128-token prompt agrees on {same:.0%} "
                        f"of {count} tokens; wall {wall:.0f} s vs {ours_wall:.0f} s")
    report.data["olive"] = {"wall_s": wall, "bytes": folder_bytes(theirs), "greedy_agreement": same,
                            "modelyard_wall_s": ours_wall, "modelyard_bytes": folder_bytes(ours)}


def quality(args, report: common.Report, work: Path) -> None:
    from shared.arrays import text_lines
    from shared.inference.generation import generation_fidelity, logits_name, read_genai_config
    from shared.inference.runtime import load_session
    from shared.jobspec import ConvertSpec, ModelSpec
    from shared.settings import Settings
    from worker.support.genai_builder import rebuild_variant
    from worker.support.genai_convert import convert_causal_lm
    from worker.support.plugin_io import ConvertRequest

    report.log("training the tiny Llama (examples/build_tiny_llm.py) ...")
    built = common_example().build(work / "tiny" / "tiny-llm")
    lines = text_lines(built["held_out"], "held-out")
    out = work / "tiny-fp32"
    out.mkdir()
    result = convert_causal_lm(ConvertRequest(
        source=built["folder"], model=ModelSpec(name="tiny", source="tiny", format="hf-transformers",
                                                task="text-generation"),
        convert=ConvertSpec(), workdir=out, settings=Settings(), sample_text=lines))
    reference = result.reference["logits"]
    ids = result.samples["input_ids"]
    variants = {"fp32": out / "model.onnx"}
    for name, precision, options in (("int4 (block 128, rtn)", "int4", {"block_size": 128}),
                                     ("int4 block 32, rtn", "int4", {"block_size": 32}),
                                     ("int4 block 32, k_quant", "int4", {"block_size": 32, "algo_config": "k_quant"}),
                                     ("int8-weights", "int8", {})):
        variants[name] = rebuild_variant(out / "model.onnx", work / "".join(c if c.isalnum() else "-" for c in name),
                                         variant=name,
                                         precision=precision, options=options)
    scores = {}
    for name, model in variants.items():
        config = read_genai_config(model.parent)
        logits = load_session(model, threads=args.threads).run(result.samples)[logits_name(config)]
        scores[name] = generation_fidelity(reference, logits, ids)
    for name, figures in scores.items():
        ratio = figures["perplexity"] / scores["fp32"]["perplexity"]
        report.row(f"tiny trained: {name}", common.mb(folder_bytes(variants[name].parent)), "", "", "", "",
                   f"ppl {figures['perplexity']:.4f} ({ratio:.4f}x fp32), "
                   f"agreement {figures['next_token_agreement']:.4f}")
    int4 = scores["int4 (block 128, rtn)"]
    report.ratio("tiny int4 perplexity over fp32's", int4["perplexity"] / scores["fp32"]["perplexity"], "<= 1.10")
    report.ratio("tiny int4 next-token agreement with torch", int4["next_token_agreement"], ">= 0.9",
                 f"{int4['positions']} held-out positions; training loss {built['loss']:.2f}")
    report.data["quality"] = scores


def whole_job(args, report: common.Report, work: Path) -> None:
    source = work / "job-llama"
    source.mkdir()
    parameters = random_llama(source, hidden=args.hidden, layers=args.job_layers, heads=args.heads,
                              kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab)
    job = work / "job.yaml"
    job.write_text(f"model: {{name: big-llm, source: {source}, format: hf-transformers, task: text-generation}}\n"
                   "convert: {samples: {batch: 2, sequence: 128}}\n"
                   "optimize: {variants: [int4], gate: {perplexity_ratio_max: 2.0, next_token_agreement_min: 0.0}}\n"
                   f"deploy: {{repository: {(work / 'repo').as_uri()}}}\n")
    report.log(f"modelyard run on a {parameters / 1e9:.2f} B model ({parameters * 4 / 1e9:.1f} GB fp32) ...")
    env = {**__import__("os").environ, "MODELYARD_HOME": str(work / "home"), "MODELYARD_SANDBOX_MEMORY_MB": "16384"}
    command = [str(Path(sys.executable).with_name("modelyard")), "run", str(job), "--json"]
    wall, rss, done = peak_tree_rss(lambda: subprocess.run(command, capture_output=True, text=True, env=env))
    try:
        record = __import__("json").loads(done.stdout)
    except ValueError:
        record = {}
    stages = record.get("stages", {})
    report.data["job"] = {"parameters": parameters, "wall_s": wall, "peak_tree_rss_mb": rss,
                          "returncode": done.returncode, "state": record.get("state"), "error": record.get("error"),
                          "stage_seconds": {name: (stage.get("metrics") or {}).get("seconds")
                                            for name, stage in stages.items()},
                          "select": stages.get("select", {}).get("table"), "progress": done.stderr[-4000:]}
    report.row(f"whole job, {parameters / 1e9:.2f} B ({parameters * 4 / 1e9:.1f} GB fp32)", "", f"{wall:.0f} s", "",
               "", "", f"peak RSS of the job's processes {rss / 1024:.1f} GB, exit {done.returncode}")


def main() -> None:
    parser = common.parser(__doc__, reps=(1, 1), threads=2)
    parser.add_argument("--hidden", type=int, default=None, help="width (1536; quick 512)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (16; quick 4)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (12; quick 8)")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="FFN width (4096; quick 1536)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary rows (the tokenizer uses the first 512)")
    parser.add_argument("--rounds", type=int, default=None, help="most paired rounds (12; quick 4)")
    parser.add_argument("--runs-per-round", type=int, default=2)
    parser.add_argument("--min-rounds", type=int, default=3, help="paired rounds before a verdict may stop them")
    parser.add_argument("--max-seconds", type=float, default=None, help="most seconds of paired timing (240; quick 30)")
    parser.add_argument("--skip-speed", action="store_true", help="skip part 1 (and Olive)")
    parser.add_argument("--skip-olive", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--job-layers", type=int, default=0, help="also run a model of N layers through the whole job")
    args = common.resolve(parser.parse_args(), hidden=(1536, 512), layers=(16, 4), heads=(12, 8),
                          intermediate=(4096, 1536),
                          rounds=(12, 4), max_seconds=(240.0, 30.0))
    common.pin_threads(args.threads)
    report = common.Report("llm-job" if args.skip_speed else "llm", args)  # bench-results/<name>.json
    report.table(["model", "size", "build (wall / peak RSS)", "load", "TTFT (128 tokens)", "decode tok/s",
                  "peak RSS / quality"])
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        work = Path(tmp)
        if not args.skip_speed:
            speed_and_size(args, report, work)
        if not args.skip_quality:
            quality(args, report, work)
        if args.job_layers:
            whole_job(args, report, work)
    report.finish()


if __name__ == "__main__":
    main()
