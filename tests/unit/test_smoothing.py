"""Which channels of a smoothed activation leave the int8 path (``smoothing.float_channels``)."""

from __future__ import annotations

import numpy as np

from worker.support.smoothing import ChannelStats, float_channels


def stats(high, low=None, rms=1.0) -> ChannelStats:
    high = np.asarray(high, dtype=np.float64)
    low = -np.ones_like(high) if low is None else np.asarray(low, dtype=np.float64)
    return ChannelStats(high, low, np.full_like(high, rms ** 2))


def test_the_fewest_most_extreme_channels_that_bring_the_range_under_the_bound_are_taken():
    high = [3.0] * 60 + [80.0, 40.0, 12.0, 3.0]
    chosen = float_channels(stats(high), np.ones(64), max_steps=20.0, limit=4)
    assert chosen.tolist() == [60, 61]  # without 80 and 40 the range is 12 + 1 = 13 <= 20 x rms 1


def test_an_activation_already_within_the_bound_keeps_every_channel():
    assert float_channels(stats([3.0] * 64), np.ones(64), max_steps=20.0, limit=4).size == 0


def test_the_range_counts_negative_values_and_the_smoothing_scale():
    low = [-1.0] * 63 + [-50.0]
    assert float_channels(stats([1.0] * 64, low), np.ones(64), max_steps=20.0, limit=2).tolist() == [63]
    scale = np.ones(64)
    scale[63] = 10.0  # smoothing already divided that channel by 10: range 5 + 1
    assert float_channels(stats([1.0] * 64, low), scale, max_steps=20.0, limit=2).size == 0


def test_nothing_is_taken_when_the_limit_cannot_reach_the_bound():
    high = [3.0] * 56 + [100.0] * 8
    assert float_channels(stats(high), np.ones(64), max_steps=20.0, limit=2).size == 0


def test_a_single_channel_is_never_taken():
    assert float_channels(stats([100.0]), np.ones(1), max_steps=0.5, limit=1).size == 0
