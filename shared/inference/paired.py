"""Paired latency: every model timed in one process, interleaved, each judged by its ratio to a baseline.

Latency measured at different moments on a shared host compares machine states, not models:
the same session measured 148, 161 and 436 ms in three jobs of one afternoon. What stays stable
is the *ratio* of two models timed side by side. So ``measure_paired`` runs rounds: a round runs
the models in turn a few times over (A B C, A B C, A B C), in an order rotated by one each round,
and a variant's ratio for the round is the median over those turns of its time divided by the
baseline's in the same turn: one paired observation per round. Load that comes and goes hits both
sides of a turn alike and cancels in the ratio; a change of load within a round spoils one turn,
which the median ignores.

The ratio's confidence interval is a t-interval on the mean of the per-round log ratios,
exponentiated (ratios multiply, so their logarithms average). Measuring stops as soon as every
interval *decides* (``decided``), or at ``max_rounds`` / ``max_seconds``. A verdict (``verdict``)
is "faster" or "slower" only when the interval says so; an interval that lies within ``± margin``
of 1, or that straddles 1 when measuring stops, is "no measurable difference".

Stopping as soon as an interval excludes 1 is a sequential test: looked at after every round,
a 95% interval calls an identical copy faster or slower in about a fifth of the runs (simulated,
per-round noise 5%). So the intervals are only looked at on a schedule (``looks``: ``min_rounds``,
then about 1.5x more rounds each time, and ``max_rounds``: 5, 8, 12, 18, 27, 40), each at the
Bonferroni level ``1 - (1 - confidence) / looks`` (99.2% for 6 looks): an identical copy is then
called different in about 3% of runs, while a 5% difference is still decided within ~8 rounds.

Each turn starts *settled*: the model first runs untimed for about ``settle_ms`` (at least once).
The first run after another model pays for that model's thread pool still spinning and for the
caches it evicted, which a served model, running after itself, never does. Unsettled, the
alternation charged it to both sides, more to the faster one: MiniLM fp32 vs its INT8 on a
2-core AMX Xeon measured 0.54x alternating every run, 0.46-0.47x settled or run alone.

Plain functions over zero-argument callables and a clock, so that tests drive them with fake
models whose times they control.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

FASTER, SLOWER, NO_DIFFERENCE = "faster", "slower", "no measurable difference"
MAX_REPEAT = 1000

Clock = Callable[[], float]


@dataclass(frozen=True)
class PairedPlan:
    """How long to measure. Defaults suit models from sub-millisecond to ~1 s per run."""

    runs_per_round: int = 3  # runs of one model per round; the round's figure is their median
    min_rounds: int = 5
    max_rounds: int = 40
    max_seconds: float = 60.0  # stop after this long (at least 3 rounds), decided or not
    margin: float = 0.03  # ratios within 1 ± margin count as no measurable difference
    confidence: float = 0.95
    warmup: int = 2
    min_round_ms: float = 5.0  # a fast model runs several times per turn, so a turn is not timer noise
    settle_ms: float = 30.0  # untimed runs before each turn, at least one (0: none); see the module's text


@dataclass(frozen=True)
class Interval:
    """A ratio (geometric mean of per-round ratios) and its confidence interval; no bounds below 2 rounds."""

    ratio: float
    low: float | None
    high: float | None
    rounds: int

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "rounds": self.rounds}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p in (0.5, 1)): exact for 1 and 2 degrees of freedom, else the
    Cornish-Fisher expansion around the normal quantile (within 0.2% of the exact value from df 3)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    terms = ((z**3 + z) / 4,
             (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(term / df ** (power + 1) for power, term in enumerate(terms))


def ratio_interval(times: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Interval:
    """The ratio ``times / baseline`` over paired rounds (same length), with its t-interval."""
    if len(times) != len(baseline) or not len(times):
        raise ValueError("ratio_interval needs two equally long, non-empty series of round times")
    return interval_of(np.asarray(times, dtype=np.float64) / np.asarray(baseline, dtype=np.float64), confidence)


def interval_of(ratios: Sequence[float], confidence: float = 0.95) -> Interval:
    """The geometric mean of per-round ratios and its t-interval (on their logarithms)."""
    if not len(ratios):
        raise ValueError("interval_of needs at least one round")
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    mean = float(logs.mean())
    rounds = len(logs)
    if rounds < 2:
        return Interval(math.exp(mean), None, None, rounds)
    half = t_quantile(0.5 + confidence / 2, rounds - 1) * float(logs.std(ddof=1)) / math.sqrt(rounds)
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), rounds)


def _within_margin(interval: Interval, margin: float) -> bool:
    return interval.low is not None and interval.low >= 1 - margin and interval.high <= 1 + margin


def decided(interval: Interval, margin: float) -> bool:
    """Whether more rounds would be wasted: the interval excludes 1, or lies within 1 ± margin."""
    if interval.low is None:
        return False
    return interval.high < 1 or interval.low > 1 or _within_margin(interval, margin)


def verdict(interval: Interval, margin: float) -> str:
    """FASTER or SLOWER only when the interval excludes 1 and is not within 1 ± margin; else NO_DIFFERENCE."""
    if interval.low is None or _within_margin(interval, margin):
        return NO_DIFFERENCE
    if interval.high < 1:
        return FASTER
    if interval.low > 1:
        return SLOWER
    return NO_DIFFERENCE


def looks(plan: PairedPlan) -> list[int]:
    """The rounds after which the intervals are looked at: min_rounds, ~1.5x more each time, max_rounds."""
    schedule, rounds = [], max(plan.min_rounds, 2)
    while rounds < plan.max_rounds:
        schedule.append(rounds)
        rounds = max(rounds + 1, math.ceil(rounds * 1.5))
    return schedule + [plan.max_rounds]


def look_confidence(plan: PairedPlan) -> float:
    """Each look's confidence, so that all looks together keep ``plan.confidence`` (Bonferroni)."""
    return 1 - (1 - plan.confidence) / len(looks(plan))


