"""Issue 19's last two estimation goals (mlnb.stats.estimate): a regression band that widens where a window leaves the
reference's range, tested on held-out data (not the benchmark's generator: two noise shapes of its own), and the speed
paths, each checked against the slow path it replaces."""
import json
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from mlnb.stats import estimate as E
from mlnb.stats.estimate import ESTIMATOR_FILE, PerformanceEstimator


def heldout(rows, seed, shift=0.0, kind="abs"):
    """The error's sd grows along `a`, linearly (`abs`: 0.5 + |a|) or exponentially (`exp`: 0.4·e^(a/2)); `shift` moves
    `a` past the reference's range, where a tree loss model carries the edge's loss on, flat."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=rows) + shift, "b": rng.normal(size=rows), "g": rng.choice(["u", "v", "w"], rows)})
    sd = 0.5 + np.abs(frame.a) if kind == "abs" else 0.4 * np.exp(0.5 * frame.a)
    y = 1.5 * frame.a - frame.b + (frame.g == "v") + sd * rng.normal(size=rows)
    return frame, y.to_numpy()


def design(frame):
    return np.column_stack([frame.a, frame.b, frame.g == "v"])


@pytest.fixture(scope="module", params=["abs", "exp"])
def fitted(request):
    kind = request.param
    model = LinearRegression().fit(design(heldout(5000, 0, kind=kind)[0]), heldout(5000, 0, kind=kind)[1])
    frame, y = heldout(5000, 1, kind=kind)
    return kind, model, PerformanceEstimator.fit(model.predict(design(frame)), y, "regression", features=frame)


def coverage(model, est, kind, shift, windows=20, rows=5000):
    inside, without, extra, half = 0, 0, [], []
    for seed in range(windows):
        frame, y = heldout(rows, 100 + seed, shift, kind)
        pred = model.predict(design(frame))
        m, realized = est.estimate(pred, frame).metrics["mae"], est.realized(pred, y)["mae"]
        ext = getattr(m, "extrapolation", 0.0)
        inside += m.lower <= realized <= m.upper
        without += m.lower + ext <= realized <= m.upper - ext
        extra.append(ext); half.append((m.upper - m.lower) / 2 - ext)
    return inside, without, float(np.mean(extra)), float(np.mean(half))


def test_the_band_covers_a_window_beyond_the_references_range(fitted):
    """A shift along `a` past the reference's range (2.5 SD with linear noise growth, 2 SD with exponential): without the
    extrapolation term the realized MAE is outside the band in most windows; with it, inside in >= 90%."""
    kind, model, est = fitted
    inside, without, extra, half = coverage(model, est, kind, 2.5 if kind == "abs" else 2.0)
    assert inside >= 18, (kind, inside, without)
    assert without <= 10 and extra > half, (kind, without, extra, half)     # the term is what covers it


def test_the_band_stays_tight_inside_the_references_range(fitted):
    "Windows like the reference: the term adds under a quarter of the sampling half-width, and coverage stays."
    kind, model, est = fitted
    inside, _, extra, half = coverage(model, est, kind, 0.0)
    assert inside >= 17 and extra < 0.25 * half, (kind, inside, extra, half)


def test_the_edges_are_in_the_estimator_file_and_an_older_file_loads(fitted, tmp_path):
    "`loss_edges` is saved with the estimator; a file from before it (no such key) loads and gets no extrapolation term."
    kind, model, est = fitted
    est.save(tmp_path)
    document = json.loads((tmp_path / ESTIMATOR_FILE).read_text())
    assert len(document["loss_edges"]) == 4 and document["loss_edges"][2] is None     # a, b, g (categorical), prediction
    lo, hi = document["loss_edges"][0][:2]
    assert lo < -2 and hi > 2
    del document["loss_edges"]
    (tmp_path / ESTIMATOR_FILE).write_text(json.dumps(document))
    old = PerformanceEstimator.load(tmp_path)
    frame, _ = heldout(3000, 7, 2.5, kind)
    m = old.estimate(model.predict(design(frame)), frame).metrics["mae"]
    assert m.extrapolation == 0.0 and m.upper - m.value == pytest.approx(1.959964 * m.sd, rel=1e-5)


def cpu_seconds(f, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time(); f(); best = min(best, time.process_time() - t)
    return best


def test_a_large_regression_window_runs_the_loss_model_on_a_sample(fitted):
    """Above `_LOSS_ROWS` rows, unweighted: the loss model runs on a random sample of that many rows. The value stays
    within the sample's own error of the whole window's (weights of 1: the slow path), that error is in the band, the
    same seed gives the same estimate, and it takes a fraction of the slow path's CPU time."""
    kind, model, est = fitted
    frame, _ = heldout(600_000, 9, 0.0, kind)
    pred = model.predict(design(frame))
    fast, slow = est.estimate(pred, frame), est.estimate(pred, frame, weights=np.ones(len(pred)))
    for name in ("mae", "rmse"):
        f, s = fast.metrics[name], slow.metrics[name]
        assert f.sampling_sd > s.sampling_sd                                      # the sample's error is in it
        assert abs(f.value - s.value) < 4 * np.sqrt(f.sampling_sd ** 2 - s.sampling_sd ** 2), (name, f, s)
    assert est.estimate(pred, frame).model_dump() == fast.model_dump()
    assert cpu_seconds(lambda: est.estimate(pred, frame)) < 0.5 * cpu_seconds(lambda: est.estimate(pred, frame, weights=np.ones(len(pred))))


