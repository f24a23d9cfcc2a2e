"""Label-free performance estimation (mlnb.stats.estimate): real scikit-learn models on synthetic data whose ground truth
is known, windows drawn from it (unchanged, shifted in a way that hurts), the realized metrics from their labels."""
import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from mlnb.core.errors import DataError, EstimationError
from mlnb.stats.estimate import (CLASSIFICATION_METRICS, ESTIMATOR_FILE, LOSS_MODEL_FILE, Estimate, PerformanceEstimator)

from conftest import ROOT


def binary_data(rows, seed, shift=0.0, scale=1.0):
    "Three features, a logistic truth; `shift`/`scale` move and squeeze the first (the strongest) feature."
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    x[:, 0] = x[:, 0] * scale + shift
    logit = 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.5 * x[:, 2] - 0.5
    return x, (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)


def multiclass_data(rows, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)) + [shift, 0.0, 0.0]
    p = np.exp(1.5 * np.column_stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1] + 0.5 * x[:, 2]]))
    p /= p.sum(1, keepdims=True)
    return x, np.array(["basic", "plus", "premium"])[(p.cumsum(1) < rng.random(rows)[:, None]).sum(1)]


def regression_data(rows, seed, shift=0.0):
    "The error's spread grows with |x1|: a window shifted along x1 has a larger MAE."
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x1": rng.normal(size=rows) + shift, "x2": rng.normal(size=rows),
                          "plan": rng.choice(["basic", "plus", "premium"], rows)})
    y = 2 * frame.x1 - frame.x2 + (frame.plan == "plus") + (0.5 + np.abs(frame.x1)) * rng.normal(size=rows)
    return frame, y.to_numpy()


def design(frame):
    return np.column_stack([frame.x1, frame.x2, frame.plan == "plus"])


@pytest.fixture(scope="module")
def binary():
    model = LogisticRegression().fit(*binary_data(5000, 0))
    x, y = binary_data(4000, 1)
    return model, PerformanceEstimator.fit(model.predict_proba(x)[:, 1], y, "binary", classes=[0, 1], threshold=0.4)


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    model = LinearRegression().fit(design(regression_data(5000, 0)[0]), regression_data(5000, 0)[1])
    frame, y = regression_data(4000, 1)
    out = tmp_path_factory.mktemp("estimator")
    est = PerformanceEstimator.fit(model.predict(design(frame)), y, "regression", features=frame, out_dir=out)
    est.save(out)
    return model, PerformanceEstimator.load(out), out


def test_binary_realized_metrics_are_scikit_learns_weighted_or_not(binary):
    model, est = binary
    x, y = binary_data(3000, 7)
    s, w = model.predict_proba(x)[:, 1], np.random.default_rng(0).random(3000)
    pred = (s >= 0.4).astype(int)
    for weights in (None, w):
        r = est.realized(s, y, weights=weights)
        assert r["roc_auc"] == pytest.approx(roc_auc_score(y, s, sample_weight=weights), abs=1e-12)
        assert r["accuracy"] == pytest.approx(accuracy_score(y, pred, sample_weight=weights), abs=1e-12)
        assert r["precision"] == pytest.approx(precision_score(y, pred, sample_weight=weights), abs=1e-12)
        assert r["recall"] == pytest.approx(recall_score(y, pred, sample_weight=weights), abs=1e-12)
        assert r["f1"] == pytest.approx(f1_score(y, pred, sample_weight=weights), abs=1e-12)
    assert est.realized(s, y.astype(float)) == est.realized(s, y.astype(str)) == est.realized(s, y)   # 0.0/1.0 are classes 0/1


def test_a_covariate_shift_that_hurts_is_estimated_within_002(binary):
    """Squeezing the strongest feature lowers the AUC; the estimate sees the drop, without labels: mean absolute error ≤ 0.02
    at 2,000+ rows (the issue's goal), and each window's error within 3 of its band's sd."""
    model, est = binary
    errors = []
    for seed in range(10, 16):
        for rows in (2000, 5000):
            x, y = binary_data(rows, seed, scale=0.4)
            s = model.predict_proba(x)[:, 1]
            estimate, realized = est.estimate(s), est.realized(s, y)
            assert realized["roc_auc"] < est.reference["roc_auc"] - 0.05
            assert estimate.value("roc_auc") < est.reference["roc_auc"] - 0.05
            errors.append(abs(estimate.with_realized(realized).metrics["roc_auc"].error))
            assert errors[-1] <= 3 * estimate.metrics["roc_auc"].sd, (rows, seed, errors[-1], estimate.metrics["roc_auc"])
    assert np.mean(errors) <= 0.02, errors


