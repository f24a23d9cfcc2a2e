"""Monitoring checks each version's traffic against that version's own bundle: a real project registers a champion with
`dvc repro`, then a candidate trained on a shifted data set; a real `mlnb serve` splits traffic between the two, and
`mlnb monitor` reports one section per version, each against the reference the registry holds for it."""
import json
import os
import time

import pandas as pd
import pytest
import yaml

from conftest import deep_update, run, set_params, small_project
from mlnb.core.access import os_user_name
from mlnb.core.config import load_config
from mlnb.features.spec import FeatureSpec, model_frame
from mlnb.monitoring.check import check_window, window_frame
from mlnb.predlog.log import read_log
from mlnb.registry.store import Registry
from serving import Server


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def statistic(drift: dict, column: str) -> float:
    return next(c["statistic"] for c in drift["columns"] if c["column"] == column)


@pytest.mark.slow
def test_the_champion_is_checked_against_its_own_reference_and_a_split_window_per_version(tmp_path):
    project = small_project(tmp_path / "project")
    run(["dvc", "repro"], project)                                             # v1: the champion (bootstrap)
    traffic = pd.read_parquet(project / "data/processed/train.parquet")       # what v1 was trained on: no drift for v1
    # the candidate: the pipeline again on a shifted data set (more month-to-month contracts, longer tenures)
    run(["mlnb", "synth", "data/raw/shifted.csv", "--rows", "2000", "--seed", "7", "--shift", "tenure=0.5",
         "--share", "contract:Month-to-month=0.3"], project)
    set_params(project, {"data": {"source": "data/raw/shifted.csv"}})
    run(["dvc", "repro"], project)                                             # v2: a candidate with its own reference
    assert json.loads((project / "models/registration.json").read_text())["version"] == "2"
    # only an approved version can be a challenger: the local OS user, as the first admin and an approver, approves v2
    run(["mlnb", "users", "add", os_user_name(), "--role", "admin", "--role", "approver", "--os-user"], project)
    run(["mlnb", "registry", "approve", "churn", "2", "--reason", "reviewed; split test next"], project)

    params = deep_update(yaml.safe_load((project / "params.yaml").read_text()), {
        "serve": {"prediction_log": {"flush_seconds": 0.2},
                  "rollout": {"mode": "split", "challenger": "churn/2", "weights": {"champion": 0.5, "challenger": 0.5},
                              "canary_timeout_ms": 10_000, "plan": {"max_p99_ratio": 1000, "min_p99_ms": 10_000}}},
        "monitor": {"window_hours": 1, "min_rows": 100, "min_labelled": 100}})
    spec = FeatureSpec.load(project / "features/feature_spec.json")
    server = Server(project, params).wait_ready()
    try:
        records = json.loads(model_frame(traffic, spec).to_json(orient="records"))
        ids = []
        for i, record in enumerate(records):                                  # sticky keys: about half to each version
            r = server.client.post("/invocations", headers={"x-routing-key": f"k{i}"},
                                   json={"dataframe_records": [record]})
            assert r.status_code == 200, r.text
            ids.append(r.json()["predictions"][0]["prediction_id"])
        for start in range(0, len(ids), 200):
            labels = zip(ids[start:start + 200], traffic["churn"].iloc[start:start + 200])
            server.client.post("/feedback", json={"feedback": [{"prediction_id": p, "actual": a} for p, a in labels]})
        wait_for(lambda: len(read_log(project / "serving/predictions")) == len(ids)
                 and len(read_log(project / "serving/feedback")) == len(ids), 30, "the logs to reach disk")
    finally:
        assert server.stop() in (0, -15, 143), server.stderr()

    out = run(["mlnb", "monitor", "--hours", "1", "--no-retrain"], project)
    result = json.loads((project / "monitoring/latest.json").read_text())
    sections = {s["version"]: s for s in result["versions"]}
    assert set(sections) == {"1", "2"} and sum(s["rows"] for s in sections.values()) == len(ids) == result["rows"]
    assert min(s["rows"] for s in sections.values()) >= 100 and all(s["verdict"] for s in sections.values())
    assert "version 1 (registry: churn v1)" in out.stdout and "version 2 (registry: churn v2)" in out.stdout, out.stdout

    cwd = os.getcwd()
    os.chdir(project)                                                          # the registry's paths are the project's
    try:
        cfg = load_config("params.yaml")
        registry = Registry.from_config(cfg)
        champion, candidate = (registry.bundle(v, cfg.serve.model_cache_dir) for v in ("1", "2"))
        assert "champion" in registry.get("1").aliases and registry.get("2").status == "approved"
        predictions, feedback = read_log("serving/predictions"), read_log("serving/feedback")
    finally:
        os.chdir(cwd)
    # each bundle carries its own reference: profile, evaluation and scores on its own test split (from registration)
    assert champion.facts.lineage.raw_md5 != candidate.facts.lineage.raw_md5
    assert champion.evaluation().accuracy != candidate.evaluation().accuracy
    for bundle in (champion, candidate):
        assert len(bundle.reference_scores()) == bundle.evaluation().rows > 0

    # the champion's rows were checked against the champion's reference, not the candidate's
    v1 = sections["1"]
    assert v1["reference"]["source"] == "registry: churn v1" and v1["reference"]["notes"] == []     # nothing re-scored
    assert v1["reference"]["profile"].endswith("churn/1/reference_profile.json")
    assert v1["performance"]["reference_accuracy"] == champion.evaluation().accuracy
    assert result["primary_version"] in sections and result["drift"] == sections[result["primary_version"]]["drift"]
    mine = window_frame(predictions)
    mine = mine[mine["model_version"] == "1"]
    positive = champion.facts.positive_class
    window = (cfg.monitor, result["window_start"], result["window_end"])
    own, _ = check_window(mine, feedback, champion.profile(), *window, champion.reference_scores(),
                          champion.evaluation(), positive)
    other, _ = check_window(mine, feedback, candidate.profile(), *window, candidate.reference_scores(),
                            candidate.evaluation(), positive)
    assert statistic(v1["drift"], "contract") == statistic(own.drift, "contract") != statistic(other.drift, "contract")
    output_drift = [r["statistic"] for r in (v1["prediction_drift"], own.prediction_drift, other.prediction_drift)]
    assert output_drift[0] == output_drift[1] != output_drift[2]
    assert "contract" not in v1["drift"]["drifted_columns"] and "contract" in other.drift["drifted_columns"]

    # the same kind of traffic drifts from the candidate's (shifted) reference, and its alerts name the version
    v2 = sections["2"]
    assert v2["reference"]["source"] == "registry: churn v2" and "contract" in v2["drift"]["drifted_columns"]
    assert v2["alerts"] and all(a.endswith("[version 2]") for a in v2["alerts"])
    assert all(a in result["alerts"] for a in v2["alerts"] + v1["alerts"])
    history = pd.read_parquet(project / "monitoring/feature_history.parquet")
    assert set(history["model_version"]) == {"1", "2"}

    # each version is estimated with its own estimator, without labels, beside what its labelled rows realized
    for s in sections.values():
        e = s["estimation"]
        assert e["headline"] == "roc_auc" and e["realized"]["rows"] == s["rows"] and "roc_auc" in e["realized"]["metrics"], e
        assert s["multivariate"] is not None
    # an edited estimator in the model cache is refused (the version's approval covers it), never used to fake or hide a drop
    cached = project / cfg.serve.model_cache_dir / "churn" / "1" / "estimator.json"
    edited = json.loads(cached.read_text())
    edited["reference"]["roc_auc"] = 0.999
    cached.write_text(json.dumps(edited))
    run(["mlnb", "monitor", "--hours", "1", "--no-retrain"], project)
    again = {s["version"]: s for s in json.loads((project / "monitoring/latest.json").read_text())["versions"]}
    assert again["1"]["estimation"] is None and again["1"]["drift"] is None
    assert "approv" in again["1"]["reference"]["problem"].lower() and again["1"]["alerts"], again["1"]
    assert again["2"]["estimation"] is not None                                # the other version is still checked
