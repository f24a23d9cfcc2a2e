"""`mlnb ab report` on synthetic prediction and feedback logs written by the server's own log writer."""
import json
import time

import numpy as np
import pytest

from mlnb.predlog.log import FeedbackEntry, ParquetLog, PredictionEntry, feedback_table, prediction_table

from conftest import ROOT, run

NAMES, KINDS = ("tenure", "contract"), ("number", "string")


def write_logs(root, accuracy: dict, n: int, seed: int, task: str = "classification"):
    "Each variant right with probability `accuracy[variant]` (classification) or with errors of that scale (regression)."
    rng = np.random.default_rng(seed)
    plog = ParquetLog(root / "predictions", prediction_table, "predictions", flush_seconds=0.05)
    flog = ParquetLog(root / "feedback", feedback_table, "feedback", flush_seconds=0.05)
    for variant, quality in accuracy.items():
        for i in range(n):
            pid = f"{variant}-{i}"
            rows = [(float(rng.integers(0, 72)), "One year")]
            if task == "classification":
                actual = "Yes" if rng.random() < 0.3 else "No"
                label = actual if rng.random() < quality else ("No" if actual == "Yes" else "Yes")
                outputs = {"label": np.array([label], object), "probabilities": np.array([[0.5, 0.5]], np.float32)}
            else:
                actual = float(rng.normal(50, 10))
                outputs = {"variable": np.array([[actual + rng.normal(0, quality)]], np.float32)}
            plog.put(PredictionEntry([pid], time.time(), "churn", "1", variant, "mlflow", float(rng.gamma(2, 0.0002)), NAMES, KINDS, rows,
                                     outputs, ["No", "Yes"] if task == "classification" else None), 1)
            flog.put(FeedbackEntry([pid], [actual], time.time()), 1)
    plog.close(); flog.close()


def report(root, *extra):
    out = root / "report.json"
    run(["mlnb", "ab", "report", "--predictions", str(root / "predictions"), "--feedback", str(root / "feedback"), "--json", str(out),
         "--figure", str(root / "ab.png"), *extra], ROOT)
    return json.loads(out.read_text())


def test_a_known_difference_is_found(tmp_path):
    write_logs(tmp_path, {"champion": 0.72, "challenger": 0.80}, 1500, seed=1)
    r = report(tmp_path)
    (c,) = r["comparisons"]
    assert c["treatment"] == "challenger" and c["verdict"] == "better" and c["p_value"] < 0.05
    assert 0 < c["ci_low"] < 0.08 < c["ci_high"]                        # the interval holds the true difference
    stats = {v["variant"]: v for v in r["variants"]}
    assert stats["champion"]["requests"] == 1500 and stats["challenger"]["labelled"] == 1500
    assert 0 < stats["champion"]["latency_p50_ms"] < stats["champion"]["latency_p99_ms"]
    assert (tmp_path / "ab.png").stat().st_size > 10_000


def test_a_worse_challenger_is_called_worse(tmp_path):
    write_logs(tmp_path, {"champion": 0.80, "challenger": 0.70}, 1500, seed=2)
    assert report(tmp_path)["comparisons"][0]["verdict"] == "worse"


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_equal_variants_are_not_enough_evidence(tmp_path, seed):
    write_logs(tmp_path, {"champion": 0.75, "challenger": 0.75}, 600, seed=seed)
    c = report(tmp_path)["comparisons"][0]
    assert c["verdict"] == "not yet enough data" and c["ci_low"] < 0 < c["ci_high"]


def test_too_few_labels_is_not_a_verdict(tmp_path):
    write_logs(tmp_path, {"champion": 0.5, "challenger": 0.95}, 40, seed=6)
    c = report(tmp_path, "--min-labelled", "100")["comparisons"][0]
    assert c["verdict"] == "not yet enough data" and "need at least 100" in c["reason"]


def test_regression_compares_absolute_errors(tmp_path):
    write_logs(tmp_path, {"champion": 5.0, "challenger": 4.0}, 1000, seed=7, task="regression")
    c = report(tmp_path)["comparisons"][0]
    assert c["metric"] == "mae" and c["test"] == "Welch's t-test" and c["verdict"] == "better" and c["difference"] < 0


def test_unknown_control_is_named(tmp_path):
    write_logs(tmp_path, {"champion": 0.7}, 50, seed=8)
    p = run(["mlnb", "ab", "report", "--predictions", str(tmp_path / "predictions"), "--feedback", str(tmp_path / "feedback"),
             "--control", "blue"], ROOT, check=False)
    assert p.returncode == 1 and "control variant 'blue' is not in the log (variants: ['champion'])" in p.stderr