def test_the_realized_value_falls_inside_the_band_in_90_percent_of_windows(binary, regression):
    model, est = binary
    inside = {name: 0 for name in CLASSIFICATION_METRICS}
    for seed in range(40):
        x, y = binary_data(2000, 100 + seed, shift=-0.5 if seed % 2 else 0.0)
        s = model.predict_proba(x)[:, 1]
        estimate, realized = est.estimate(s, seed=seed), est.realized(s, y)
        for name in inside:
            m = estimate.metrics[name]
            inside[name] += m.lower <= realized[name] <= m.upper
    assert all(v >= 36 for v in inside.values()), {name: f"{v}/40" for name, v in inside.items()}
    reg_model, reg, _ = regression
    inside = {"mae": 0, "rmse": 0}
    for seed in range(40):
        frame, y = regression_data(2000, 200 + seed, shift=0.5 if seed % 2 else 0.0)
        pred = reg_model.predict(design(frame))
        estimate, realized = reg.estimate(pred, frame), reg.realized(pred, y)
        for name in inside:
            inside[name] += estimate.metrics[name].lower <= realized[name] <= estimate.metrics[name].upper
    assert all(v >= 36 for v in inside.values()), {name: f"{v}/40" for name, v in inside.items()}


def test_a_miscalibrated_model_is_calibrated_and_its_estimate_is_still_right(binary):
    model, _ = binary
    x, y = binary_data(4000, 1)
    squared = PerformanceEstimator.fit(model.predict_proba(x)[:, 1] ** 2, y, "binary", classes=[0, 1], threshold=0.3)
    check = squared.calibration
    assert check.method in ("isotonic", "sigmoid") and check.ece_before > 0.1 and check.ece_after < 0.03, check
    errors = {name: [] for name in CLASSIFICATION_METRICS}
    for seed in range(20, 25):
        xw, yw = binary_data(4000, seed, shift=-0.5)
        s = model.predict_proba(xw)[:, 1] ** 2
        estimate, realized = squared.estimate(s, band=False), squared.realized(s, yw)
        for name in errors: errors[name].append(abs(estimate.value(name) - realized[name]))
    assert {name: np.mean(v) for name, v in errors.items()} == pytest.approx({name: 0 for name in errors}, abs=0.02), errors


def test_a_calibrated_model_keeps_the_identity(binary):
    model, _ = binary
    x, _ = binary_data(4000, 3)
    p = model.predict_proba(x)[:, 1]
    y = (np.random.default_rng(3).random(4000) < p).astype(int)          # outcomes drawn from the scores: calibrated
    assert PerformanceEstimator.fit(p, y, "binary").calibration.method == "identity"


def test_multiclass_macro_metrics_and_estimate():
    model = LogisticRegression().fit(*multiclass_data(5000, 0))
    est = PerformanceEstimator.fit(model.predict_proba(multiclass_data(4000, 1)[0]), multiclass_data(4000, 1)[1], "multiclass",
                                   classes=list(model.classes_))
    assert len(est.calibrators) == 3
    for seed in (5, 6):
        x, y = multiclass_data(3000, seed, shift=1.0)
        s = model.predict_proba(x)
        realized = est.realized(s, y)
        assert realized["roc_auc"] == pytest.approx(roc_auc_score(y, s, multi_class="ovr"), abs=1e-12)
        assert realized["f1"] == pytest.approx(f1_score(y, model.predict(x), average="macro"), abs=1e-12)
        assert realized["recall"] == pytest.approx(recall_score(y, model.predict(x), average="macro"), abs=1e-12)
        estimate = est.estimate(s)
        for name in CLASSIFICATION_METRICS:
            assert abs(estimate.value(name) - realized[name]) < 0.03, (name, estimate.metrics[name], realized[name])
        assert estimate.labels == ["basic", "plus", "premium"] and np.sum(estimate.confusion) == pytest.approx(3000)


