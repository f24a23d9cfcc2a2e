"""A log file whose rows do not all name a model version (written by an older server, or by hand): both passes of the
monitor count those rows under "unknown", and the first pass does not fail."""
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlnb.core.config import MonitorConfig
from mlnb.data.ingest import synthesize
from mlnb.features.spec import Profile
from mlnb.monitoring.check import WindowPlan, summarize_window, version_plan, window_versions
from mlnb.predlog.log import log_files

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_rows_without_a_version_are_counted_as_unknown_in_both_passes(tmp_path):
    traffic = synthesize(400, seed=3).drop(columns="churn")
    versions = pa.array(["1"] * 250 + [None] * 150, pa.string())
    cols = {"prediction_id": pa.array([f"p{i}" for i in range(400)]),
            "timestamp": pa.array(np.int64(START.timestamp() * 1e6) + np.arange(400), pa.timestamp("us", tz="UTC")),
            "model_name": pa.array(["churn"] * 400), "model_version": versions, "variant": pa.array(["champion"] * 400)}
    for c in traffic.columns:
        v = traffic[c]
        cols[f"input.{c}"] = (pa.array(v.to_numpy(float), pa.float64(), from_pandas=True) if v.dtype.kind in "fiub"
                              else pa.array(v.astype(object).where(v.notna(), None), pa.string()))
    cols["proba.Yes"] = pa.array(np.random.default_rng(0).random(400))
    day = tmp_path / "predictions" / "date=2026-11-01"; day.mkdir(parents=True)
    pq.write_table(pa.table(cols), day / "predictions-20261101T000000000000-1-000000.parquet")
    files = log_files(tmp_path / "predictions")

    _, seen = window_versions(files, None, START, START + timedelta(days=1))
    assert {v: n for v, (n, _) in seen.items()} == {"1": 250, "unknown": 150}

    reference = Profile.from_frame(synthesize(2000, seed=1).drop(columns="churn"))
    columns = ["prediction_id", "timestamp", "model_version", *reference.columns, "proba.Yes"]
    plan = version_plan(reference, columns, MonitorConfig(), np.random.default_rng(1).random(500), "Yes")
    parts = summarize_window(files, WindowPlan(START, START + timedelta(days=1), {"1": plan, "unknown": plan}))
    assert {v: p.rows for v, p in parts.items()} == {"1": 250, "unknown": 150}
