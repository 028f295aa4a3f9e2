"""The select stage's work: time fp32 and every variant that passed the gate side by side, then choose.

Runs on the job's target pool (``optimize.target``: a worker of that hardware class; see
``shared.pipeline.queue_for``). Every candidate is downloaded and loaded into one process,
with the execution providers this worker gives it (``worker.gpu.Execution``), and timed by
``shared.inference.paired`` on the rows of ``model.samples``: interleaved rounds, each variant's
ratio to fp32 with a confidence interval, stopping as soon as the intervals decide. Every
figure is recorded with the hardware it was measured on (``shared.inference.hardware``).

The timing is not a cached step: it describes this machine now, and a resubmitted job times
again (the variants themselves come from the step cache).
"""

from __future__ import annotations

import functools
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.arrays import load_arrays
from shared.errors import UserInputError
from shared.inference.generation import GENERATION_TASK, apply_generation_gate
from shared.inference.paired import PairedPlan
from shared.jobspec import BASELINE
from shared.settings import Settings
from worker.context import StageContext
from worker.gpu import ENGINE_CACHE, Execution
from worker.plugins import registry
from worker.stages.convert import SAMPLES
from worker.stages.holdout import GATE_ROWS, timing_inputs
from worker.stages.select import Selection, annotate, apply_accuracy_gate, choose, failure
from worker.stages.select_generation import time_generation

LOCK_TIMEOUT_S = 600


@dataclass
class SelectOutcome:
    selection: Selection
    hardware: dict | None
    measurement: dict | None  # shared.inference.paired.measure_paired's result, per-round figures included
    failure: str | None  # the job's error when it must fail


def plan_of(settings: Settings) -> PairedPlan:
    return PairedPlan(runs_per_round=settings.paired_runs_per_round, min_rounds=settings.paired_min_rounds,
                      max_rounds=max(settings.paired_max_rounds, settings.paired_min_rounds),
                      max_seconds=settings.paired_max_seconds, margin=settings.paired_margin,
                      confidence=settings.paired_confidence, warmup=max(settings.bench_warmup, 1),
                      settle_ms=settings.paired_settle_ms)


def run_select(ctx: StageContext, results: list[dict]) -> SelectOutcome:
    optimize = ctx.spec.optimize
    rows = [dict(r) for r in results if "error" not in r]
    errors = [{"variant": r["variant"], "verdict": f"error: {r['error']}"} for r in results if "error" in r]
    apply_accuracy_gate(optimize.gate, rows)
    apply_generation_gate(optimize.gate, rows)  # text-generation: perplexity against fp32's
    timed = [r for r in rows if r["variant"] == BASELINE or r["passed"]]
    measurement = hardware = None
    if any(r["variant"] == BASELINE for r in timed):
        measurement, hardware = time_candidates(ctx, timed)
        annotate(rows, measurement, hardware)
    hardware_class = (hardware or {}).get("class")
    selection = choose(optimize, rows, measurement=measurement, hardware_class=hardware_class,
                       deploying=ctx.spec.deploy is not None)
    selection.table += errors
    failed = failure(optimize, selection, hardware_class)
    if failed and selection.best is not None:  # fp32 would have been deployed, but the job asked for better
        selection.best["verdict"] = "baseline"
    return SelectOutcome(selection, hardware, measurement, failed)


def time_candidates(ctx: StageContext, rows: list[dict]) -> tuple[dict, dict]:
    """Paired timing of the rows' models (fp32 among them) on this worker; rows that cannot run get a
    ``timing_error`` and are left out. UserInputError when fp32 itself cannot run here."""
    from shared.inference.hardware import describe
    from shared.inference.paired import measure_paired
    from shared.inference.runtime import load_session
    from worker.gpu import CUDA_PROVIDERS, gpu_name

    baseline = next(r for r in rows if r["variant"] == BASELINE)
    convert = ctx.load_manifest(baseline["convert_key"])
    if convert is None:
        raise UserInputError(f"convert step {baseline['convert_key'][:12]} has no manifest in {ctx.store.uri}")
    if convert.info.get("task") == GENERATION_TASK:  # decode at batch 1 in ONNX Runtime GenAI, as served
        return time_generation(ctx, rows, convert, plan_of(ctx.settings))
    threads = ctx.settings.bench_threads
    with tempfile.TemporaryDirectory(prefix="modelyard-select-") as tmp:
        samples = load_arrays(ctx.store.get_file(convert.file(SAMPLES), Path(tmp) / SAMPLES), what="samples")
        feeds = timing_inputs(samples, convert.info.get(GATE_ROWS))
        runners = {}
        provider = None
        for row in rows:
            try:
                session = _load(ctx, row, Path(tmp) / row["variant"], threads, load_session)
            except UserInputError as exc:
                if row["variant"] == BASELINE:
                    raise UserInputError(f"select: fp32 cannot run on worker {ctx.worker}: {exc}") from None
                row["timing_error"] = f"cannot be timed on worker {ctx.worker}: {exc}"
                continue
            provider = session.provider if row["variant"] == BASELINE else provider
            # Inference only: the feeds are checked and cast once, outside the timed calls.
            runners[row["variant"]] = functools.partial(session._run, session._prepare(feeds))
        hardware = describe(threads=threads, provider=provider,
                            gpu=gpu_name() if provider in CUDA_PROVIDERS else None)
        lock = ctx.jobs.redis.lock(f"modelyard:bench:{socket.gethostname()}", timeout=LOCK_TIMEOUT_S, sleep=0.2)
        with lock:  # two timings on one host would share its cores; the pairing copes, but each is quicker alone
            measurement = measure_paired(runners, BASELINE, plan_of(ctx.settings))
    return measurement, hardware


def _load(ctx: StageContext, row: dict, folder: Path, threads: int, load_session):
    manifest = ctx.load_manifest(row["step_key"])
    if manifest is None:
        raise UserInputError(f"optimize step {row['step_key'][:12]} has no manifest in {ctx.store.uri}")
    ctx.store.get_files(manifest.files, folder)
    parts = [] if row["variant"] == BASELINE else ctx.spec.optimize.variant(row["variant"]).parts
    execution = Execution.plan(ctx.queue, [registry.optimizer(name) for name in parts], ctx.worker)
    return load_session(folder / manifest.info["model_file"], threads=threads,
                        providers=execution.providers(folder / ENGINE_CACHE))
