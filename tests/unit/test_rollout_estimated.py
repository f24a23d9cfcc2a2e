"""The rollout's estimated rule on synthetic scores with known ground truth: the estimate from a variant's score histogram
matches the realized metric, its band is the estimate's own sampling error, calibration is applied per variant (a
challenger with the same ranking but distorted scores is as good), and the state machine pauses, then rolls back, a
challenger estimated worse, and leaves an equally good one alone. Real `PerformanceEstimator`s fitted on reference data."""
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from mlnb.core.config import RolloutPlan, config_from_dict
from mlnb.rollout.plan import SCORE_BINS, Rollout, VariantWindow, estimated_comparison, estimated_metric
from mlnb.stats.estimate import PerformanceEstimator

CENTRES = (np.arange(SCORE_BINS) + 0.5) / SCORE_BINS


def population(n, seed, strength=1.0):
    "Calibrated positive probabilities and labels drawn from them: AUC known from the labels."
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p = 1 / (1 + np.exp(-(strength * 1.6 * x - 1.1)))
    return p, np.where(rng.random(n) < p, "Yes", "No")


def window(scores) -> VariantWindow:
    w = VariantWindow()
    for s in scores[:200]: w.record(0.001, scores=[float(s)])          # one-row requests ...
    w.record(0.001, scores=np.asarray(scores[200:]))                   # ... and a batch: the same histogram
    return w


def fitted(raw, y) -> PerformanceEstimator:
    return PerformanceEstimator.fit(raw, y, "binary", classes=["No", "Yes"], positive="Yes")


class Clock:
    t = 0.0
    def __call__(self): return self.t


def drive(rollout, clock, pools, n=40_000, until=("rolled_back", "promoting")) -> list:
    "n requests through the split; each variant's score drawn from its pool; the non-hold decisions."
    rng, out = np.random.default_rng(3), []
    for i in range(n):
        variant = rollout.split().route(f"c{i}")
        pool = pools[variant]
        rollout.record(variant, 0.001, False, [float(pool[rng.integers(len(pool))])])
        clock.t += 0.01
        d = rollout.evaluate()
        if d.action != "hold": out.append(d)
        if rollout.state in until: break
    return out


PLAN = RolloutPlan(steps=(0.5, 1.0), min_requests=800, min_seconds=0, max_output_drift=1.0, estimated_rule={"min_rows": 500})


def test_the_histogram_estimate_matches_the_realized_auc_and_accuracy():
    p, y = population(50_000, 0)
    w = window(p)
    auc, sd = estimated_metric(w.score_counts, CENTRES)
    assert abs(auc - roc_auc_score(y == "Yes", p)) < 0.01 and 0 < sd < 0.005
    acc, acc_sd = estimated_metric(w.score_counts, CENTRES, "accuracy", 0.5)
    assert abs(acc - accuracy_score(y == "Yes", p >= 0.5)) < 0.01 and 0 < acc_sd < 0.005


def test_the_band_is_the_sampling_error_of_the_estimate_on_windows_of_that_size():
    p, _ = population(200_000, 1)
    rng = np.random.default_rng(2)
    draws = [estimated_metric(window(p[rng.integers(0, len(p), 1500)]).score_counts, CENTRES) for _ in range(150)]
    spread, claimed = np.std([d[0] for d in draws]), np.mean([d[1] for d in draws])
    assert 0.8 < spread / claimed < 1.25, (spread, claimed)


def test_each_variant_is_calibrated_by_its_own_estimator():
    "The challenger's scores are squared: the same ranking, the same true AUC, but miscalibrated. Its estimator undoes that."
    p_ref, y_ref = population(20_000, 4)
    p, _ = population(20_000, 5)
    champion, challenger = fitted(p_ref, y_ref), fitted(p_ref ** 2, y_ref)
    assert challenger.calibration is not None and challenger.calibration.ece_after < challenger.calibration.ece_before
    rule = PLAN.estimated_rule
    c = estimated_comparison(rule, window(p[:10_000]), window(p[10_000:] ** 2), champion, challenger)
    assert not c.worse and abs(c.difference) < 0.01, c
    raw = estimated_metric(window(p[10_000:] ** 2).score_counts, CENTRES)[0]          # without its calibrator: a wrong estimate
    assert abs(raw - c.canary) > 0.02, (raw, c.canary)


