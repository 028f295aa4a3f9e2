"""Paired latency measurement with fake models whose times (and the machine's load) the test controls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.inference.paired import (
    FASTER,
    NO_DIFFERENCE,
    SLOWER,
    Interval,
    PairedPlan,
    decided,
    measure_paired,
    pairwise,
    ratio_interval,
    t_quantile,
    verdict,
)


class Machine:
    """A fake clock and models on it: a model's run takes its base time times the load at that moment."""

    def __init__(self, load=lambda now: 1.0, noise: float = 0.0, seed: int = 0, switch_ms: float = 0.0) -> None:
        self.now = 0.0
        self.load = load
        self.noise = noise
        self.switch_ms = switch_ms  # a run right after another model's takes this much longer
        self.rng = np.random.default_rng(seed)
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def model(self, name: str, ms: float):
        def run() -> None:
            jitter = math.exp(self.rng.normal(0.0, self.noise)) if self.noise else 1.0
            switched = self.switch_ms if self.calls and self.calls[-1] != name else 0.0
            self.now += (ms * jitter + switched) / 1000.0 * self.load(self.now)
            self.calls.append(name)
        return run


def busy_every_other_second(now: float) -> float:
    """A neighbour that takes the machine for a second, leaves it for a second: 3x slower while it runs."""
    return 3.0 if int(now) % 2 else 1.0


def busy_from_one_to_four_seconds(now: float) -> float:
    return 3.0 if 1.0 <= now % 6.0 < 4.0 else 1.0


def test_a_variant_at_0_7x_is_measurably_faster_with_a_tight_interval_although_a_neighbour_triples_the_times():
    machine = Machine(load=busy_from_one_to_four_seconds, noise=0.02)
    runners = {"fp32": machine.model("fp32", 60.0), "int8": machine.model("int8", 42.0)}

    result = measure_paired(runners, "fp32", PairedPlan(), clock=machine.clock)

    int8 = result["ratios"]["int8"]
    assert int8["verdict"] == FASTER
    assert int8["low"] < 0.7 < int8["high"] < 0.75
    assert result["stopped"] == "decided" and result["rounds"] == PairedPlan().min_rounds
    assert max(result["models"]["fp32"]["round_ms"]) > 2.5 * min(result["models"]["fp32"]["round_ms"])


def test_load_that_flips_every_second_within_rounds_still_gives_a_tight_interval():
    machine = Machine(load=busy_every_other_second, noise=0.02)
    runners = {"fp32": machine.model("fp32", 60.0), "int8": machine.model("int8", 42.0)}

    result = measure_paired(runners, "fp32", PairedPlan(), clock=machine.clock)

    assert result["ratios"]["int8"]["verdict"] == FASTER
    assert 0.65 < result["ratios"]["int8"]["low"] < 0.7 < result["ratios"]["int8"]["high"] < 0.75


def test_measured_one_after_the_other_under_the_same_load_the_same_models_would_look_the_other_way_round():
    # what the old per-task timing did: fp32 while the neighbour ran, the variant while it did not
    assert 60.0 * busy_every_other_second(1.5) > 42.0 * busy_every_other_second(0.5)
    assert 60.0 * busy_every_other_second(0.5) < 42.0 * busy_every_other_second(1.5)


def test_a_variant_slower_than_fp32_is_slower():
    machine = Machine(noise=0.02)
    runners = {"fp32": machine.model("fp32", 1.0), "int8": machine.model("int8", 1.25)}

    result = measure_paired(runners, "fp32", clock=machine.clock)

    assert result["ratios"]["int8"]["verdict"] == SLOWER
    assert result["ratios"]["int8"]["low"] > 1


def test_an_identical_copy_is_no_measurable_difference_and_stops_as_soon_as_its_interval_is_within_the_margin():
    machine = Machine(noise=0.01)
    runners = {"fp32": machine.model("fp32", 5.0), "copy": machine.model("copy", 5.0)}

    result = measure_paired(runners, "fp32", PairedPlan(margin=0.03), clock=machine.clock)

    copy = result["ratios"]["copy"]
    assert copy["verdict"] == NO_DIFFERENCE
    assert 0.97 <= copy["low"] and copy["high"] <= 1.03
    assert result["stopped"] == "decided"