def test_regression_dle_sees_a_shift_that_hurts(regression):
    model, est, out = regression
    assert sorted(p.name for p in out.iterdir()) == [ESTIMATOR_FILE, LOSS_MODEL_FILE]
    values = {}
    for shift in (0.0, 1.0):
        frame, y = regression_data(5000, 30, shift=shift)
        pred = model.predict(design(frame))
        estimate, realized = est.estimate(pred, frame), est.realized(pred, y)
        assert estimate.value("mae") == pytest.approx(realized["mae"], rel=0.05)
        assert estimate.value("rmse") == pytest.approx(realized["rmse"], rel=0.05)
        values[shift] = estimate.value("mae"), realized["mae"]
    assert values[1.0][0] > values[0.0][0] + 0.15 and values[1.0][1] > values[0.0][1] + 0.15, values
    assert est.headline() == "mae"


def test_weights_and_the_fast_headline_agree_with_estimate(binary, regression):
    model, est = binary
    x, _ = binary_data(3000, 8)
    s = model.predict_proba(x)[:, 1]
    w = np.where(x[:, 0] > 0, 3.0, 1.0)
    f = est.point(s)
    assert f(None) == pytest.approx(est.estimate(s).value("roc_auc"), abs=1e-12)
    assert f(w) == pytest.approx(est.estimate(s, weights=w, band=False).value("roc_auc"), abs=1e-12)
    assert f(np.ones(3000)) == pytest.approx(f(None), abs=1e-12)
    m = est.estimate(s).metrics["roc_auc"]
    coverage = est._coverage(s, None)                      # 1 + χ² of the window's scores against the reference's: ~1 here
    assert 1.0 <= coverage < 1.05
    assert m.sd == pytest.approx(m.sampling_sd * np.sqrt(1 + 3000 * coverage / est.reference_rows))   # the reference's error too
    reg_model, reg, _ = regression
    frame, _ = regression_data(3000, 9)
    pred = reg_model.predict(design(frame))
    g, w = reg.point(pred, frame), np.where(frame.x1 > 0, 2.0, 1.0)
    assert g(w) == pytest.approx(reg.estimate(pred, frame, weights=w).value("mae"), abs=1e-12)


def test_fit_is_deterministic_to_the_byte(binary, tmp_path):
    model, _ = binary
    x, y = binary_data(4000, 1)
    for name in ("a", "b"):
        PerformanceEstimator.fit(model.predict_proba(x)[:, 1] ** 2, y, "binary", classes=[0, 1]).save(tmp_path / name)
    assert (tmp_path / "a" / ESTIMATOR_FILE).read_bytes() == (tmp_path / "b" / ESTIMATOR_FILE).read_bytes()
    frame, t = regression_data(2000, 1)
    pred = frame.x1.to_numpy() * 2
    for name in ("c", "d"):
        PerformanceEstimator.fit(pred, t, "regression", features=frame, out_dir=tmp_path / name).save(tmp_path / name)
    for file in (ESTIMATOR_FILE, LOSS_MODEL_FILE):
        assert (tmp_path / "c" / file).read_bytes() == (tmp_path / "d" / file).read_bytes(), file
    assert json.loads((tmp_path / "c" / ESTIMATOR_FILE).read_text())["task"] == "regression"