def test_a_flattened_challenger_is_paused_then_rolled_back_and_an_equal_one_is_promoted():
    p_ref, y_ref = population(20_000, 6)
    weak_ref, weak_y = population(20_000, 7, strength=0.3)      # a worse model: its scores carry less about the label
    good, weak = population(20_000, 8)[0], population(20_000, 9, strength=0.3)[0]
    estimators = {"champion": fitted(p_ref, y_ref), "challenger": fitted(weak_ref, weak_y)}
    clock = Clock()
    r = Rollout(PLAN, clock=clock, estimators=estimators)
    decisions = drive(r, clock, {"champion": good, "challenger": weak})
    assert [d.action for d in decisions] == ["pause", "rollback"], [d.reason for d in decisions]
    assert "estimated roc_auc" in decisions[0].reason and "band" in decisions[0].reason
    assert r.windows["challenger"].labelled == 0 and r.share == 0.0

    clock = Clock()
    equal = Rollout(PLAN, clock=clock, estimators={"champion": fitted(p_ref, y_ref), "challenger": fitted(p_ref, y_ref)})
    decisions = drive(equal, clock, {"champion": good, "challenger": population(20_000, 10)[0]})
    assert [d.action for d in decisions] == ["advance", "promote"], [d.reason for d in decisions]
    assert equal.estimated is not None


def test_a_pause_the_rule_made_lifts_when_the_challenger_is_back_within_the_band():
    "Judged worse at one look, as good at the next (its window then holds other rows): the rule resumes it itself."
    p_ref, y_ref = population(20_000, 11)
    est = fitted(p_ref, y_ref)
    clock = Clock()
    r = Rollout(PLAN, clock=clock, estimators={"champion": est, "challenger": est})
    good, weak = population(20_000, 13)[0], population(20_000, 12, strength=0.3)[0]
    r.windows = {"champion": window(good[:2000]), "challenger": window(weak[:2000])}
    first = r.judge_estimate(look=True)
    assert first.action == "pause" and r.state == "paused" and r.estimate_paused_at == 0.0
    assert r.judge_estimate(look=False) is None                                        # no look, pause_seconds not over: nothing
    r.windows["challenger"] = window(population(20_000, 14)[0][:4000])
    again = r.judge_estimate(look=True)
    assert again.action == "resume" and r.state == "running" and "back within the band" in again.reason
    assert r.estimate_paused_at is None


def test_pause_seconds_judges_again_without_a_look():
    p_ref, y_ref = population(20_000, 20)
    est = fitted(p_ref, y_ref)
    clock = Clock()
    plan = PLAN.model_copy(update={"estimated_rule": PLAN.estimated_rule.model_copy(update={"pause_seconds": 30})})
    r = Rollout(plan, clock=clock, estimators={"champion": est, "challenger": est})
    good, weak = population(20_000, 21)[0], population(20_000, 22, strength=0.3)[0]
    r.windows = {"champion": window(good[:2000]), "challenger": window(weak[:2000])}
    assert r.judge_estimate(look=True).action == "pause"
    clock.t = 29.0
    assert r.judge_estimate(look=False) is None
    clock.t = 30.0
    assert r.judge_estimate(look=False).action == "rollback" and r.state == "rolled_back"


def test_operator_pause_then_worse_keeps_it_paused_and_rolls_back_at_the_next_look():
    p_ref, y_ref = population(20_000, 15)
    est = fitted(p_ref, y_ref)
    clock = Clock()
    r = Rollout(PLAN, clock=clock, estimators={"champion": est, "challenger": est})
    r.pause("holiday freeze")
    weak, good = population(20_000, 16, strength=0.2)[0], population(20_000, 17)[0]
    decisions = drive(r, clock, {"champion": good, "challenger": weak})
    assert [d.action for d in decisions] == ["pause", "rollback"]


def test_the_rule_does_not_judge_without_estimators_or_enough_rows_or_when_switched_off():
    p, y = population(5000, 18)
    est = fitted(p, y)
    rule = PLAN.estimated_rule
    assert "no estimator" in estimated_comparison(rule, window(p), window(p), None, est)
    assert "scored rows" in estimated_comparison(rule, window(p), window(p[:300]), est, est)
    multiclass = PerformanceEstimator(task="multiclass", classes=["a", "b", "c"])
    assert "binary models only" in estimated_comparison(rule, window(p), window(p), est, multiclass)
    off = PLAN.model_copy(update={"estimated_rule": rule.model_copy(update={"enabled": False})})
    clock = Clock()
    r = Rollout(off, clock=clock, estimators={"champion": est, "challenger": est})
    weak = population(20_000, 19, strength=0.2)[0]
    assert [d.action for d in drive(r, clock, {"champion": p, "challenger": weak})] == ["advance", "promote"]


def test_the_rule_is_configured_in_params_and_bad_values_are_named():
    plan = config_from_dict({"serve": {"rollout": {"plan": {"estimated_rule": {"max_drop": 0.05, "z": 3}}}}}).serve.rollout.plan
    assert plan.estimated_rule.max_drop == 0.05 and plan.estimated_rule.z == 3 and plan.estimated_rule.min_rows == 500
    with pytest.raises(Exception, match="estimated_rule.min_rows"):
        config_from_dict({"serve": {"rollout": {"plan": {"estimated_rule": {"min_rows": 2}}}}})
    with pytest.raises(Exception, match="estimated_rule.metric"):
        config_from_dict({"serve": {"rollout": {"plan": {"estimated_rule": {"metric": "f1"}}}}})