def test_the_isotonic_cell_lookup_equals_np_interp():
    "`_interp_cells` (three lookups per row) gives np.interp's values, to the bit, knots and ends included."
    rng = np.random.default_rng(0)
    x = np.unique(np.r_[rng.random(300) ** 3, 0.5, 0.999])
    y = np.sort(rng.random(len(x)))
    p = np.r_[rng.random(200_000), x, 0.0, 1.0, 1e-12, np.nextafter(0.5, 1), x[0] / 2, (1 + x[-1]) / 2]
    got = E._interp_cells(p, E._log_cells(p), E._knot_table(list(x), list(y)))
    np.testing.assert_array_equal(got, np.interp(p, x, y))


def test_the_multiclass_fast_calibration_equals_the_slow_one():
    "The estimate's calibrated matrix (cell lookup, column-major) equals the row-by-row one; the estimate is unchanged."
    def data(rows, seed):
        r = np.random.default_rng(seed)
        x = r.normal(size=(rows, 3))
        p = np.exp(1.5 * np.column_stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1] + 0.5 * x[:, 2]])); p /= p.sum(1, keepdims=True)
        return x, np.array(["a", "b", "c"])[(p.cumsum(1) < r.random(rows)[:, None]).sum(1)]
    model = LogisticRegression().fit(*data(5000, 0))
    est = PerformanceEstimator.fit(model.predict_proba(data(4000, 1)[0]) ** 3, data(4000, 1)[1], "multiclass")
    assert est.calibration.method == "isotonic"
    s = model.predict_proba(data(100_000, 2)[0] + [0.5, 0, 0]) ** 3
    columns = [np.ascontiguousarray(s[:, c]) for c in range(3)]
    fast = est._calibrated_matrix(s, columns, [E._log_cells(c) for c in columns])
    np.testing.assert_array_equal(fast, est._calibrated_matrix(s))
    assert est.estimate(s, band=False).model_dump() == est.model_copy().estimate(s, band=False).model_dump()


def test_the_binary_table_lists_its_cells_in_score_order():
    "`_half_cells` (no mirror pass) with `_HALF_ORDER` orders rows exactly as `_log_cells` does."
    rng = np.random.default_rng(2)
    p = np.r_[rng.random(100_000), rng.random(1000) ** 9, 1 - rng.random(1000) ** 9, 0.0, 0.5, np.nextafter(0.5, 1), 1.0]
    codes, high = E._half_cells(p)
    rank = np.empty(len(E._HALF_ORDER), dtype=np.int64); rank[E._HALF_ORDER] = np.arange(len(rank))
    np.testing.assert_array_equal(rank[codes], E._log_cells(p))
    np.testing.assert_array_equal(high, p > 0.5)


def binary_windows(rows, seed, shift=0.0):
    "Held-out classification data: a logistic truth on three features; `shift` moves the first (scores pile up near 1)."
    r = np.random.default_rng(seed)
    x = r.normal(size=(rows, 3)); x[:, 0] += shift
    logit = 1.2 * x[:, 0] + x[:, 1] - 0.5 * x[:, 2]
    return x, (r.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)


def test_the_reference_vouches_for_a_window_only_where_its_scores_are(tmp_path):
    """The reference's share of the window's scores widens the band: the factor is √(1 + n·(1 + χ²)/reference_rows), χ² of
    the window's score histogram against the reference's (checked here with np.histogram); a window scored like the
    reference keeps the old factor (χ² ~ 0), a shifted one gets more; an estimator file without the shares keeps the old."""
    model = LogisticRegression().fit(*binary_windows(5000, 0))
    x, y = binary_windows(20_000, 1)
    est = PerformanceEstimator.fit(model.predict_proba(x)[:, 1], y, "binary", classes=[0, 1])
    assert len(est.reference_shares) == 1 and sum(est.reference_shares[0]) == pytest.approx(1.0)
    edges = np.linspace(0, 1, E._SHARE_BINS + 1)
    ref = np.histogram(model.predict_proba(x)[:, 1], edges)[0]
    factors = {}
    for shift in (0.0, 1.5):
        s = model.predict_proba(binary_windows(100_000, 2, shift)[0])[:, 1]
        win = np.histogram(s[::2], edges)[0] / len(s[::2])
        coverage = float(np.sum(win ** 2 / ((ref + 0.5) / (len(x) + 0.5 * E._SHARE_BINS))))
        assert est._coverage(s, None) == pytest.approx(coverage, rel=1e-6)
        m = est.estimate(s).metrics["roc_auc"]
        assert m.sd == pytest.approx(m.sampling_sd * np.sqrt(1 + 100_000 * coverage / len(x)), rel=1e-9)
        factors[shift] = m.sd / m.sampling_sd
    assert factors[0.0] == pytest.approx(np.sqrt(1 + 100_000 / len(x)), rel=0.01) and factors[1.5] > 1.3 * factors[0.0], factors
    est.save(tmp_path)
    document = json.loads((tmp_path / ESTIMATOR_FILE).read_text()); del document["reference_shares"]
    (tmp_path / ESTIMATOR_FILE).write_text(json.dumps(document))
    old, s = PerformanceEstimator.load(tmp_path), model.predict_proba(binary_windows(100_000, 2, 1.5)[0])[:, 1]
    m = old.estimate(s).metrics["roc_auc"]
    assert m.sd == pytest.approx(m.sampling_sd * np.sqrt(1 + 100_000 / len(x)), rel=1e-9)
