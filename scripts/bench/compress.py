"""compress: MiniLM teacher vs pruned student vs distilled student vs distilled + INT8.

    python scripts/bench/compress.py [--quick] [--reps R] [--runs N] [--threads T]
                                     [--keep 3] [--epochs 2] [--corpus FILE --samples FILE]

all-MiniLM-L6-v2 as a sentence encoder (task ``sentence-embedding``: mean pooling + L2
normalization, what sentence-transformers' ``encode`` returns). The student is made with the
compress stage's own function (``worker.stages.compress.compress_transformer``): keep ``--keep``
of 6 layers (greedy rule on probe rows), then distill ``--epochs`` epochs on ``--corpus`` (one
sentence per line; default 10,000 generated sentences, ``examples/build_corpus.py``). The pruned
student *before* distillation is the teacher cut to the same layers. Every model is
converted with the hf-transformers plugin on ``--samples`` (default 64 generated sentences that
are not in the corpus), the teacher's outputs being the reference; INT8 is the ``int8-dynamic``
optimizer plugin with its defaults. Then, in this process, for each model:

* parameters (torch), size (ONNX bytes);
* p50: ``--reps`` rounds, each timing every model in turn (``--runs`` timed runs after 3
  warm-up runs, ``--threads`` intra-op threads) on two inputs: the held-out sentences (one per
  row, padded to the longest) and 8 rows x 128 tokens; the figure is the median of the rounds' p50s;
* cosine min / mean of each model's sentence embeddings against the teacher's (torch), on
  the held-out sentences, and on 42 everyday-English sentences of a different kind (the
  converter's built-in sample text), which shows how far the student generalizes past its corpus.

Target (issue "Compress"): the distilled + INT8 student's cosine-min >= 0.95 on the held-out sentences.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
from common import Stat


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 2), threads=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per model per round (20; quick 5)")
    parser.add_argument("--keep", type=int, default=3, help="encoder layers the student keeps (of 6)")
    parser.add_argument("--epochs", type=int, default=None, help="distillation epochs (2; quick 1)")
    parser.add_argument("--corpus", type=Path, help="distillation text, one sentence per line")
    parser.add_argument("--samples", type=Path, help="held-out text the models are compared on, one per line")
    args = common.resolve(parser.parse_args(), runs=(20, 5), epochs=(2, 1))
    common.pin_threads(args.threads)
    report = common.Report("compress", args)

    from services import minilm_dir

    from shared.inference.fidelity import compare
    from shared.inference.latency import measure
    from shared.inference.runtime import load_session
    from shared.jobspec import ConvertSpec, parse_job
    from shared.settings import Settings
    from worker.compress import transformer
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest, OptimizeRequest
    from worker.stages.compress import compress_transformer
    from worker.stages.optimize import _model_files
    from worker.support.transformers_samples import SENTENCES

    teacher_dir = minilm_dir()
    with tempfile.TemporaryDirectory(prefix="modelyard-compress-bench-") as tmp:
        tmp = Path(tmp)
        corpus, samples = _texts(args, tmp)
        spec = parse_job(f"""
model: {{name: minilm, source: '{teacher_dir}', format: hf-transformers, task: sentence-embedding}}
compress:
  prune: {{method: layers, keep: {args.keep}}}
  distill: {{data: '{corpus}', epochs: {args.epochs}, batch_size: 64, lr: 2.0e-4}}
