"""The closed loop on a real project: `dvc repro` registers a champion, a real `mlnb serve` answers drifted traffic and takes
feedback labels, `mlnb monitor` flags the drift and retrains (new DVC data version, `dvc repro`, a gated candidate), an
approver's approval makes it the challenger, and the server starts a canary rollout of it on its own."""
import json
import os

import pandas as pd
import pytest
import yaml

from conftest import copy_project, deep_update, run, tool_env
from mlnb.core.access import User, Users, hash_secret
from mlnb.core.audit import AuditLog
from mlnb.core.config import load_config
from mlnb.data.schema import DataError
from mlnb.data.ingest import synthesize
from mlnb.features.spec import FeatureSpec, model_frame
from mlnb.pipeline.retrain import RetrainError, add_data_version, labelled_traffic, retrain
from mlnb.predlog.log import read_log
from serving import Server, wait_for

APPROVER_SECRET = "approver-secret"


def loop_params(project) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    return deep_update(params, {
        # all rows, so that the retrained model sees the new labels; one quick model family
        "train": {"candidates": ["logreg"], "n_iter": 1, "cv_folds": 2}, "evaluate": {"permutation_repeats": 1},
        "registry": {"gates": {"max_metric_drop": 0.05}},
        "serve": {"reload_poll_seconds": 1, "prediction_log": {"flush_seconds": 0.2},
                  "rollout": {"mode": "canary", "auto_start": True, "canary_timeout_ms": 2000,
                              "plan": {"steps": [0.5, 1.0], "min_requests": 10000, "min_seconds": 3600}}},
        "monitor": {"window_hours": 1, "min_rows": 300, "min_labelled": 200},
        "retrain": {"triggers": ["dataset_drift", "feature_drift", "accuracy_decay"], "min_new_labels": 300}})


def send(client, frame: pd.DataFrame, spec: FeatureSpec, batch: int = 50) -> list[str]:
    "Each batch as one MLflow request; the prediction ids."
    ids = []
    for start in range(0, len(frame), batch):
        records = json.loads(model_frame(frame.iloc[start:start + batch], spec).to_json(orient="records"))
        r = client.post("/invocations", json={"dataframe_records": records})
        assert r.status_code == 200, r.text
        ids += [p["prediction_id"] for p in r.json()["predictions"]]
    return ids


@pytest.mark.slow
def test_drift_is_flagged_retrained_gated_and_after_approval_rolled_out_as_canary(tmp_path):
    project = copy_project(tmp_path / "project")
    Users(default_roles=["viewer", "data-scientist"],
          users={"ann": User(roles=["approver"], secret_hash=hash_secret(APPROVER_SECRET))}).save(project / "registry/users.yaml")
    params = loop_params(project)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)
    assert json.loads((project / "models/registration.json").read_text())["aliases"] == ["champion"]
    spec = FeatureSpec.load(project / "features/feature_spec.json")

    server = Server(project, params).wait_ready()
    try:
        # drifted traffic whose customers also churn far more than the model expects
        drifted = synthesize(600, seed=11, shift={"tenure": -0.8, "monthly_charges": 0.8}, shares={"contract": {"Month-to-month": 0.3}},
                             churn_offset=2.0)
        ids = send(server.client, drifted, spec)
        for start in range(0, len(ids), 200):
            server.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": a} for i, a in
                                                               zip(ids[start:start + 200], drifted["churn"].iloc[start:start + 200])]}).raise_for_status()
        wait_for(lambda: len(read_log(project / "serving/feedback")) == 600 and len(read_log(project / "serving/predictions")) == 600,
                 30, "the logs to reach disk")

        out = run(["mlnb", "monitor", "--hours", "1"], project)
        result = json.loads((project / "monitoring/latest.json").read_text())
        assert result["rows"] == 600 and {"tenure", "contract"} <= set(result["drift"]["drifted_columns"]), result["drift"]
        assert "retraining (monitor alert:" in out.stdout and "awaiting_approval" in out.stdout, out.stdout

        # the server exposes the check's gauges
        metrics = server.client.get("/metrics").text
        assert 'mlnb_monitor_feature_drifted{column="tenure"} 1.0' in metrics and "mlnb_monitor_window_rows 600.0" in metrics

        # a new DVC-tracked data version, staged in git, that the pipeline trained on
        labelled = pd.read_parquet(project / "data/feedback/labelled.parquet")
        assert len(labelled) == 600 and set(labelled["prediction_id"]) == set(ids)
        assert (labelled["churn"].to_numpy() == drifted["churn"].to_numpy()).all()
        dvcfile = yaml.safe_load((project / "data/feedback/labelled.parquet.dvc").read_text())
        staged = run(["git", "diff", "--cached", "--name-only"], project).stdout.split()
        assert "data/feedback/labelled.parquet.dvc" in staged
        assert json.loads((project / "data/processed/cleaning.json").read_text())["feedback_rows"] == 600
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        assert any(d["path"] == "data/feedback" for d in lock["stages"]["ingest"]["deps"])

        # registered, gated, waiting for an approver; every step audited under one run id
        show = run(["mlnb", "registry", "show", "churn", "2"], project).stdout
        assert "churn v2: candidate" in show and "  gate " in show and "FAIL" not in show, show
        audit = AuditLog(project / "registry/audit.jsonl").entries()
        steps = [e for e in audit if e["action"].startswith("retrain-")]
        assert [e["action"] for e in steps] == ["retrain-start", "retrain-data", "retrain-pipeline", "retrain-registered", "retrain-done"]
        assert len({e["details"]["run"] for e in steps}) == 1 and steps[1]["details"]["md5"] == dvcfile["outs"][0]["md5"]
        assert steps[-1]["details"]["status"] == "awaiting_approval" and steps[-1]["details"]["version"] == "2"
        assert server.client.get("/admin/rollout").json()["challenger"] is None      # nothing rolls out before the approval

        # the same labels again add nothing
        again = run(["mlnb", "retrain", "--reason", "again"], project)
        assert "skipped" in again.stdout and "0 new labelled rows" in again.stdout

        # the approver's decision makes it the challenger; the server notices and starts the canary
        env = {**tool_env(), "MLNB_SECRET": APPROVER_SECRET}
        run(["mlnb", "registry", "approve", "churn", "2", "--reason", "retrained on drifted traffic", "--user", "ann"], project, env=env)
        move = [e for e in AuditLog(project / "registry/audit.jsonl").entries() if e["action"] == "promote"][-1]
        assert move["actor"] == "ann" and move["details"]["policy"] == "mlnb:retrain"           # the approver moved it, for the policy
        assert move["details"]["alias"] == "challenger" and move["details"]["version"] == "2"
        status = wait_for(lambda: (s := server.client.get("/admin/rollout").json())["rollout"] and s, 30, "the canary to start")
        assert status["mode"] == "canary" and status["challenger"]["version"] == "2"
        assert status["rollout"]["state"] == "running" and status["rollout"]["share"] == 0.5
        versions = {server.client.post("/invocations", headers={"x-routing-key": f"k{i}"},
                                       json={"dataframe_records": json.loads(model_frame(drifted.iloc[[i]], spec).to_json(orient="records"))}).json()["model_version"]
                    for i in range(40)}
        assert versions == {"1", "2"}
    finally:
        assert server.stop() in (0, -15, 143), server.stderr()


