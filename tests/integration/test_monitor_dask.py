"""Monitoring summaries per log file on a real Dask `LocalCluster` of two worker processes: a multi-file prediction log
(plain and AES-GCM sealed, written by the real `ParquetLog` writer) gives the same merged summaries, the same verdicts and
the same latest.json with and without the cluster, and the same drift as summarising the concatenated window at once."""
import contextlib
import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import yaml

from mlnb.core.config import load_config
from mlnb.data.ingest import synthesize
from mlnb.features.spec import model_frame
from mlnb.model.bundle import file_version
from mlnb.model.onnx import OnnxModel
from mlnb.monitoring.check import (WindowPlan, _feedback_ids, _plans, estimated_performance, online_performance, run_monitor,
                                   summarize_window, version_references, window_frame, window_versions)
from mlnb.predlog.log import (FeedbackEntry, ParquetLog, PredictionEntry, add_log_key, feedback_table, log_files,
                              log_keys, prediction_table, read_feedback, read_log)
from mlnb.stats.drift import drift_report
from serving import workspace

FILES, ROWS = 6, 250


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client
    from mlnb.core.cluster import local_cluster
    with local_cluster(2) as cluster, Client(cluster) as c:                  # two worker processes, mutual TLS
        yield c


def write_logs(root, encrypted: bool) -> datetime:
    "FILES files of ROWS rows (half of them shifted traffic) and feedback for a third of the rows, by the real writer."
    params = yaml.safe_load((root / "params.yaml").read_text())
    if encrypted:
        add_log_key(root / "log.key")
        params["serve"]["prediction_log"]["encryption"] = {"key_file": str(root / "log.key"), "key_env": "MLNB_TEST_NO_KEY"}
    params["monitor"] |= {"min_rows": 300, "estimation": {"enabled": True}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml")
    pl, keys = cfg.serve.prediction_log, log_keys(cfg.serve.prediction_log.encryption)
    model_path = root / "served/model.onnx"
    model, version = OnnxModel(model_path), file_version(model_path)
    spec_columns = list(model_frame(synthesize(5, seed=0), _spec(root)).columns)
    now = datetime.now(timezone.utc).timestamp()
    predictions = ParquetLog(pl.dir, prediction_table, "predictions", max_rows_per_file=ROWS, keys=keys, flush_seconds=60)
    feedback = ParquetLog(pl.feedback_dir, feedback_table, "feedback", keys=keys, flush_seconds=60)
    rng = np.random.default_rng(0)
    for n in range(FILES):
        shift = {"tenure": 0.6, "monthly_charges": 0.6} if n >= FILES // 2 else None
        frame = model_frame(synthesize(ROWS, seed=10 + n, shift=shift), _spec(root))[spec_columns]
        out = model.run(frame)
        ids = [f"p{n}-{i}" for i in range(ROWS)]
        kinds = tuple("string" if frame[c].dtype == object else "number" for c in spec_columns)
        entry = PredictionEntry(ids, now - 600 + n, "churn", version, "champion", "mlflow", 0.001, tuple(spec_columns), kinds,
                                list(frame.itertuples(index=False, name=None)), out, ["No", "Yes"])
        assert predictions.put(entry, rows=ROWS)
        chosen = rng.choice(ROWS, ROWS // 3, replace=False)
        feedback.put(FeedbackEntry([ids[i] for i in chosen], [str(out["label"][i]) for i in chosen], now - 300))
    predictions.close(); feedback.close()
    assert len(log_files(pl.dir)) == FILES and predictions.stats.write_errors == 0
    return datetime.fromtimestamp(now + 1, timezone.utc)


def _spec(root):
    from mlnb.features.spec import FeatureSpec
    return FeatureSpec.load(root / "features/feature_spec.json")


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "sealed"])
def test_per_file_summaries_on_a_cluster_equal_the_in_process_run(onnx_models, spec, client, tmp_path, encrypted):
    workspace(tmp_path, spec, onnx_models, None)
    until = write_logs(tmp_path, encrypted)
    since = until - timedelta(hours=1)
    with contextlib.chdir(tmp_path):
        cfg = load_config("params.yaml")
        pl, keys = cfg.serve.prediction_log, log_keys(cfg.serve.prediction_log.encryption)
        files = log_files(pl.dir)
        assert all(str(f).endswith(".enc") for f in files) == encrypted
        feedback, _ = read_feedback(pl.feedback_dir, keys)
        ids = _feedback_ids(feedback)
        columns, seen = window_versions(files, keys, since, until)
        assert window_versions(files, keys, since, until, client) == (columns, seen)
        (version, (rows, name)), = seen.items()
        assert (rows, name) == (FILES * ROWS, "churn")
        window = window_frame(read_log(pl.dir, since=since, keys=keys, kind="predictions"))
        references = version_references(window, cfg, cfg.paths, "served/model.onnx")
        plans = _plans(references, columns, cfg.monitor)
        plan = WindowPlan(since, until, plans)
        here, there = (summarize_window(files, plan, keys, ids, c)[version] for c in (None, client))
        whole = {c: s for c, s in here.columns.items()}
        # the cluster's merged summaries are the in-process ones, bit for bit (the same per-file code, merged in file order)
        assert here.rows == there.rows == FILES * ROWS
        for c, s in here.columns.items():
            t = there.columns[c]
            for attr in ("rows", "missing", "categories", "counts", "at_or_below", "below", "psi_counts", "low_n", "high_n",
                         "low_sum", "high_sum", "sum", "sumsq"):
                if hasattr(s, attr):
                    a, b = getattr(s, attr), getattr(t, attr)
                    assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), (c, attr)
        assert here.frame("labelled").equals(there.frame("labelled")) and here.frame("kept").equals(there.frame("kept"))
        # ... and the same drift as summarising the concatenated window at once (counts exact; float sums to rounding)
        features = plans[version].features
        at_once = drift_report(features, window[list(features.columns)]).to_dict()
        from mlnb.stats.drift import summary_report
        merged = summary_report(features, whole, here.rows).to_dict()
        assert [(c["column"], c["test"], c["drifted"], c["current_rows"], c["current_missing"]) for c in merged["columns"]] == \
            [(c["column"], c["test"], c["drifted"], c["current_rows"], c["current_missing"]) for c in at_once["columns"]]
        for a, b in zip(merged["columns"], at_once["columns"]):
            assert a["statistic"] == pytest.approx(b["statistic"], rel=1e-12, abs=1e-15), a["column"]
        assert merged["drifted_columns"] == at_once["drifted_columns"] and "tenure" in merged["drifted_columns"]

        # run_monitor: the same verdicts and latest.json with the cluster and without
        local = run_monitor(cfg, since=since, until=until, model_path="served/model.onnx")
        latest_local = json.loads((tmp_path / "monitoring/latest.json").read_text())
        remote = run_monitor(cfg, since=since, until=until, model_path="served/model.onnx", client=client)
        latest_remote = json.loads((tmp_path / "monitoring/latest.json").read_text())
        # the row-level checks on the rows gathered from the files are those of the whole window read at once, exactly
        ref, m = references[version], cfg.monitor
        mine = window[window["model_version"] == version]
        assert local.estimation == estimated_performance(mine, feedback, ref.estimator, features, m.estimation,
                                                         local.drift["drifted_columns"])
        assert local.multivariate == ref.multivariate.check(mine, m.estimation.multivariate_z).model_dump()
        assert local.performance == asdict(online_performance(mine, feedback, ref.evaluation.accuracy, ref.evaluation.rows, m))
    assert latest_local == latest_remote and local.to_dict() == remote.to_dict()
    assert local.rows == FILES * ROWS and local.verdict and latest_local["drift"]["dataset_drift"] in (True, False)
    assert "tenure" in latest_local["drift"]["drifted_columns"]
    assert latest_local["performance"]["labelled"] == FILES * (ROWS // 3)
    assert latest_local["estimation"] is not None and latest_local["multivariate"] is not None
    history = pd.read_parquet(tmp_path / "monitoring/feature_history.parquet")
    assert len(history) == 2 * len(latest_local["drift"]["columns"])            # one window's rows per run


def test_monitor_cluster_local_in_params_runs_the_window_on_its_own_cluster(onnx_models, spec, tmp_path):
    "`monitor.cluster: local`: the run starts (and stops) its own TLS cluster of workers, with the in-process run's result."
    workspace(tmp_path, spec, onnx_models, None)
    until = write_logs(tmp_path, encrypted=True)
    since = until - timedelta(hours=1)
    with contextlib.chdir(tmp_path):
        cfg = load_config("params.yaml")
        run_monitor(cfg, since=since, until=until, model_path="served/model.onnx")     # caches the reference scores (a note says so)
        local = run_monitor(cfg, since=since, until=until, model_path="served/model.onnx").to_dict()
        cfg = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"cluster": "local"})})
        assert run_monitor(cfg, since=since, until=until, model_path="served/model.onnx").to_dict() == local


