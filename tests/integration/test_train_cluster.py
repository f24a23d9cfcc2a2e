"""`train.cluster`: the search's fits run on a Dask cluster of separate worker processes, with the same leaderboard, scores and
model as a local run; a search killed while attached to the cluster resumes from its checkpoints (on the cluster or here); a
scheduler that cannot be reached fails before any work, naming its address."""
import json, os, subprocess, sys, textwrap, time

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, make_regression

from mlnb.core.config import ConfigError, TrainConfig, config_from_dict
from mlnb.core.errors import ClusterError
from mlnb.features.spec import FeatureSpec, model_frame
from mlnb.training.train import search_points, FAMILIES, train

CANDIDATES, N_ITER, FOLDS = ["logreg", "hgb", "rf"], 2, 3


@pytest.fixture(scope="module")
def cluster():
    "Two single-threaded worker processes on loopback, shared by the module's tests."
    from dask.distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
                      silence_logs=40) as c:
        yield c.scheduler_address


def cancer():
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    df = X.rename(columns=lambda c: c.replace(" ", "_")).assign(diagnosis=np.where(y == 1, "benign", "malignant"))
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    spec = FeatureSpec(target="diagnosis", task="binary", numeric=[c for c in df.columns if c != "diagnosis"], categorical=[], passthrough=[])
    return df[:400], df[400:], spec