def labelled_log(root, frame: pd.DataFrame, labels: list) -> None:
    "A prediction log and a feedback log laid out as the server writes them."
    day = "date=2026-11-01"
    (root / "predictions" / day).mkdir(parents=True); (root / "feedback" / day).mkdir(parents=True)
    ids = [f"p{i}" for i in range(len(frame))]
    pd.DataFrame({"prediction_id": ids, "timestamp": pd.Timestamp.now(tz="UTC"), "variant": "champion",
                  **{f"input.{c}": frame[c] for c in frame.columns if c != "churn"}}).to_parquet(root / "predictions" / day / "a.parquet")
    pd.DataFrame({"prediction_id": ids[:len(labels)], "actual": labels, "timestamp": pd.Timestamp.now(tz="UTC")}).to_parquet(root / "feedback" / day / "a.parquet")


def test_a_bad_label_is_named_and_changes_nothing_and_each_append_is_a_new_dvc_version(tmp_path):
    project = copy_project(tmp_path / "project")
    os.chdir(project)
    try:
        frame = synthesize(40, seed=5)
        labelled_log(tmp_path / "logs", frame, ["Yes", "No"] * 19 + ["Maybe", "No"])
        features = [c for c in frame.columns if c != "churn"]
        rows = labelled_traffic(tmp_path / "logs/predictions", tmp_path / "logs/feedback", features, "churn")
        target = project / "data/feedback/labelled.parquet"
        with pytest.raises(DataError, match="churn"):
            add_data_version(rows, target, "schema/telco_churn.yaml", "churn")
        assert not target.exists() and not target.with_name("labelled.parquet.dvc").exists()

        n1, md5_1 = add_data_version(rows.iloc[:20], target, "schema/telco_churn.yaml", "churn")
        n2, md5_2 = add_data_version(rows.iloc[20:30], target, "schema/telco_churn.yaml", "churn")
        assert (n1, n2) == (20, 30) and md5_1 != md5_2
        assert yaml.safe_load(target.with_name("labelled.parquet.dvc").read_text())["outs"][0]["md5"] == md5_2
        assert (project / ".dvc/cache").exists() and "data/feedback/labelled.parquet.dvc" in run(["git", "diff", "--cached", "--name-only"], project).stdout
    finally:
        os.chdir(tmp_path)


def test_too_few_labels_skip_retraining_with_an_audited_reason_and_bad_settings_are_named(tmp_path):
    project = copy_project(tmp_path / "project", git=False)
    os.chdir(project)
    try:
        labelled_log(project / "serving", synthesize(30, seed=6), ["Yes"] * 30)
        cfg = load_config("params.yaml")
        result = retrain(cfg, "manual: test")
        assert result.status == "skipped" and result.new_rows == 30 and "fewer than retrain.min_new_labels (200)" in result.detail
        (entry,) = AuditLog(cfg.registry.audit_log).entries()
        assert entry["action"] == "retrain-skipped" and entry["details"]["new_rows"] == 30
        assert not (project / "data/feedback/labelled.parquet").exists()

        off = cfg.model_copy(update={"data": cfg.data.model_copy(update={"feedback": None})})
        with pytest.raises(RetrainError, match="data.feedback is null"):
            retrain(off, "manual: test")
        failed = run(["mlnb", "retrain", "--params", "nope.yaml"], project, check=False)
        assert failed.returncode != 0 and "nope.yaml" in (failed.stdout + failed.stderr)
    finally:
        os.chdir(tmp_path)