def test_two_percent_faster_is_within_the_margin_so_no_measurable_difference():
    machine = Machine(noise=0.002)
    runners = {"fp32": machine.model("fp32", 10.0), "graph": machine.model("graph", 9.8)}

    result = measure_paired(runners, "fp32", PairedPlan(margin=0.03), clock=machine.clock)

    assert result["ratios"]["graph"]["high"] < 1  # it is faster, but by less than the margin
    assert result["ratios"]["graph"]["verdict"] == NO_DIFFERENCE


def test_noise_that_never_decides_stops_at_the_round_cap_with_no_measurable_difference():
    machine = Machine(noise=0.5, seed=3)
    runners = {"fp32": machine.model("fp32", 1.0), "fp16": machine.model("fp16", 1.05)}

    result = measure_paired(runners, "fp32", PairedPlan(runs_per_round=1, max_rounds=8, max_seconds=1e9),
                            clock=machine.clock)

    assert result["stopped"] == "max_rounds" and result["rounds"] == 8
    assert result["ratios"]["fp16"]["verdict"] == NO_DIFFERENCE


def test_slow_models_stop_at_the_time_cap_after_at_least_three_rounds():
    machine = Machine(noise=0.5, seed=1)
    runners = {"fp32": machine.model("fp32", 2000.0), "int8": machine.model("int8", 2000.0)}

    result = measure_paired(runners, "fp32", PairedPlan(runs_per_round=1, max_seconds=10.0), clock=machine.clock)

    assert result["stopped"] == "max_seconds" and result["rounds"] == 3


def test_each_round_rotates_the_order_of_the_models():
    machine = Machine()
    runners = {name: machine.model(name, 10.0) for name in ("fp32", "a", "b")}

    measure_paired(runners, "fp32", PairedPlan(runs_per_round=1, warmup=1, min_rounds=3, max_rounds=3, settle_ms=5),
                   clock=machine.clock)

    turns = machine.calls[3:]  # after one warm-up run each; each turn is a settling run and a timed one
    assert turns[::2] == turns[1::2] == ["fp32", "a", "b", "a", "b", "fp32", "b", "fp32", "a"]


def test_a_turn_is_timed_settled_so_the_cost_of_switching_models_falls_on_neither():
    """The first run after another model is slower (its threads still spin, the caches hold its weights)."""
    for settle_ms, expected in ((30.0, 0.5), (0.0, (20 + 10) / (40 + 10))):
        machine = Machine(switch_ms=10.0)
        runners = {"fp32": machine.model("fp32", 40.0), "int8": machine.model("int8", 20.0)}
        result = measure_paired(runners, "fp32", PairedPlan(runs_per_round=3, settle_ms=settle_ms), clock=machine.clock)
        assert result["models"]["fp32"]["p50_ms"] == pytest.approx(40.0 if settle_ms else 50.0)
        assert result["ratios"]["int8"]["ratio"] == pytest.approx(expected)
    fast = Machine()
    result = measure_paired({"fp32": fast.model("fp32", 4.0), "v": fast.model("v", 50.0)}, "fp32",
                            PairedPlan(settle_ms=30.0), clock=fast.clock)
    assert [result["models"][name]["settle_runs"] for name in ("fp32", "v")] == [8, 1]  # about 30 ms, at least one


def test_a_sub_millisecond_model_runs_several_times_per_turn_so_a_turn_is_not_timer_noise():
    machine = Machine()
    runners = {"fp32": machine.model("fp32", 0.01), "int8": machine.model("int8", 0.02), "big": machine.model("big", 9)}

    result = measure_paired(runners, "fp32", PairedPlan(runs_per_round=3, min_round_ms=6.0), clock=machine.clock)

    assert [result["models"][name]["repeat"] for name in runners] == [200, 100, 1]
    assert result["ratios"]["int8"]["ratio"] == pytest.approx(2.0)


