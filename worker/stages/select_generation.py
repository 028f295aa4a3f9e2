"""The select stage's timing for text-generation models: decode speed at batch 1, served as they will be.

Where ``worker.stages.select_measure`` times a tensor model's ``session.run`` on the samples, a
text-generation model is timed in ONNX Runtime GenAI, the runtime ``modelyard serve`` uses
(``shared.inference.generation_timing``): fp32 and every variant that passed the gate, in one
process, paired and interleaved, on a 128-token prompt of the held-out text. The measurement the
selection judges by (``objective: latency``) is decode: the time of 16 greedy tokens at batch 1.
Time to first token, tokens/s, load time and each model's peak RSS go into its row of the table
(``ttft_ms``, ``ttft_ratio``, ``decode_tok_s``, ``decode_speedup``, ``load_s``, ``peak_rss_mb``).
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from shared.arrays import load_arrays
from shared.errors import UserInputError
from shared.inference.generation import input_ids_name, read_genai_config
from shared.inference.paired import PairedPlan
from shared.jobspec import BASELINE
from shared.manifest import Manifest
from worker.context import StageContext
from worker.stages.convert import SAMPLES

LOCK_TIMEOUT_S = 1800
ROW_FIGURES = ("ttft_ms", "ttft_ratio", "decode_tok_s", "decode_speedup", "load_s", "peak_rss_mb", "base_rss_mb")


def time_generation(ctx: StageContext, rows: list[dict], convert: Manifest, plan: PairedPlan) -> tuple[dict, dict]:
    """Paired decode timing of the rows' generation models (fp32 among them): the decode measurement (the
    shape of ``measure_paired``'s, with ``generation``: the full result) and the hardware it ran on."""
    from shared.inference.generation_timing import measure_generation, prompt_of
    from shared.inference.hardware import describe

    threads = ctx.settings.bench_threads
    with tempfile.TemporaryDirectory(prefix="modelyard-select-") as tmp:
        samples = load_arrays(ctx.store.get_file(convert.file(SAMPLES), Path(tmp) / SAMPLES), what="samples")
        folders = {}
        for row in rows:
            manifest = ctx.load_manifest(row["step_key"])
            if manifest is None:
                raise UserInputError(f"optimize step {row['step_key'][:12]} has no manifest in {ctx.store.uri}")
            folders[row["variant"]] = ctx.store.get_files(manifest.files, Path(tmp) / row["variant"])
        config = read_genai_config(folders[BASELINE])
        prompt = prompt_of(samples[input_ids_name(config)])
        lock = ctx.jobs.redis.lock(f"modelyard:bench:{socket.gethostname()}", timeout=LOCK_TIMEOUT_S, sleep=0.2)
        with lock:  # one timing per host at a time
            result = measure_generation(folders, BASELINE, prompt, threads=threads, plan=plan)
    for row in rows:
        figures = result["models"].get(row["variant"], {})
        row.update({name: figures[name] for name in ROW_FIGURES if name in figures})
    measurement = {**result["decode"], "generation": {key: value for key, value in result.items() if key != "decode"}}
    return measurement, describe(threads=threads, provider="CPUExecutionProvider")
