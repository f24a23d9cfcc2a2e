"""The loop before any label exists, on a real project and a real `mlnb serve`: `dvc repro` registers a champion that
carries its estimator; the server answers traffic whose customers moved to where the model is less right; `mlnb monitor`
estimates the drop without a single feedback label, and its `estimated_performance_drop` trigger retrains at once
(`retrain.without_labels`), quoting what fired in the audit log. The retraining reads a broken extract of the source (the
labels shuffled, as a bad upstream join would leave them), and the gates are loosened here so that its worse model gets
through them: the server's canary then judges the challenger by its estimated performance on the same traffic, pauses it
and rolls it back, still with no label at all."""
import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import copy_project, deep_update, run
from mlnb.core.audit import AuditLog
from mlnb.data.ingest import synthesize
from mlnb.features.spec import FeatureSpec, model_frame
from mlnb.predlog.log import read_log
from serving import Server, wait_for

pytestmark = pytest.mark.slow

SHIFT = dict(shift={"tenure": -0.8, "monthly_charges": 0.8}, shares={"contract": {"Month-to-month": 0.3}})


def params_for(project) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    return deep_update(params, {
        "train": {"candidates": ["logreg"], "n_iter": 1, "cv_folds": 2}, "evaluate": {"permutation_repeats": 1},
        # loosened so that the broken extract's model becomes the challenger: the rollout is what must stop it
        "registry": {"gates": {"max_metric_drop": 1.0, "min_demographic_parity_ratio": 0.0, "max_flip_rate": None,
                               "max_categorical_flip_rate": None}},
        "serve": {"reload_poll_seconds": 1, "prediction_log": {"flush_seconds": 0.2},
                  "rollout": {"mode": "canary", "auto_start": True, "canary_timeout_ms": 2000,
                              "plan": {"steps": [0.5, 1.0], "min_requests": 20, "min_seconds": 3600, "max_output_drift": 1.0,
                                       "estimated_rule": {"min_rows": 250, "pause_seconds": 1}}}},
        "monitor": {"window_hours": 1, "min_rows": 300, "estimation": {"min_rows": 500}},
        "retrain": {"triggers": ["estimated_performance_drop"], "auto_approve": True, "challenger_on_approval": True}})


def send(client, frame: pd.DataFrame, spec: FeatureSpec, batch: int = 20, key: str = "") -> list[dict]:
    "Each batch as one MLflow request (its own routing key); the answers."
    out = []
    for start in range(0, len(frame), batch):
        records = json.loads(model_frame(frame.iloc[start:start + batch], spec).to_json(orient="records"))
        r = client.post("/invocations", json={"dataframe_records": records}, headers={"x-routing-key": f"{key}{start}"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_a_harmful_shift_is_caught_without_labels_retrained_on_and_the_worse_challenger_rolled_back(tmp_path):
    project = copy_project(tmp_path / "project")
    params = params_for(project)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)
    assert json.loads((project / "models/registration.json").read_text())["aliases"] == ["champion"]
    estimator = json.loads((project / "models/onnx/estimator.json").read_text())
    assert estimator["task"] == "binary" and estimator["reference"]["roc_auc"] > 0.75, estimator["reference"]
    spec = FeatureSpec.load(project / "features/feature_spec.json")

    server = Server(project, params).wait_ready()
    try:
        shifted = synthesize(1500, seed=11, **SHIFT)
        send(server.client, shifted, spec)
        wait_for(lambda: len(read_log(project / "serving/predictions")) == 1500, 30, "the log to reach disk")

        # a broken extract of the source: the retraining will read it
        source = project / params["data"]["source"]
        raw = pd.read_csv(source)
        target = params["data"]["target"]
        raw[target] = np.random.default_rng(0).permutation(raw[target].to_numpy())
        raw.to_csv(source, index=False)

        out = run(["mlnb", "monitor", "--hours", "1"], project)
        assert not (project / "serving/feedback").exists() or len(read_log(project / "serving/feedback")) == 0   # no label at all
        result = json.loads((project / "monitoring/latest.json").read_text())
        section = result["versions"][0]
        e = section["estimation"]
        assert section["version"] == "1" and e["headline"] == "roc_auc" and e["dropped"], e
        roc = e["metrics"]["roc_auc"]                       # beyond the allowed drop, and the band excludes the evaluation's
        assert roc["value"] < e["allowed"] and roc["upper"] < e["reference"] and e["realized"]["rows"] == 0, roc
        assert e["drift_impact"] and section["multivariate"] is not None
        assert "estimated roc_auc drop" in " ".join(result["alerts"])
        assert "retraining (monitor alert: estimated_performance_drop | estimated roc_auc drop" in out.stdout, out.stdout

        # the server shows the estimate, with its band, on /metrics
        metrics = server.client.get("/metrics").text
        assert 'mlnb_estimated_performance{metric="roc_auc",version="1"}' in metrics
        assert 'mlnb_estimated_performance_dropped{version="1"} 1.0' in metrics

        # retrained without waiting for labels; the audit entry says what fired
        steps = [x for x in AuditLog(project / "registry/audit.jsonl").entries() if x["action"].startswith("retrain-")]
        start, done = steps[0]["details"], steps[-1]["details"]
        assert start["trigger"].startswith("monitor alert: estimated_performance_drop | estimated roc_auc drop: ")
        assert start["without_labels"] is True and start["new_rows"] == 0
        assert [x["action"] for x in steps] == ["retrain-start", "retrain-pipeline", "retrain-registered", "retrain-done"]
        assert done["status"] == "challenger" and done["version"] == "2", done

        # the canary starts on its own; the worse challenger is paused, then rolled back, before any label exists
        wait_for(lambda: (server.client.get("/admin/rollout").json().get("rollout") or {}).get("state") == "running", 60, "the canary")
        def stopped():
            send(server.client, synthesize(400, seed=int(time.time()) % 1000, **SHIFT), spec, key="k")
            status = server.client.get("/admin/rollout").json()["rollout"]
            return status if status["state"] == "rolled_back" else None
        status = wait_for(stopped, 120, "the estimated rule to roll the challenger back")
        assert "estimated" in status["reason"], status
        decisions = [x for x in AuditLog(project / "registry/audit.jsonl").entries() if x["action"].startswith("rollout.")]
        actions = [x["action"] for x in decisions]
        assert "rollout.pause" in actions and actions[-1] == "rollout.rollback", actions
        assert actions.index("rollout.pause") < actions.index("rollout.rollback")
        assert not (project / "serving/feedback").exists() or len(read_log(project / "serving/feedback")) == 0
    finally:
        assert server.stop() in (0, -15, 143), server.stderr()