""")
        folders = {"teacher": teacher_dir, "pruned": tmp / "pruned", "distilled": tmp / "distilled"}
        report.log(f"pruning to {args.keep} layers and distilling {args.epochs} epochs")
        seconds, (metrics, _) = common.timed(lambda: compress_transformer(spec, teacher_dir, corpus,
                                                                          folders["distilled"]))
        report.log(f"pruned and distilled in {seconds:.0f} s: {metrics['distill']['history']}")
        pruned = transformer.load(teacher_dir, spec.model.task, "teacher")  # the same layers, not distilled
        transformer.set_layers(pruned, [transformer.encoder_layers(pruned)[1][i]
                                        for i in metrics["pruned"]["kept_layers"]])
        transformer.save(pruned, teacher_dir, folders["pruned"])

        lines = [line.strip() for line in samples.read_text().splitlines() if line.strip()]
        converted, models = {}, {}
        for name, folder in folders.items():
            workdir = tmp / f"onnx-{name}"
            workdir.mkdir()
            texts = (("sentences", lines), ("everyday", SENTENCES), ("8x128", None)) if name == "teacher" else ()
            for inputs, text in texts:  # the teacher's samples and reference outputs for each input set
                converted[inputs] = registry.converter("hf-transformers").convert(ConvertRequest(
                    source=folder, model=spec.model, convert=ConvertSpec(), workdir=workdir, settings=Settings(),
                    sample_text=text))
            if name != "teacher":
                registry.converter("hf-transformers").convert(ConvertRequest(
                    source=folder, model=spec.model, convert=ConvertSpec(), workdir=workdir, settings=Settings(),
                    samples=converted["sentences"].samples))
            models[name] = workdir / converted["sentences"].model_file
        int8_dir = tmp / "int8"
        int8_dir.mkdir()
        base = converted["sentences"]
        models["distilled + INT8"] = registry.optimizer("int8-dynamic").optimize(OptimizeRequest(
            model=models["distilled"], workdir=int8_dir, samples=base.samples, task=spec.model.task,
            inputs=base.inputs, outputs=base.outputs, params={}))

        sessions = {name: load_session(path, threads=args.threads) for name, path in models.items()}
        fidelity = {(name, inputs): compare(converted[inputs].reference, sessions[name].run(converted[inputs].samples))
                    for name in models for inputs in ("sentences", "everyday")}
        sizes = {name: sum(p.stat().st_size for p in _model_files(path)) for name, path in models.items()}
        p50s = {(name, inputs): [] for name in models for inputs in ("sentences", "8x128")}
        names = list(models)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                for inputs in ("sentences", "8x128"):
                    feeds = converted[inputs].samples
                    p50s[(name, inputs)].append(measure(sessions[name], feeds, runs=args.runs, warmup=3)["p50_ms"])
            report.log(f"round {rep + 1}/{args.reps}: " + ", ".join(
                f"{n} {p50s[(n, 'sentences')][-1]:.1f}/{p50s[(n, '8x128')][-1]:.1f} ms" for n in names))

    stats = {key: Stat(values) for key, values in p50s.items()}
    parameters = {"teacher": metrics["parameters"]["teacher"], "pruned": metrics["parameters"]["student"],
                  "distilled": metrics["parameters"]["student"], "distilled + INT8": metrics["parameters"]["student"]}
    rows = len(lines)
    report.table(["model", "parameters (encoder)", "size", f"p50 ms, {rows} sentences", "p50 ms, 8 x 128",
                  "p50 vs teacher", f"cosine min / mean, {rows} held-out sentences",
                  f"cosine min / mean, {len(SENTENCES)} everyday sentences"])
    encoder = {"teacher": metrics["parameters"]["teacher_encoder"]}
    for name in names:
        held, everyday = fidelity[(name, "sentences")], fidelity[(name, "everyday")]
        encoder_m = encoder.get(name, metrics["parameters"]["student_encoder"]) / 1e6
        report.row(name, f"{parameters[name] / 1e6:.1f} M ({encoder_m:.1f} M)",
                   common.mb(sizes[name]), stats[(name, "sentences")].show(1), stats[(name, "8x128")].show(1),
                   f"{stats[(name, '8x128')].median / stats[('teacher', '8x128')].median:.2f}",
                   f"{held['cosine_min']:.4f} / {held['cosine_mean']:.4f}",
                   f"{everyday['cosine_min']:.4f} / {everyday['cosine_mean']:.4f}")
    report.ratio("distilled + INT8 cosine-min vs teacher (held-out sentences)",
                 fidelity[("distilled + INT8", "sentences")]["cosine_min"], ">= 0.95")
    report.ratio("distilled + INT8 p50 / teacher p50 (8 x 128)",
                 stats[("distilled + INT8", "8x128")].median / stats[("teacher", "8x128")].median, "< 1.0")
    distill = metrics["distill"]
    report.notes.append(
        f"keep {args.keep} of 6 layers {metrics['pruned']['kept_layers']}; distilled {args.epochs} epochs on "
        f"{distill['training_rows']} sentences in {seconds:.0f} s; held-out corpus rows (torch): cosine mean "
        f"{distill['before_distillation']['cosine_mean']:.4f} -> {distill['after_distillation']['cosine_mean']:.4f}")
    report.data = {"sizes": sizes, "p50_ms": {f"{k[0]} / {k[1]}": v for k, v in p50s.items()},
                   "fidelity": {f"{k[0]} / {k[1]}": {m: v for m, v in f.items() if m != "outputs"}
                                for k, f in fidelity.items()},
                   "compress": metrics}
    report.finish()


def _texts(args, tmp: Path) -> tuple[Path, Path]:
    """The distillation corpus and the held-out samples: the user's files, or generated ones."""
    if args.corpus and args.samples:
        return args.corpus.resolve(), args.samples.resolve()
    from tests.data_gen import held_out, sentences

    corpus = sentences(10_000 if not args.quick else 3_000, seed=3)
    (tmp / "corpus.txt").write_text("\n".join(corpus) + "\n")
    (tmp / "held-out.txt").write_text("\n".join(held_out(corpus, 64)) + "\n")
    return args.corpus or tmp / "corpus.txt", args.samples or tmp / "held-out.txt"


if __name__ == "__main__":
    main()
