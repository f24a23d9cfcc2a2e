"""A rollout step that lasts for millions of requests holds a bounded amount of memory: latencies in a fixed-size window
(the p99 is of the most recent ones), outputs in fixed histogram bins, counts as integers."""
import sys

import numpy as np

from mlnb.rollout.plan import Rollout, RolloutPlan, VariantWindow


def test_a_long_step_keeps_a_bounded_window_and_still_judges_latency():
    rollout = Rollout(RolloutPlan(steps=[0.5, 1.0], min_requests=10**9, min_seconds=0))      # never advances: one long step
    rng = np.random.default_rng(0)
    for i in range(60_000):
        rollout.record("champion", 0.001, False, [0.2])
        rollout.record("challenger", 0.001 if i < 30_000 else 0.050, False, [0.3])            # slow for the last half
    for name, window in rollout.windows.items():
        assert len(window.latencies) <= 20_000 and window.latencies.maxlen == 20_000, name
        assert window.requests == 60_000 and window.output_counts.shape == (20,)
    assert rollout.windows["challenger"].p99_ms > 40 > rollout.windows["champion"].p99_ms       # the recent latencies count
    assert sys.getsizeof(rollout.windows["challenger"].latencies) < 400_000


def test_a_fresh_window_is_bounded_from_the_start():
    assert VariantWindow().latencies.maxlen == 20_000