def test_a_load_change_in_the_middle_of_a_round_spoils_one_turn_which_the_median_ignores():
    machine = Machine(load=lambda now: 3.0 if now >= 0.5 else 1.0)
    runners = {"fp32": machine.model("fp32", 100.0), "int8": machine.model("int8", 70.0)}

    result = measure_paired(runners, "fp32", PairedPlan(runs_per_round=3, warmup=1, min_rounds=2, max_rounds=2,
                                                        settle_ms=0), clock=machine.clock)

    # the load arrives during round 1's second turn, between fp32 and int8: that turn's ratio is 2.1
    assert result["ratios"]["int8"]["round_ratios"] == [pytest.approx(0.7), pytest.approx(0.7)]


def test_absolute_p50_and_p95_are_kept_beside_the_ratio():
    machine = Machine()
    result = measure_paired({"fp32": machine.model("fp32", 8.0), "v": machine.model("v", 4.0)}, "fp32",
                            clock=machine.clock)

    assert result["models"]["fp32"]["p50_ms"] == pytest.approx(8.0)
    assert result["models"]["v"]["p95_ms"] == pytest.approx(4.0)
    assert result["ratios"]["v"]["ratio"] == pytest.approx(0.5)


def test_two_variants_compare_with_each_other_over_the_same_rounds():
    machine = Machine(noise=0.01)
    runners = {"fp32": machine.model("fp32", 10.0), "a": machine.model("a", 7.0), "b": machine.model("b", 7.05)}

    result = measure_paired(runners, "fp32", clock=machine.clock)

    assert verdict(pairwise(result, "b", "a"), 0.03) == NO_DIFFERENCE
    assert verdict(pairwise(result, "a", "fp32"), 0.03) == FASTER


def test_the_baseline_must_be_among_the_models():
    with pytest.raises(ValueError, match="baseline"):
        measure_paired({"a": lambda: None}, "fp32")


@pytest.mark.parametrize(("p", "df", "expected"), [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182),
                                                   (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
                                                   (0.95, 5, 2.015), (0.995, 10, 3.169)])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, rel=2e-3)


def test_an_interval_needs_two_rounds_and_decides_nothing_before():
    one = ratio_interval([7.0], [10.0])
    assert one.low is None and one.ratio == pytest.approx(0.7)
    assert not decided(one, 0.03) and verdict(one, 0.03) == NO_DIFFERENCE


def test_an_interval_straddling_one_is_undecided_and_one_inside_the_margin_is_decided():
    assert not decided(Interval(0.99, 0.95, 1.04, 5), 0.03)
    assert decided(Interval(1.0, 0.98, 1.02, 5), 0.03)
    assert verdict(Interval(0.9, 0.85, 0.95, 5), 0.03) == FASTER
    assert verdict(Interval(1.1, 1.05, 1.15, 5), 0.03) == SLOWER


def test_intervals_are_looked_at_on_a_schedule_each_at_a_bonferroni_level():
    from shared.inference.paired import look_confidence, looks

    assert looks(PairedPlan(min_rounds=5, max_rounds=40)) == [5, 8, 12, 18, 27, 40]
    assert look_confidence(PairedPlan(min_rounds=5, max_rounds=40, confidence=0.95)) == pytest.approx(1 - 0.05 / 6)


def test_identical_copies_are_rarely_called_different_although_measuring_stops_early():
    called = 0
    for seed in range(100):
        machine = Machine(noise=0.05, seed=seed)
        result = measure_paired({"fp32": machine.model("fp32", 5.0), "copy": machine.model("copy", 5.0)}, "fp32",
                                PairedPlan(runs_per_round=1), clock=machine.clock)
        called += result["ratios"]["copy"]["verdict"] != NO_DIFFERENCE
    assert called <= 8  # ~3% expected; a 95% interval looked at after every round says so ~20% of the time