def test_input_it_cannot_use_is_refused_by_name(binary, regression, tmp_path):
    model, est = binary
    s = model.predict_proba(binary_data(100, 2)[0])[:, 1]
    cases = [(lambda: est.estimate(np.column_stack([1 - s, s])), "shape (rows,)"),
             (lambda: est.estimate(np.r_[s, np.nan]), "NaN"),
             (lambda: est.estimate(s * 2), "[0, 1]"),
             (lambda: est.estimate(s, weights=np.ones(5)), "weights must have shape (100,)"),
             (lambda: est.point(s)(-np.ones(100)), "non-negative"),
             (lambda: est.realized(s, np.full(100, 3)), "not among the classes"),
             (lambda: PerformanceEstimator.fit(s, np.zeros(100), "ranking"), "unknown task 'ranking'"),
             (lambda: PerformanceEstimator.fit(s, np.zeros(100), "binary", classes=[0, 1], positive=2), "positive class 2 is not among")]
    for call, message in cases:
        with pytest.raises(EstimationError, match=None) as info: call()
        assert message in str(info.value), (message, str(info.value))
    reg_model, reg, out = regression
    frame, _ = regression_data(50, 3)
    with pytest.raises(EstimationError, match=r"\['plan'\]"): reg.estimate(reg_model.predict(design(frame)), frame.drop(columns="plan"))
    with pytest.raises(EstimationError, match="needs `features`"): reg.estimate(reg_model.predict(design(frame)))
    (tmp_path / ESTIMATOR_FILE).write_text((out / ESTIMATOR_FILE).read_text())
    with pytest.raises(EstimationError, match="loss_model.onnx: loss model not found"): PerformanceEstimator.load(tmp_path)
    (tmp_path / ESTIMATOR_FILE).write_text("{not json")
    with pytest.raises(EstimationError, match="not an estimator file"): PerformanceEstimator.load(tmp_path)
    assert issubclass(EstimationError, DataError)


