"""`mlnb batch-predict` on real Dask clusters: a LocalCluster, and a `dask scheduler` with two `dask worker` processes
started here; row-for-row equality with an in-process ONNX Runtime session, bad rows, resumption after SIGKILL."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import BIN, ROOT, run, tool_env
from mlnb.pipeline.batch import BatchError, batch_predict
from mlnb.core.config import config_from_dict
from mlnb.data.schema import load_schema
from mlnb.data.ingest import synthesize
from mlnb.model.onnx import OnnxModel
from mlnb.features.spec import feature_spec, model_frame
from mlnb.serving.runtime import load_served_model
from serving import free_port, signed_model_dir


@pytest.fixture(scope="module")
def spec():
    return feature_spec(load_schema(ROOT / "schema/telco_churn.yaml"), config_from_dict({}).features, "churn", "binary")


@pytest.fixture
def signed(onnx_models, tmp_path):
    return signed_model_dir(onnx_models["a"], tmp_path / "model", tmp_path / "keys")


def write_files(root, frames: list[pd.DataFrame], row_group: int) -> list:
    root.mkdir(parents=True, exist_ok=True)
    for i, df in enumerate(frames): df.to_parquet(root / f"in-{i:02d}.parquet", row_group_size=row_group, index=False)
    return sorted(root.glob("*.parquet"))


def customers(n: int, seed: int) -> pd.DataFrame:
    return synthesize(n, seed=seed).drop(columns="churn").assign(customer_id=lambda d: [f"c{seed}-{i}" for i in range(len(d))])


def expected(model_path, spec, frames) -> np.ndarray:
    return OnnxModel(model_path).run(model_frame(pd.concat(frames, ignore_index=True), spec))["probabilities"][:, 1]


def read_output(out) -> pd.DataFrame:
    df = pd.read_parquet(out)
    return df.sort_values(["source_file", "source_row"], key=lambda s: s.astype(str) if s.name == "source_file" else s).reset_index(drop=True)


def test_many_partitions_on_a_local_cluster_equal_in_process_predictions_row_for_row(signed, spec, tmp_path):
    frames = [customers(2500, seed) for seed in range(8)]
    write_files(tmp_path / "in", frames, row_group=500)
    model = load_served_model(signed / "model.onnx", tmp_path / "keys/signing.pub", name="churn", version="7")
    result = batch_predict(model, tmp_path / "in", tmp_path / "out", workers=2, rows_per_piece=1000, keep=("customer_id",), progress=False)
    assert (result.pieces, result.pieces_run, result.rows, result.scored, result.bad, result.workers) == (24, 24, 20000, 20000, 0, 2)
    out = read_output(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 24
    assert np.allclose(out["probability_Yes"], expected(signed / "model.onnx", spec, frames), atol=1e-6)
    assert np.allclose(out["probability_Yes"] + out["probability_No"], 1, atol=1e-5)
    labels = OnnxModel(signed / "model.onnx").run(model_frame(pd.concat(frames, ignore_index=True), spec))["label"]
    assert (out["label"].astype(str).to_numpy() == labels).all()                       # the graph's decision, row for row
    assert list(out["customer_id"]) == list(pd.concat(frames)["customer_id"])
    assert out["prediction_id"].is_unique and out["prediction_id"].str.startswith(result.batch_id).all()
    assert set(out["model_name"].astype(str)) == {"churn"} and set(out["model_version"].astype(str)) == {"7"}
    assert json.loads((tmp_path / "out/_batch.json").read_text())["scored"] == 20000


def test_the_cli_runs_on_an_explicit_scheduler_with_two_worker_processes_and_writes_a_report(signed, spec, tmp_path):
    frames = [customers(3000, seed) for seed in range(3)]
    write_files(tmp_path / "in", frames, row_group=1000)
    port = free_port()
    env = {**tool_env(), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers = subprocess.Popen([str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                               env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from dask.distributed import Client
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
            pids = set(c.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids                 # two separate worker processes
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"registry": {"public_key": str(tmp_path / "keys/signing.pub")}}))
        shutil_copy_stage(tmp_path)
        out = run(["mlnb", "batch-predict", "--model", str(signed / "model.onnx"), "--input", str(tmp_path / "in/*.parquet"),
                   "--output", str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{port}", "--rows-per-piece", "1000",
                   "--keep", "customer_id", "--no-progress", "--report"], tmp_path)
        assert "9,000 of 9,000 rows scored" in out.stdout and "on 2 workers" in out.stdout, out.stdout
        summary = json.loads((tmp_path / "out/_batch.json").read_text())
        assert summary["workers"] == 2 and summary["pieces"] == 9 and summary["rows_per_second"] > 0
        assert np.allclose(read_output(tmp_path / "out")["probability_Yes"], expected(signed / "model.onnx", spec, frames), atol=1e-6)
        html = (tmp_path / "out/_report/08_batch.html").read_text()
        assert "image/png" in html and "9000.0" in html          # the plot, and the scores described
        assert "worker phase (summed over workers)" in html and "imports" in html                  # where the time went
        assert summary["phases"]["scoring"] > 0 and summary["worker_phases"]["score"]["cpu"] > 0
    finally:
        for p in (workers, scheduler):
            os.killpg(p.pid, signal.SIGTERM); p.wait(30)


def shutil_copy_stage(root):
    import shutil
    (root / "nbs/stages").mkdir(parents=True)
    shutil.copy(ROOT / "nbs/stages/08_batch.ipynb", root / "nbs/stages")


def test_a_run_killed_midway_resumes_without_rescoring_finished_pieces(signed, spec, tmp_path):
    frames = [customers(4000, seed) for seed in range(10)]
    write_files(tmp_path / "in", frames, row_group=250)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"registry": {"public_key": str(tmp_path / "keys/signing.pub")}}))
    cmd = [str(BIN / "mlnb"), "batch-predict", "--model", str(signed / "model.onnx"), "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "out"), "--workers", "1", "--rows-per-piece", "250", "--no-progress"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while len(list((tmp_path / "out").glob("part-*.parquet"))) < 20 and time.time() < deadline and first.poll() is None: time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL); first.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    assert 20 <= len(done) < 160, len(done)                                  # killed midway

    out = run(cmd, tmp_path)
    summary = json.loads((tmp_path / "out/_batch.json").read_text())
    assert summary["pieces"] == 160 and summary["pieces_run"] == 160 - len(done) and summary["scored"] == 40000, (summary, out.stdout)
    assert all((tmp_path / "out" / name).stat().st_mtime_ns == mtime for name, mtime in done.items())   # not rescored
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert np.allclose(read_output(tmp_path / "out")["probability_Yes"], expected(signed / "model.onnx", spec, frames), atol=1e-6)
    again = run(cmd, tmp_path)
    assert "0 run now" in again.stdout


def test_bad_rows_are_counted_and_sampled_and_never_scored(signed, spec, tmp_path):
    df = customers(1000, seed=3)
    df["tenure"] = df["tenure"].astype(float)
    df.loc[[5, 6], "tenure"] = np.nan                      # tenure may not be missing
    df.loc[10, "monthly_charges"] = np.inf
    df.loc[20, "contract"] = None                           # contract may not be missing
    df.loc[30, "total_charges"] = np.nan                    # total_charges may (the schema says so): scored
    df.loc[40, "payment_method"] = "Bitcoin"                # an unknown category: scored, counted
    text = df.astype({"monthly_charges": str})
    text.loc[50, "monthly_charges"] = "n/a"                 # a number stored as text, unreadable
    write_files(tmp_path / "in", [text], row_group=400)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"registry": {"public_key": str(tmp_path / "keys/signing.pub")}}))
    res = run(["mlnb", "batch-predict", "--model", str(signed / "model.onnx"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
               "--workers", "1", "--no-progress", "--fail-on-bad"], tmp_path, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "995 of 1,000 rows scored" in res.stdout and "5 bad rows not scored" in res.stdout and "payment_method 1" in res.stdout
    summary = json.loads((tmp_path / "out/_batch.json").read_text())
    assert summary["bad_by_reason"] == {"tenure: missing": 2, "monthly_charges: not a finite number": 1, "contract: missing": 1,
                                        "monthly_charges: not a number": 1}
    bad = pd.read_parquet(tmp_path / "out/_bad_rows.parquet").sort_values("source_row")
    assert list(bad["source_row"]) == [5, 6, 10, 20, 50] and bad.loc[bad["source_row"] == 50, "monthly_charges"].item() == "n/a"
    out = read_output(tmp_path / "out")
    assert len(out) == 995 and not out["source_row"].isin([5, 6, 10, 20, 50]).any() and {30, 40} <= set(out["source_row"])
    good = df.drop(index=[5, 6, 10, 20, 50])
    assert np.allclose(out["probability_Yes"], expected(signed / "model.onnx", spec, [good]), atol=1e-6)


def test_bad_input_and_a_changed_input_are_named_and_nothing_is_mixed(signed, tmp_path):
    model = load_served_model(signed / "model.onnx", tmp_path / "keys/signing.pub")
    with pytest.raises(BatchError, match="no Parquet files found"):
        batch_predict(model, tmp_path / "nothing/*.parquet", tmp_path / "out", workers=1, progress=False)
    write_files(tmp_path / "in", [customers(300, 1).drop(columns=["tenure"])], row_group=100)
    with pytest.raises(BatchError, match=r"in-00.parquet: missing column\(s\) \['tenure'\]"):
        batch_predict(model, tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    write_files(tmp_path / "in", [customers(300, 1)], row_group=100)
    batch_predict(model, tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    write_files(tmp_path / "in", [customers(400, 2)], row_group=100)               # the input changed
    with pytest.raises(BatchError, match="holds a batch run with other input files"):
        batch_predict(model, tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert pq.read_metadata(tmp_path / "out/part-00000.parquet").num_rows == 300          # the earlier run, untouched
    r = batch_predict(model, tmp_path / "in", tmp_path / "out", workers=1, progress=False, overwrite=True, rows_per_piece=100)
    assert r.rows == 400 and len(list((tmp_path / "out").glob("part-*.parquet"))) == 4
    with pytest.raises(BatchError, match="already model inputs"):
        batch_predict(model, tmp_path / "in", tmp_path / "out2", workers=1, progress=False, keep=("tenure",))
