"""Sharing a project's data: a DVC remote on a local directory (as a team would use a shared disk, S3 or SSH) carries the
pipeline's outputs and the retraining data from one clone to another."""
import pandas as pd

from conftest import copy_project, run, set_params
from mlnb.data.ingest import synthesize
from mlnb.pipeline.retrain import add_data_version


def test_a_local_directory_remote_carries_outputs_and_data_versions_to_another_clone(tmp_path, monkeypatch):
    project = copy_project(tmp_path / "alice")
    set_params(project, {"data": {"sample_rows": 700}})
    remote = tmp_path / "shared-remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    monkeypatch.chdir(project)
    rows = synthesize(50, seed=1).assign(prediction_id=[f"p{i}" for i in range(50)], labelled_at=pd.Timestamp.now(tz="UTC"))
    add_data_version(rows, project / "data/feedback/labelled.parquet", "schema/telco_churn.yaml", "churn")
    run(["dvc", "repro", "featurize"], project)
    run("git add -A && git -c user.name=a -c user.email=a@a commit -qm 'data and features' && dvc push -q", project)
    assert any(remote.rglob("*")) and not run(["dvc", "status", "-c"], project).stdout.strip().startswith("new")

    assert ".dvc/cache" not in run(["git", "ls-files"], project).stdout                     # data travels by the remote only
    bob = tmp_path / "bob"
    run(["git", "clone", "-q", str(project), str(bob)], tmp_path)
    assert not (bob / "data/feedback/labelled.parquet").exists() and not (bob / "features").exists()
    run(["dvc", "pull", "-q", "--with-deps", "featurize"], bob)            # what was run and pushed (a full run: plain `dvc pull`)
    assert (bob / "data/feedback/labelled.parquet").read_bytes() == (project / "data/feedback/labelled.parquet").read_bytes()
    assert (bob / "features/reference_profile.json").read_bytes() == (project / "features/reference_profile.json").read_bytes()
    assert "Data and pipelines are up to date" in run(["dvc", "status", "--with-deps", "featurize"], bob).stdout
    assert "didn't change, skipping" in run(["dvc", "repro", "featurize"], bob).stdout       # nothing recomputed
    assert pd.read_parquet(bob / "data/processed/train.parquet").equals(pd.read_parquet(project / "data/processed/train.parquet"))