def test_an_encrypted_log_is_not_sent_to_a_scheduler_without_tls(onnx_models, spec, tmp_path):
    "Workers of a plain-TCP scheduler would get the log keys and decrypted rows in the clear: refused, naming the scheduler."
    from dask.distributed import Client, LocalCluster
    from mlnb.core.errors import ClusterError
    workspace(tmp_path, spec, onnx_models, None)
    until = write_logs(tmp_path, encrypted=True)
    with contextlib.chdir(tmp_path), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as plain:
        cfg = load_config("params.yaml")
        with pytest.raises(ClusterError, match=r"scheduler tcp://127\.0\.0\.1:\d+ does not speak TLS"):
            run_monitor(cfg, since=until - timedelta(hours=1), until=until, model_path="served/model.onnx", client=plain)
        assert not (tmp_path / "monitoring/latest.json").exists()              # nothing half-written


def test_a_local_worker_keeps_the_memory_of_a_file_for_the_next(tmp_path, monkeypatch):
    """The workers `monitor.cluster: local` starts (`_monitor_client`) reuse the memory one file needed for the next,
    instead of handing it back to the kernel and faulting it in afresh (zeroed pages: the CPU a cluster run lost); also
    after another Dask cluster in this process left its own malloc setting in the environment, which is left as it was."""
    import os
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlnb.core.config import MonitorConfig
    from mlnb.features.spec import Profile
    from mlnb.monitoring.check import _monitor_client, summarize_file, version_plan

    rows, rng, start = 200_000, np.random.default_rng(0), datetime(2026, 11, 1, tzinfo=timezone.utc)
    frame = pd.DataFrame({"x": rng.normal(size=rows), "y": rng.exponential(size=rows),
                          "c": rng.choice(["a", "b", "c"], rows).astype(object)})
    micros = np.int64(start.timestamp() * 1e6) + np.arange(rows, dtype=np.int64)
    table = pa.table({"prediction_id": pa.array([f"p{i}" for i in range(rows)]), "timestamp": pa.array(micros, pa.timestamp("us", tz="UTC")),
                      "model_version": pa.array(["1"] * rows), "variant": pa.array(["champion"] * rows),
                      **{f"input.{c}": pa.array(frame[c]) for c in frame}})
    path = tmp_path / "predictions-1.parquet"
    pq.write_table(table, path, compression="zstd")
    columns = ["prediction_id", "timestamp", "model_version", *frame.columns]
    plan = WindowPlan(start, start + timedelta(days=1), {"1": version_plan(Profile.from_frame(frame.head(5000)), columns, MonitorConfig())})

    def faults(path, plan):                       # page faults of one summary, in the worker's task thread
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        summarize_file(path, plan, threads=False)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")        # what any LocalCluster with Dask's defaults leaves here
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with _monitor_client("local", 1) as client:
        counts = [client.submit(faults, str(path), plan, pure=False).result() for _ in range(4)]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    # a file of 200,000 rows reads about 10 MB of columns: afresh, that is thousands of 4 KiB pages every time
    assert max(counts[2:]) < 300, counts