def _sample(run: Callable[[], object], repeat: int, clock: Clock) -> float:
    """Milliseconds per run, over ``repeat`` runs back to back."""
    start = clock()
    for _ in range(repeat):
        run()
    return (clock() - start) * 1000.0 / repeat


def measure_paired(runners: Mapping[str, Callable[[], object]], baseline: str, plan: PairedPlan = PairedPlan(),
                   *, clock: Clock = time.perf_counter) -> dict:
    """Time every runner (a zero-argument call running one model once) in interleaved rounds.

    A round runs the models in turn, ``runs_per_round`` times over (A B C, A B C, A B C; the order
    rotated by one each round). A variant's ratio for the round is the median over those turns of
    its time divided by the baseline's time in the same turn, so a change of load in the middle of a
    round spoils one turn, not the round. A model faster than ``min_round_ms / runs_per_round``
    runs several times per turn (``repeat``), timed together.

    Returns plain data::

        {"baseline": name, "rounds": n, "stopped": "decided" | "max_rounds" | "max_seconds", "seconds": s,
         "plan": {...}, "models": {name: {"p50_ms", "p95_ms", "repeat", "round_ms": [...]}},
         "ratios": {variant: {"ratio", "low", "high", "rounds", "verdict", "round_ratios": [...]}}}
    """
    if baseline not in runners:
        raise ValueError(f"the baseline {baseline!r} is not among the models to measure")
    schedule = looks(plan)
    level = look_confidence(plan)
    names = list(runners)
    variants = [name for name in names if name != baseline]
    started = clock()
    repeat, settle = {}, {}
    for name in names:
        repeat[name], settle[name] = _repeat(runners[name], plan, clock)
    samples: dict[str, list[float]] = {name: [] for name in names}
    round_ms: dict[str, list[float]] = {name: [] for name in names}
    round_ratios: dict[str, list[float]] = {name: [] for name in variants}
    stopped = "max_rounds"
    for index in range(plan.max_rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        turns: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(plan.runs_per_round):
            for name in order:
                for _ in range(settle[name]):
                    runners[name]()
                turns[name].append(_sample(runners[name], repeat[name], clock))
        for name in names:
            samples[name].extend(turns[name])
            round_ms[name].append(float(np.median(turns[name])))
        base = np.asarray(turns[baseline])
        for name in variants:
            round_ratios[name].append(float(np.median(np.asarray(turns[name]) / base)))
        done = index + 1
        if done in schedule and all(decided(interval_of(round_ratios[v], level), plan.margin) for v in variants):
            stopped = "decided"
            break
        if clock() - started >= plan.max_seconds and done >= min(3, plan.max_rounds):
            stopped = "max_seconds"
            break
    ratios = {}
    for name in variants:
        interval = interval_of(round_ratios[name], level)
        ratios[name] = {**interval.to_dict(), "verdict": verdict(interval, plan.margin),
                        "round_ratios": [round(r, 5) for r in round_ratios[name]]}
    return {
        "baseline": baseline,
        "rounds": len(round_ms[baseline]),
        "stopped": stopped,
        "seconds": round(clock() - started, 3),
        "plan": {"runs_per_round": plan.runs_per_round, "min_rounds": plan.min_rounds, "max_rounds": plan.max_rounds,
                 "max_seconds": plan.max_seconds, "margin": plan.margin, "confidence": plan.confidence,
                 "looks": schedule, "interval_confidence": level},
        "models": {name: {"p50_ms": float(np.percentile(samples[name], 50)),
                          "p95_ms": float(np.percentile(samples[name], 95)),
                          "repeat": repeat[name], "settle_runs": settle[name],
                          "round_ms": [round(t, 4) for t in round_ms[name]]} for name in names},
        "ratios": ratios,
    }


def _repeat(run: Callable[[], object], plan: PairedPlan, clock: Clock) -> tuple[int, int]:
    """Warm the model up. (runs per turn, untimed runs before a turn): a model faster than
    ``min_round_ms / runs_per_round`` runs that many times per turn; it settles for ``settle_ms``."""
    warm = [_sample(run, 1, clock) for _ in range(max(plan.warmup, 1))]
    single = float(np.median(warm))
    wanted = plan.min_round_ms / plan.runs_per_round
    repeat = int(min(max(1, math.ceil(wanted / single)) if single > 0 else MAX_REPEAT, MAX_REPEAT))
    if plan.settle_ms <= 0:
        return repeat, 0
    return repeat, int(min(max(1, math.ceil(plan.settle_ms / single)) if single > 0 else MAX_REPEAT, MAX_REPEAT))


def pairwise(result: dict, name: str, other: str) -> Interval:
    """The ratio of ``name`` to ``other`` (two variants of one measurement) over the same rounds."""
    models = result["models"]
    return ratio_interval(models[name]["round_ms"], models[other]["round_ms"], result["plan"]["interval_confidence"])
