"""Data drift against ground truth from the synthetic generator: false alarms on iid samples, and the drift that was made found."""
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from mlnb.features.spec import Profile
from mlnb.stats.drift import drift_report
from mlnb.data.ingest import synthesize

FEATURES = [c for c in synthesize(10).columns if c != "churn"]


@pytest.mark.parametrize("reference_rows", [1000, 5000])
def test_iid_samples_raise_no_dataset_drift_in_40_seeds(reference_rows):
    alarms, column_alarms, tested = 0, 0, 0
    for seed in range(40):
        ref = Profile.from_frame(synthesize(reference_rows, seed=10_000 + seed), FEATURES)
        report = drift_report(ref, synthesize(5000, seed=seed)[FEATURES])
        alarms += report.dataset_drift
        column_alarms += len(report.drifted_columns); tested += len(report.columns)
    assert alarms <= 2, alarms                                    # a false-alarm rate of at most 5%
    assert column_alarms / tested <= (0.08 if reference_rows <= 1000 else 0.01), column_alarms / tested


@pytest.mark.parametrize("reference_rows", [1000, 5000])
@pytest.mark.parametrize("column", ["tenure", "monthly_charges"])
def test_a_half_sd_mean_shift_in_one_feature_is_found_at_5000_rows(reference_rows, column):
    found = 0
    for seed in range(10):
        ref = Profile.from_frame(synthesize(reference_rows, seed=100 + seed), FEATURES)
        report = drift_report(ref, synthesize(5000, seed=seed, shift={column: 0.5})[FEATURES])
        found += column in report.drifted_columns
        assert report.table().loc[column, "test"] == ("ks" if reference_rows <= 1000 else "wasserstein")
    assert found == 10


def test_a_ten_point_category_share_change_is_found_at_5000_rows():
    found = 0
    for seed in range(10):
        ref = Profile.from_frame(synthesize(1000, seed=100 + seed), FEATURES)
        report = drift_report(ref, synthesize(5000, seed=seed, shares={"payment_method": {"Electronic check": 0.10}})[FEATURES])
        found += "payment_method" in report.drifted_columns
        assert report.table().loc["payment_method", "test"] == "chisquare"
    assert found == 10


def test_at_a_large_reference_a_ten_point_category_change_needs_a_lower_jensen_shannon_threshold():
    """Evidently's default for references above 1,000 rows (Jensen-Shannon distance, drifted at 0.1) cannot see a 10-point
    share change (distance about 0.07-0.09); a per-column threshold of 0.05 finds it every time without false alarms."""
    override = {"payment_method": {"test": "jensenshannon", "threshold": 0.05}}
    default_found = found = false_alarms = 0
    for seed in range(10):
        ref = Profile.from_frame(synthesize(5000, seed=100 + seed), FEATURES)
        current = synthesize(5000, seed=seed, shares={"payment_method": {"Electronic check": 0.10}})[FEATURES]
        default_found += "payment_method" in drift_report(ref, current).drifted_columns
        found += "payment_method" in drift_report(ref, current, override).drifted_columns
        false_alarms += "payment_method" in drift_report(ref, synthesize(5000, seed=seed)[FEATURES], override).drifted_columns
    assert default_found == 0 and found == 10 and false_alarms == 0


def test_binary_columns_use_the_two_proportion_z_test_and_large_references_jensen_shannon():
    small = drift_report(Profile.from_frame(synthesize(800, seed=1), FEATURES), synthesize(5000, seed=2, shares={"senior_citizen": {"1": 0.1}})[FEATURES])
    row = small.table().loc["senior_citizen"]
    assert row["test"] == "z" and row["drifted"]
    ref_df, cur_df = synthesize(20_000, seed=1), synthesize(20_000, seed=2, shares={"contract": {"Month-to-month": 0.25}})
    large = drift_report(Profile.from_frame(ref_df, FEATURES), cur_df[FEATURES])
    r, c = ref_df["contract"].value_counts(normalize=True).sort_index(), cur_df["contract"].value_counts(normalize=True).sort_index()
    row = large.table().loc["contract"]
    assert row["test"] == "jensenshannon" and abs(row["statistic"] - jensenshannon(r, c)) < 1e-9 and row["drifted"]


def test_chunked_parquet_and_a_saved_profile_give_the_same_report(tmp_path):
    ref = Profile.from_frame(synthesize(900, seed=3), FEATURES)
    ref = Profile.load(ref.save(tmp_path / "profile.json"))
    cur = synthesize(30_000, seed=4, shift={"tenure": 0.2})[FEATURES]
    for i in range(3): cur.iloc[i * 10_000:(i + 1) * 10_000].to_parquet(tmp_path / f"part-{i}.parquet")
    whole, parts = drift_report(ref, cur), drift_report(ref, sorted(tmp_path.glob("part-*.parquet")))
    pd.testing.assert_frame_equal(whole.table(), parts.table())
    exact = ks_2samp(np.array(ref.columns["tenure"].values), cur["tenure"].to_numpy(float))
    assert abs(whole.table().loc["tenure", "statistic"] - exact.pvalue) <= 1e-6 + 1e-3 * exact.pvalue


def test_overrides_psi_and_bad_input_are_named():
    ref = Profile.from_frame(synthesize(5000, seed=5), FEATURES)
    cur = synthesize(5000, seed=6, shift={"monthly_charges": 0.5})[FEATURES]
    report = drift_report(ref, cur, overrides={"monthly_charges": {"test": "psi", "threshold": 0.05}, "tenure": {"threshold": 0.9}})
    t = report.table()
    assert t.loc["monthly_charges", "test"] == "psi" and t.loc["monthly_charges", "threshold"] == 0.05 and t.loc["monthly_charges", "drifted"]
    assert t.loc["tenure", "threshold"] == 0.9
    assert set(drift_report(ref, cur, psi_all=True).table()["test"]) == {"psi"}
    with pytest.raises(ValueError, match="lacks reference column"): drift_report(ref, cur.drop(columns=["tenure"]))
    with pytest.raises(ValueError, match="overrides name columns the reference does not have"): drift_report(ref, cur, overrides={"zip": {}})
    with pytest.raises(ValueError, match="unknown drift test 'tt'"): drift_report(ref, cur, overrides={"tenure": {"test": "tt"}})
    with pytest.raises(ValueError, match="empty"): drift_report(ref, cur.iloc[:0])
