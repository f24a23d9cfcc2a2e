"""Sticky traffic splits and the rollout state machine (the library; the server's routing builds on it)."""
import random

import numpy as np
import pytest

from mlnb.rollout.plan import Rollout, RolloutPlan, Split


class Clock:
    def __init__(self): self.t = 0.0
    def __call__(self): return self.t


@pytest.mark.parametrize("share", [0.05, 0.5])
def test_ten_thousand_keyed_requests_follow_the_weights_and_stick(share):
    split = Split.canary("champion", "challenger", share)
    first = {f"cust-{i}": split.route(f"cust-{i}") for i in range(10_000)}
    observed = sum(v == "challenger" for v in first.values()) / 10_000
    assert abs(observed - share) <= 0.02
    assert all(split.route(k) == v for k, v in first.items())                       # the same key, the same variant
    wider = Split.canary("champion", "challenger", min(1.0, share * 5))
    assert all(wider.route(k) == "challenger" for k, v in first.items() if v == "challenger")   # growing the canary moves no one back


def test_unkeyed_requests_are_split_at_random_by_weight():
    split, rng = Split((("champion", 0.9), ("challenger", 0.1))), random.Random(0)
    share = sum(split.route(None, rng=rng) == "challenger" for _ in range(10_000)) / 10_000
    assert abs(share - 0.1) <= 0.02


def test_bad_splits_and_plans_are_named():
    with pytest.raises(ValueError, match="add up to 1"): Split((("a", 0.7), ("b", 0.2)))
    with pytest.raises(ValueError, match="between 0 and 1"): Split((("a", 1.5), ("b", -0.5)))
    with pytest.raises(ValueError, match="rise from above 0 to 1.0"): RolloutPlan(steps=(0.5, 0.25, 1.0))


def drive(rollout, clock, n, latency=0.001, error=0.0, score=(0.2, 0.1), accuracy=None, seed=0):
    "n requests through the rollout's current split; the control is healthy. Returns the non-hold decisions."
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        variant = rollout.split().route(f"k{i}-{seed}-{clock.t}")
        canary = variant == rollout.canary
        rollout.record(variant, (latency if canary else 0.001) * rng.uniform(0.5, 1.5), canary and rng.random() < error,
                       [float(np.clip(rng.normal(*(score if canary else (0.2, 0.1))), 0, 1))])
        if accuracy is not None: rollout.record_label(variant, rng.random() < (accuracy if canary else 0.8))
        clock.t += 0.05
        d = rollout.evaluate()
        if d.action != "hold": out.append(d)
        if d.action in ("rollback", "promote"): break
    return out


PLAN = dict(min_requests=200, min_seconds=30)


def test_a_healthy_canary_walks_the_plan_and_is_promoted_only_at_the_end():
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock)
    assert r.evaluate().action == "hold" and r.share == 0.05
    decisions = drive(r, clock, 60_000)
    assert [d.action for d in decisions] == ["advance", "advance", "advance", "promote"]
    assert [d.share for d in decisions] == [0.25, 0.5, 1.0, 1.0] and r.state == "promoting"


def test_a_refused_promotion_steps_back_and_waits_still_watched():
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock)
    drive(r, clock, 60_000)
    d = r.promotion_refused("v2 is candidate, not approved")
    assert d.share == 0.5 and r.state == "awaiting_approval" and "not approved" in r.status()["reason"]
    (d,) = drive(r, clock, 60_000, error=1.0)                                         # a breach while waiting still rolls back
    assert d.action == "rollback" and r.share == 0.0


def test_pause_holds_the_step_and_an_operator_can_roll_back():
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock)
    r.pause()
    assert drive(r, clock, 5_000) == [] and r.step == 0 and r.share == 0.05            # paused: no advance however long
    with pytest.raises(ValueError, match="only a running rollout can be paused"): r.pause()
    r.resume()
    assert drive(r, clock, 5_000)[0].action == "advance"
    assert r.roll_back("operator: support tickets").share == 0.0 and r.status()["state"] == "rolled_back"
    with pytest.raises(ValueError, match="nothing to roll back"): r.roll_back("again")


def test_a_fixed_split_never_advances_but_is_still_rolled_back():
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock, fixed_share=0.3)
    assert drive(r, clock, 20_000) == [] and r.share == 0.3
    (d,) = drive(r, clock, 5_000, error=1.0)
    assert d.action == "rollback" and "fixed split" in d.reason


def test_a_step_needs_both_requests_and_time():
    clock = Clock()
    r = Rollout(RolloutPlan(min_requests=200, min_seconds=10_000), clock=clock)
    drive(r, clock, 20_000)
    assert r.step == 0 and "requests" in r.evaluate().reason                          # enough requests, not enough time


def test_a_failing_canary_is_rolled_back_within_min_errors_of_its_requests():
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock)
    before = sum(w.requests for w in r.windows.values())
    (d,) = drive(r, clock, 10_000, error=1.0)
    assert d.action == "rollback" and "error rate" in d.reason and r.share == 0.0
    assert r.windows["challenger"].requests == RolloutPlan().min_errors and before == 0


@pytest.mark.parametrize("kind, kwargs, reason", [("slow", {"latency": 0.02}, "p99 latency"),
                                                  ("skewed", {"score": (0.6, 0.1)}, "output distribution shift"),
                                                  ("less accurate", {"accuracy": 0.6}, "online accuracy")])
def test_unhealthy_canaries_are_rolled_back_with_the_reason(kind, kwargs, reason):
    clock = Clock()
    r = Rollout(RolloutPlan(**PLAN), clock=clock)
    decisions = drive(r, clock, 60_000, **kwargs)
    assert decisions[-1].action == "rollback" and reason in decisions[-1].reason and r.state == "rolled_back"
    assert r.evaluate().action == "hold" and r.split().route("anyone") == "champion"


def test_equal_canaries_are_rarely_rolled_back_by_chance():
    "Health is tested statistically at a few looks per step; the false-rollback rate over 40 rollouts stays at or under 5%."
    false = []
    for seed in range(40):
        clock = Clock()
        r = Rollout(RolloutPlan(**PLAN), clock=clock)
        d = drive(r, clock, 60_000, accuracy=0.8, seed=seed)[-1]
        if d.action != "promote": false.append((seed, d.reason))
    assert len(false) <= 2, false