def settings(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(candidates=CANDIDATES, n_iter=N_ITER, cv_folds=FOLDS, n_jobs=2, time_budget_seconds=None,
                       checkpoint_dir=str(tmp_path / "checkpoints"), **kw)


def fit_tasks(address, run):
    "What `run()` returns, and the fit tasks the scheduler ran meanwhile: (worker address, task key) pairs."
    from dask.distributed import Client, get_task_stream
    with Client(address, set_as_default=False) as client, get_task_stream(client) as stream:
        out = run()
    return out, [(t["worker"], t["key"]) for t in stream.data if "_fit_fold" in str(t["key"])]


def test_a_search_on_a_two_worker_cluster_gives_the_local_leaderboard(cluster, tmp_path):
    train_df, valid_df, spec = cancer()
    local = train(train_df, valid_df, spec, settings(tmp_path), seed=0, track=False, progress=False)
    clustered, tasks = fit_tasks(cluster, lambda: train(train_df, valid_df, spec, settings(tmp_path, cluster=cluster), seed=0,
                                                        track=False, progress=False))
    points = sum(len(search_points(FAMILIES[f], N_ITER, 0)) for f in CANDIDATES)
    assert len(tasks) == points * FOLDS, tasks                       # every cross-validation fit ran on the cluster ...
    assert len({w for w, _ in tasks}) == 2                           # ... on both workers
    pd.testing.assert_frame_equal(clustered.leaderboard(), local.leaderboard(), check_exact=True)   # scores bit for bit
    assert clustered.best.family == local.best.family and clustered.best.params == local.best.params
    assert clustered.metrics() == local.metrics() and clustered.threshold == local.threshold
    test = model_frame(valid_df, spec)
    assert np.array_equal(clustered.model.predict_proba(test), local.model.predict_proba(test))


def test_a_regression_search_on_the_cluster_gives_the_local_leaderboard(cluster, tmp_path):
    X, y = make_regression(300, n_features=5, noise=10.0, random_state=0)
    df = pd.DataFrame(X, columns=list("abcde")).assign(target=y)
    spec = FeatureSpec(target="target", task="regression", numeric=list("abcde"), categorical=[], passthrough=[])
    cfg = settings(tmp_path).model_copy(update={"candidates": ["ridge", "hgb"], "n_iter": 1})
    local = train(df[:220], df[220:], spec, cfg, seed=3, track=False, progress=False)
    clustered, tasks = fit_tasks(cluster, lambda: train(df[:220], df[220:], spec, cfg.model_copy(update={"cluster": cluster}), seed=3,
                                                        track=False, progress=False))
    assert len(tasks) == sum(len(search_points(FAMILIES[f], 1, 3)) for f in ("ridge", "hgb")) * FOLDS
    pd.testing.assert_frame_equal(clustered.leaderboard(), local.leaderboard(), check_exact=True)
    assert clustered.metrics() == local.metrics()


RUN = textwrap.dedent("""
    import json, sys
    import pandas as pd
    from mlnb.core.config import TrainConfig
    from mlnb.features.spec import FeatureSpec
    from mlnb.training.train import train
    folder, cluster = sys.argv[1], sys.argv[2] or None
    spec = FeatureSpec.model_validate_json(open(f"{folder}/spec.json").read())
    cfg = TrainConfig.model_validate_json(open(f"{folder}/train.json").read()).model_copy(update={"cluster": cluster})
    result = train(pd.read_parquet(f"{folder}/train.parquet"), pd.read_parquet(f"{folder}/valid.parquet"), spec, cfg, seed=0,
                   track=False, progress=False)
    json.dump({"leaderboard": result.leaderboard().to_dict("records"), "metrics": result.metrics(),
               "fit_seconds": {c.family: c.fit_seconds for c in result.candidates}}, open(f"{folder}/result.json", "w"))
""")


def run_training(folder, cluster: str | None, failpoint: str | None = None):
    env = {**os.environ, **({"MLNB_FAILPOINT": failpoint} if failpoint else {})}
    # run in `folder`, so that the mlnb imported is the one PYTHONPATH names (as the cluster's workers import it), not the cwd's;
    # output to a file, not a pipe: a killed run's orphaned helper processes (joblib's) would hold a pipe open for minutes
    with open(folder / "stderr.txt", "w") as err:
        done = subprocess.run([sys.executable, "-c", RUN, str(folder), cluster or ""], env=env, cwd=folder, stdout=err, stderr=err,
                              timeout=600)
    done.stderr = (folder / "stderr.txt").read_text()
    return done


@pytest.mark.slow
def test_a_search_killed_on_the_cluster_resumes_from_its_checkpoints_with_or_without_the_cluster(cluster, tmp_path):
    import joblib
    train_df, valid_df, spec = cancer()
    cfg = settings(tmp_path).model_copy(update={"n_iter": 1, "cv_folds": 2})
    train_df.to_parquet(tmp_path / "train.parquet"); valid_df.to_parquet(tmp_path / "valid.parquet")
    (tmp_path / "spec.json").write_text(spec.model_dump_json()); (tmp_path / "train.json").write_text(cfg.model_dump_json())

    killed = run_training(tmp_path, cluster, "train:family:logreg")       # SIGKILL on the cluster, after the first family's search
    assert killed.returncode == -9, killed.stderr[-2000:]
    (ck,) = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in ck.iterdir()) == ["family-logreg.joblib"]
    searched = {"logreg": joblib.load(ck / "family-logreg.joblib").fit_seconds}

    killed = run_training(tmp_path, None, "train:family:hgb")             # resumed here (the same checkpoints), killed again
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in ck.iterdir()) == ["family-hgb.joblib", "family-logreg.joblib"]
    searched["hgb"] = joblib.load(ck / "family-hgb.joblib").fit_seconds

    done = run_training(tmp_path, cluster)                                # and finished on the cluster
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((tmp_path / "result.json").read_text())
    assert {f: resumed["fit_seconds"][f] for f in searched} == searched  # neither search ran again
    assert not ck.exists()

    uninterrupted = train(train_df, valid_df, spec, cfg, seed=0, track=False, progress=False, checkpoints=False)
    board = json.loads(json.dumps(uninterrupted.leaderboard().to_dict("records")))
    assert resumed["leaderboard"] == board and resumed["metrics"] == uninterrupted.metrics()
    from dask.distributed import Client
    with Client(cluster, set_as_default=False) as client:                  # the client's SIGKILLs left the cluster working
        assert len(client.scheduler_info()["workers"]) == 2 and client.submit(sum, [1, 2]).result(timeout=30) == 3


def test_a_bad_cluster_setting_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.cluster.*scheduler address such as tcp://"):
        config_from_dict({"train": {"cluster": "dask-scheduler:8786"}})


@pytest.mark.slow
def test_an_unreachable_scheduler_fails_before_any_search_naming_its_address(tmp_path):
    import socket
    with socket.socket() as s:                                             # a port nobody listens on
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    train_df, valid_df, spec = cancer()
    cfg = settings(tmp_path, cluster=f"tcp://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler tcp://127.0.0.1:{port}"):
        train(train_df, valid_df, spec, cfg, seed=0, track=False, progress=False)
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("*.joblib"))
