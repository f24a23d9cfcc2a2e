"""The statistical decisions of `mlnb.stats.decisions`: the proportion test against a case worked by hand, and the
same verdict from monitoring, the rollout plan and the A/B report when each is given the same counts and thresholds."""
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlnb.core.config import ABConfig, AccuracyRule, MonitorConfig, OutputDriftRule, RolloutPlan
from mlnb.monitoring.check import online_performance
from mlnb.predlog.log import FeedbackEntry, PredictionEntry, feedback_table, prediction_table
from mlnb.rollout.ab import ab_report
from mlnb.rollout.plan import VariantWindow, health_breaches
from mlnb.stats.decisions import output_drift, proportion_test


def phi(x: float) -> float:
    "The standard normal distribution function."
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_the_proportion_test_matches_a_case_worked_by_hand():
    # 150 of 200 right against 170 of 200: pooled rate 320 / 400 = 0.8, standard error sqrt(0.8 * 0.2 * (1/200 + 1/200))
    # = 0.04, z = (0.75 - 0.85) / 0.04 = -2.5; one-sided p = phi(-2.5), two-sided twice that
    rule = AccuracyRule(max_drop=0.05, p_value=0.01, min_labelled=200)
    t = proportion_test(150, 200, 170, 200, rule)
    assert t.z == pytest.approx(-2.5, abs=1e-12)
    assert t.p_worse == pytest.approx(phi(-2.5), rel=1e-9) and t.p_value == pytest.approx(2 * phi(-2.5), rel=1e-9)
    assert t.difference == pytest.approx(-0.1) and t.enough and t.worse
    stricter, larger_drop = rule.model_copy(update={"p_value": 0.006}), rule.model_copy(update={"max_drop": 0.1})
    assert not proportion_test(150, 200, 170, 200, stricter).worse                   # p = 0.00621
    assert not proportion_test(150, 200, 170, 200, larger_drop).worse                # a drop of exactly 0.1
    assert not proportion_test(150, 200, 170, 199, rule).enough                      # the reference is a label short
    assert proportion_test(150, 200, 170, 199, rule, fixed_reference=True).worse     # fine for a fixed measurement
    with pytest.raises(ValueError, match="reference successes must be a count between 0 and the reference sample size"):
        proportion_test(150, 200, -1, 200, rule)


# (challenger right, challenger labelled, champion right, champion labelled): clearly worse, borderline either side of
# p = 0.01, too few labels, equal, better, all right on both sides
COUNTS = [(600, 1000, 800, 1000), (150, 200, 170, 200), (152, 200, 170, 200), (154, 200, 170, 200),
          (120, 150, 160, 180), (140, 199, 190, 200), (700, 1000, 700, 1000), (850, 1000, 800, 1000),
          (300, 300, 400, 400), (0, 250, 10, 250)]
P_VALUE, MIN_LABELLED = 0.01, 200


def monitoring_says_worse(right, n, ref_right, ref_n) -> bool:
    "The window's labels against an evaluation that measured the champion's accuracy on `ref_n` test rows."
    ids = [f"p{i}" for i in range(n)]
    now = pd.Timestamp("2026-11-01", tz="UTC")
    window = pd.DataFrame({"prediction_id": ids, "timestamp": now, "label": ["Yes"] * right + ["No"] * (n - right)})
    feedback = pd.DataFrame({"prediction_id": ids, "actual": "Yes", "timestamp": now})
    cfg = MonitorConfig(max_accuracy_drop=0.0, accuracy_p_value=P_VALUE, min_labelled=MIN_LABELLED)
    return online_performance(window, feedback, ref_right / ref_n, ref_n, cfg).decayed


def rollout_says_worse(right, n, ref_right, ref_n) -> bool:
    "A canary window against the control's, as the rollout plan judges them at a look."
    canary, control = VariantWindow(), VariantWindow()
    for window, k, m in ((canary, right, n), (control, ref_right, ref_n)):
        for i in range(m):
            window.record_label(i < k)
    plan = RolloutPlan(max_accuracy_drop=0.0, accuracy_p_value=P_VALUE, min_labelled=MIN_LABELLED)
    return any(b.startswith("online accuracy") for b in health_breaches(plan, control, canary))


def ab_says_worse(right, n, ref_right, ref_n, root) -> bool:
    "`ab_report` on prediction and feedback logs written by the server's log writer."
    entries, feedback = [], []
    for variant, k, m in (("champion", ref_right, ref_n), ("challenger", right, n)):
        for i in range(m):
            pid = f"{variant}-{i}"
            label = np.array(["Yes" if i < k else "No"], object)
            entries.append(PredictionEntry([pid], 1.8e9, "churn", "1", variant, "mlflow", 0.001,
                                           ("tenure",), ("number",), [(1.0,)], {"label": label}))
            feedback.append(FeedbackEntry([pid], ["Yes"], 1.8e9 + 60))
    for name, table in (("predictions", prediction_table(entries)), ("feedback", feedback_table(feedback))):
        (root / name / "date=2027-01-15").mkdir(parents=True)
        pq.write_table(table, root / name / "date=2027-01-15" / "part.parquet")
    # a two-sided test at level 2p is worse exactly when the one-sided test is below p
    cfg = ABConfig(alpha=2 * P_VALUE, min_labelled=MIN_LABELLED)
    report = ab_report(root / "predictions", root / "feedback", "champion", cfg)
    (comparison,) = report.comparisons
    return comparison.verdict == "worse"


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "{}of{}-vs-{}of{}".format(*c))
def test_monitoring_rollout_and_ab_give_the_same_verdict_on_the_same_counts(counts, tmp_path):
    expected = proportion_test(*counts, AccuracyRule(max_drop=0.0, p_value=P_VALUE, min_labelled=MIN_LABELLED)).worse
    verdicts = {"monitoring": monitoring_says_worse(*counts), "rollout": rollout_says_worse(*counts),
                "ab": ab_says_worse(*counts, tmp_path)}
    assert verdicts == dict.fromkeys(verdicts, expected), verdicts


def test_the_counts_cover_both_verdicts_and_the_borderline():
    rule = AccuracyRule(max_drop=0.0, p_value=P_VALUE, min_labelled=MIN_LABELLED)
    tests = [proportion_test(*c, rule) for c in COUNTS]
    assert {t.worse for t in tests} == {True, False} and any(not t.enough for t in tests)
    assert any(P_VALUE / 3 < t.p_worse < P_VALUE for t in tests)                     # just significant
    assert any(P_VALUE < t.p_worse < 3 * P_VALUE for t in tests)                     # just not


def test_the_rollout_plan_rolls_back_on_output_drift_exactly_when_the_shared_test_says_so():
    rng, plan = np.random.default_rng(0), RolloutPlan(min_requests=1)
    rule = OutputDriftRule(max_distance=plan.max_output_drift, p_value=plan.drift_p_value)
    seen = set()
    for shift in (0.0, 0.02, 0.05, 0.1, 0.3):
        control, canary = VariantWindow(), VariantWindow()
        for window, mean in ((control, 0.3), (canary, 0.3 + shift)):
            window.record(0.001, scores=np.clip(rng.normal(mean, 0.1, 2000), 0, 1))
        drifted = output_drift(control.output_counts, canary.output_counts, rule).drifted
        breached = any(b.startswith("output distribution shift") for b in health_breaches(plan, control, canary))
        assert breached == drifted, shift
        seen.add(drifted)
    assert seen == {True, False}