def test_importing_the_module_loads_no_training_toolchain():
    code = ("import sys, mlnb.stats.estimate; bad = {'sklearn', 'skl2onnx', 'mlflow'} & {m.split('.')[0] for m in sys.modules};"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def cpu_seconds(call, repeats=5) -> float:
    "The median process CPU time of `call` (the machine is shared: wall time measures the neighbours too)."
    call()
    times = []
    for _ in range(repeats):
        start = time.process_time(); call(); times.append(time.process_time() - start)
    return float(np.median(times))


@pytest.mark.slow
def test_a_million_rows_are_estimated_within_the_time_budget(binary):
    """10x faster than NannyML 0.13.1 at 1M rows (CBPE 2.2 s binary, 8.5 s multiclass): estimate with band ≲ 0.2 s binary,
    ≲ 0.8 s multiclass, point(w) ≲ 30 ms; asserted in CPU time with slack for a shared machine."""
    model, est = binary
    s = model.predict_proba(binary_data(1_000_000, 4)[0])[:, 1]
    assert isinstance(est.estimate(s), Estimate)
    with_band, without = cpu_seconds(lambda: est.estimate(s), 3), cpu_seconds(lambda: est.estimate(s, band=False), 3)
    assert with_band < 0.2 and with_band - without < 0.03, (with_band, without)    # the band: O(cells), not O(rows)
    f, w = est.point(s), np.random.default_rng(0).random(1_000_000)
    assert cpu_seconds(lambda: f(w)) < 0.03
    mc_model = LogisticRegression().fit(*multiclass_data(5000, 0))
    mc = PerformanceEstimator.fit(mc_model.predict_proba(multiclass_data(4000, 1)[0]), multiclass_data(4000, 1)[1], "multiclass")
    p = mc_model.predict_proba(multiclass_data(1_000_000, 2)[0])
    assert cpu_seconds(lambda: mc.estimate(p), 3) < 0.8


def test_the_band_costs_little_at_any_size(binary):
    """The binary band is a bootstrap on the window's cell table, not its rows: 10,000 and 200,000 rows each estimated with
    band in a few tens of ms of CPU (it was 0.2 s at 200,000 rows: 200 row-level draws on a 20,000-row subsample)."""
    model, est = binary
    for rows, budget in ((200_000, 0.1), (10_000, 0.03)):
        s = model.predict_proba(binary_data(rows, 5)[0])[:, 1]
        took = cpu_seconds(lambda: est.estimate(s))
        assert took < budget, (rows, took)


def exact_values(est, s, w=None):
    "Today's row-by-row arithmetic: every distinct score its own cell, every row's probability calibrated on its own."
    values, confusion = est._expected(est._prepare(s, exact=True), w)
    return values, confusion


def test_binned_and_exact_estimates_agree(binary):
    """The cell table (log-scale cells, the calibrator at each cell's mean score) moves no estimate by 1e-4 from the
    row-by-row values: identity, isotonic and sigmoid calibration, weighted or not, small and large windows."""
    model, est = binary
    x, y = binary_data(4000, 1)
    raw = model.predict_proba(x)[:, 1]
    estimators = {"as fitted": est, "isotonic": PerformanceEstimator.fit(raw ** 2, y, "binary", classes=[0, 1], threshold=0.3),
                  "sigmoid": PerformanceEstimator.fit(raw[:600] ** 3, y[:600], "binary"),
                  "identity": PerformanceEstimator.fit(raw, (np.random.default_rng(3).random(4000) < raw).astype(int), "binary")}
    assert [e.calibration.method for e in estimators.values()][1:] == ["isotonic", "sigmoid", "identity"]
    for rows in (3000, 300_000):
        xw, _ = binary_data(rows, 50, shift=-0.5)
        w = np.where(xw[:, 1] > 0, 3.0, 1.0)
        for name, e in estimators.items():
            s = model.predict_proba(xw)[:, 1] ** {"as fitted": 1, "isotonic": 2, "sigmoid": 3, "identity": 1}[name]
            for weights in (None, w):
                binned = e.estimate(s, weights=weights, band=False)
                exact, confusion = exact_values(e, s, weights)
                for metric, value in exact.items():
                    assert abs(binned.value(metric) - value) < 1e-4, (name, rows, metric, binned.value(metric), value)
                np.testing.assert_allclose(binned.confusion, confusion, rtol=1e-4)
                assert e.point(s)(weights) == pytest.approx(binned.value("roc_auc"), abs=1e-12)
    mc_model = LogisticRegression().fit(*multiclass_data(5000, 0))
    mc = PerformanceEstimator.fit(mc_model.predict_proba(multiclass_data(4000, 1)[0]) ** 3, multiclass_data(4000, 1)[1], "multiclass")
    p = mc_model.predict_proba(multiclass_data(300_000, 2, shift=0.5)[0]) ** 3
    for metric, value in exact_values(mc, p)[0].items():
        assert abs(mc.estimate(p, band=False).value(metric) - value) < 1e-4, (metric, value)


def test_importance_weights_that_undo_a_shift_bring_the_estimate_back(binary):
    "What drift impact relies on: weighting a squeezed window back to the reference's x1 recovers an unshifted window's AUC."
    model, est = binary
    x, _ = binary_data(20_000, 40, scale=0.6)
    s = model.predict_proba(x)[:, 1]
    density = lambda v, sd: np.exp(-0.5 * (v / sd) ** 2) / sd
    w = np.minimum(density(x[:, 0], 1.0) / density(x[:, 0], 0.6), 100.0)
    unshifted = est.point(model.predict_proba(binary_data(20_000, 42)[0])[:, 1])(None)
    unweighted, undone = est.point(s)(None), est.point(s)(w / w.mean())
    assert unweighted < unshifted - 0.03
    assert undone == pytest.approx(unshifted, abs=0.01), (unweighted, undone, unshifted)


def test_a_small_reference_is_calibrated_by_a_sigmoid(binary):
    model, _ = binary
    x, y = binary_data(600, 41)
    est = PerformanceEstimator.fit(model.predict_proba(x)[:, 1] ** 3, y, "binary")
    assert est.calibration.method == "sigmoid" and est.calibration.rows == 600, est.calibration
    assert est.calibrators[0].a is not None and est.calibrators[0].x == []


def test_an_overconfident_multiclass_model_is_calibrated_per_class():
    model = LogisticRegression().fit(*multiclass_data(5000, 0))
    def sharpened(x):
        p = model.predict_proba(x) ** 3
        return p / p.sum(1, keepdims=True)
    x, y = multiclass_data(4000, 1)
    est = PerformanceEstimator.fit(sharpened(x), y, "multiclass", classes=list(model.classes_))
    assert est.calibration.method != "identity" and est.calibration.ece_after < est.calibration.ece_before / 2, est.calibration
    xw, yw = multiclass_data(5000, 43, shift=0.5)
    estimate, realized = est.estimate(sharpened(xw), band=False), est.realized(sharpened(xw), yw)
    for name in ("accuracy", "f1", "roc_auc"):
        assert abs(estimate.value(name) - realized[name]) < 0.025, (name, estimate.value(name), realized[name])
