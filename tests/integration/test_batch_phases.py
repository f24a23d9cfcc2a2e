"""Batch scoring at moderate sizes (issue 21, item 4): a run says where its time went, per phase on the client and summed
over the workers; a local cluster's workers are forked with the scoring modules already imported (and without pandas);
the default piece size follows the input alone, so a run resumed on another cluster plans the same pieces; an existing
scheduler without workers is a ClusterError. Real LocalClusters with separate worker processes, real ONNX Runtime."""
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlnb.core.errors import ClusterError
from mlnb.examples import toy_frame, toy_model
from mlnb.model.onnx import OnnxModel
from mlnb.pipeline.batch import batch_predict, plan_pieces
from mlnb.serving.runtime import load_served_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    t = toy_model(d / "model", data=toy_frame(3000))
    model = load_served_model(t.model, t.public_key, name="toy", version="1")
    data = toy_frame(4000, seed=5).drop(columns="churn")
    (d / "in").mkdir()
    for i in range(4): data.iloc[i * 1000:(i + 1) * 1000].to_parquet(d / "in" / f"f{i}.parquet", row_group_size=250, index=False)
    return t, model, data, d / "in"


def test_a_run_reports_its_phases_and_a_rerun_on_another_cluster_size_finds_the_same_pieces_done(toy, tmp_path):
    t, model, data, inputs = toy
    r = batch_predict(model, inputs, tmp_path / "out", workers=2, progress=False)
    assert (r.rows, r.scored, r.bad, r.workers) == (4000, 4000, 0, 2)
    assert set(r.phases) == {"plan", "start", "setup", "scoring", "close", "summary"}, r.phases
    assert set(r.worker_phases) == {"imports", "session", "read", "check", "score", "build", "write"}, r.worker_phases
    assert all(v["wall"] >= 0 and v["cpu"] >= 0 for v in r.worker_phases.values())
    assert r.worker_phases["score"]["cpu"] > 0 and r.worker_phases["session"]["wall"] > 0
    busy = sum(r.worker_phases[k]["wall"] for k in ("read", "check", "score", "build", "write"))
    assert busy <= 2 * r.phases["scoring"] + 0.05                        # the pieces ran inside the scoring window
    assert abs(r.startup_seconds - r.phases["start"] - r.phases["setup"]) < 0.002
    saved = json.loads((tmp_path / "out/_batch.json").read_text())
    assert saved["worker_phases"]["score"] == r.worker_phases["score"]
    out = pd.read_parquet(tmp_path / "out").sort_values(["source_file", "source_row"], key=lambda s: s.astype(str) if s.name == "source_file" else s)
    assert np.allclose(out["probability_Yes"], OnnxModel(t.model).run(data)["probabilities"][:, 1], atol=1e-6)   # row for row
    again = batch_predict(model, inputs, tmp_path / "out", workers=1, progress=False)       # another cluster size: the same plan
    assert (again.pieces, again.pieces_run, again.scored, again.worker_phases) == (r.pieces, 0, 4000, {})


def test_local_cluster_workers_are_forked_with_the_scoring_modules_imported_and_without_pandas(toy, tmp_path):
    from dask.distributed import Client
    from mlnb.pipeline.batch import _start_local_cluster
    _, model, _, inputs = toy
    r = batch_predict(model, inputs, tmp_path / "out", workers=2, progress=False)
    assert r.worker_phases["imports"]["cpu"] < 0.2, r.worker_phases     # about 1 s of CPU a worker when each imports them itself
    with _start_local_cluster(2) as cluster, Client(cluster) as client:
        # a builtin, not a function of this module: unpickling one would import this module (and pandas) in the worker
        loaded = client.run(eval, "{m: m in __import__('sys').modules for m in ('mlnb.pipeline.batch', 'onnxruntime', 'pandas', 'pydantic')}")
        pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()             # two worker processes
    assert all(v == {"mlnb.pipeline.batch": True, "onnxruntime": True, "pandas": False, "pydantic": False} for v in loaded.values()), loaded


def test_the_default_piece_size_follows_the_input_alone(tmp_path):
    from mlnb.pipeline.batch import _piece_rows
    pq.write_table(pa.table({"x": np.zeros(2_000_000, np.int8)}), tmp_path / "big.parquet", row_group_size=250_000)
    files = [tmp_path / "big.parquet"]
    assert _piece_rows(files) == 125_000
    assert len(plan_pieces(files, _piece_rows(files))) == 8              # one row group each: two workers end within half a piece
    pq.write_table(pa.table({"x": np.zeros(1000, np.int8)}), tmp_path / "small.parquet", row_group_size=100)
    assert _piece_rows([tmp_path / "small.parquet"]) == 65_536


def test_an_existing_scheduler_without_workers_is_a_cluster_error_before_anything_is_scored(toy, tmp_path):
    from dask.distributed import LocalCluster
    _, model, _, inputs = toy
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None, host="127.0.0.1") as empty:
        with pytest.raises(ClusterError, match="has no workers"):
            batch_predict(model, inputs, tmp_path / "out", scheduler=empty.scheduler_address, progress=False)
    assert not list((tmp_path / "out").glob("part-*.parquet"))


@pytest.mark.slow
def test_an_unreachable_scheduler_is_a_cluster_error_naming_it(toy, tmp_path):
    import socket
    _, model, _, inputs = toy
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); address = f"tcp://127.0.0.1:{s.getsockname()[1]}"    # nothing listens there once closed
    with pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler {address}"):
        batch_predict(model, inputs, tmp_path / "out", scheduler=address, progress=False)



def test_pieces_are_handed_out_largest_first_so_a_short_piece_ends_the_run(toy, tmp_path):
    t, model, data, _ = toy
    (tmp_path / "in").mkdir()
    data.iloc[:1100].to_parquet(tmp_path / "in/a.parquet", row_group_size=500, index=False)      # pieces of 500, 500, 100 rows
    data.iloc[1100:3000].to_parquet(tmp_path / "in/b.parquet", row_group_size=950, index=False)  # 950, 950
    batch_predict(model, tmp_path / "in", tmp_path / "out", workers=1, rows_per_piece=1, progress=False)
    parts = sorted((tmp_path / "out").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns)    # one worker: the order run
    assert [pq.read_metadata(p).num_rows for p in parts] == [950, 950, 500, 500, 100]
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in (3, 4, 0, 1, 2)]          # ties in plan order


def test_given_a_loader_the_local_cluster_starts_while_the_model_loads_and_is_closed_if_loading_fails(toy, tmp_path):
    import time
    import psutil
    _, model, _, inputs = toy
    def workers_appear() -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if psutil.Process().children(recursive=True): return True          # the fork server, then the workers
            time.sleep(0.05)
        return False
    seen = {}
    def loader():
        seen["started while loading"] = workers_appear()
        return model
    r = batch_predict(loader, inputs, tmp_path / "out", workers=2, progress=False)
    assert seen == {"started while loading": True} and r.scored == 4000 and r.workers == 2
    assert set(r.phases) == {"load", "plan", "start", "setup", "scoring", "close", "summary"}, r.phases
    def refused():
        workers_appear()
        raise ValueError("signature does not verify")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="signature does not verify"):
        batch_predict(refused, inputs, tmp_path / "out2", workers=2, progress=False)
    assert not (tmp_path / "out2").exists()
    time.sleep(1.0)
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    workers = [p for p in new if p.ppid() != os.getpid()]          # the fork server and the resource tracker stay: this process's
    assert not workers, [(p.pid, p.ppid()) for p in workers]       # the cluster it started is closed: no worker left
