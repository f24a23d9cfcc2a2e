"""Rollouts judged by estimated performance before any label exists, on a real `mlnb serve` on 127.0.0.1 following a real
registry: each registered version carries its own `estimator.json` (fitted on its own scores of the validation split,
signed over with the rest of the version by its approval). A challenger trained on shuffled labels is paused, then rolled
back, with no feedback at all; an equally good one walks the plan and is promoted; in shadow mode the worse one is
stopped on the rows both scored. Output drift is switched off here (`max_output_drift: 1`): it would catch the shuffled
model's other score distribution first, and these tests are about the estimate."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlnb.core.audit import AuditLog
from mlnb.core.config import config_from_dict
from mlnb.features.spec import feature_spec, model_frame
from mlnb.model.onnx import OnnxModel
from mlnb.model.signing import ensure_signing_key
from mlnb.registry.store import run_gates
from registration import SECRETS, make_env, registry_as
from serving import Server, metric

pytestmark = pytest.mark.slow


def fitted_estimator(model: Path, frame, y, dest: Path) -> Path:
    "The version's estimator, fitted on its own scores of `frame` (labels `y`), saved as `dest/estimator.json`."
    from mlnb.stats.estimate import PerformanceEstimator
    scores = OnnxModel(model).run(frame)["probabilities"][:, 1]
    dest.mkdir(parents=True, exist_ok=True)
    return PerformanceEstimator.fit(scores, np.asarray(y), "binary", classes=["No", "Yes"], positive="Yes").save(dest)


def register_with_estimator(env: dict, model: Path, estimator: Path | None, test):
    "Register `model` (and its estimator.json when given) as dana; the gates as tests/registration.py runs them."
    cfg = config_from_dict(env)
    reg = registry_as(env, "dana")
    key, pub = Path(cfg.registry.signing_key), Path(cfg.registry.public_key)
    ensure_signing_key(key, pub)
    gates = lambda cand, champ, sig_err: run_gates(cand, champ, test, cfg, {"female": {"demographic_parity_ratio": 0.95}}, {"passed": True}, sig_err)
    files = {"model.onnx": model} | ({"estimator.json": estimator} if estimator else {})
    version, _ = reg.register(files, {"mlnb.family": "logreg"}, {"task": "binary"}, gates, key, pub)
    return version.version


@pytest.fixture(scope="module")
def frames(telco_split):
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    valid, test = model_frame(s["valid"], spec), model_frame(s["test"], spec)
    return valid, s["valid"]["churn"].astype(str).to_numpy(), json.loads(test.to_json(orient="records")), s["test"]


@pytest.fixture(scope="module")
def estimators(onnx_models, frames, tmp_path_factory):
    "Each of the champion (a), an equally good challenger (b) and the shuffled-label one (bad), with its own estimator."
    valid, y, _, _ = frames
    root = tmp_path_factory.mktemp("estimators")
    return {name: fitted_estimator(onnx_models[name], valid, y, root / name) for name in ("a", "b", "bad")}


def registered(tmp_path, onnx_models, estimators, frames, challenger: str) -> tuple[dict, str, str]:
    "A registry with `a` as the approved champion and `challenger` approved: (params, champion version, challenger version)."
    test = frames[3]
    env = make_env(tmp_path / "registry")
    v1 = register_with_estimator(env, onnx_models["a"], estimators["a"], test)
    v2 = register_with_estimator(env, onnx_models[challenger], estimators[challenger], test)
    registry_as(env, "ann").approve(v1, "reviewed")
    registry_as(env, "adam").promote(v1, reason="first champion")
    registry_as(env, "ann").approve(v2, "offline evaluation reviewed; canary next")
    return env, v1, v2


def rollout_params(env: dict, tmp_path: Path, challenger: str, mode: str = "canary", **rule) -> dict:
    plan = {"steps": [0.5, 1.0], "min_requests": 300, "min_seconds": 0, "max_output_drift": 1.0,
            "estimated_rule": {"min_rows": 250, "pause_seconds": 3600, **rule}}
    return {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0.3,
                             "prediction_log": {"dir": str(tmp_path / "logs/p"), "feedback_dir": str(tmp_path / "logs/f")},
                             "rollout": {"mode": mode, "challenger": f"churn/{challenger}", "plan": plan}}}


def drive(server, rows, done, limit=6000, batch=50) -> dict:
    "Single-row requests in batches, no feedback at all, until `done(status)`; the last status."
    sent = 0
    while sent < limit:
        for i in range(sent, sent + batch):
            r = server.client.post("/invocations", json={"dataframe_records": [rows[i % len(rows)]]})
            assert r.status_code == 200, r.text
        sent += batch
        status = server.client.get("/admin/rollout").json()
        if done(status): return status
    raise AssertionError(f"not done after {sent} requests: {status}")


def rollout_entries(audit: Path) -> list[dict]:
    return [e for e in AuditLog(audit).entries() if e["action"].startswith("rollout.")]


def test_a_challenger_estimated_worse_is_paused_then_rolled_back_with_no_labels(onnx_models, estimators, frames, tmp_path):
    rows = frames[2]
    env, champion, challenger = registered(tmp_path, onnx_models, estimators, frames, "bad")
    s = Server(tmp_path / "work", rollout_params(env, tmp_path, challenger), env={"MLNB_USER": "adam", "MLNB_SECRET": SECRETS["adam"]}).wait_ready()
    try:
        assert s.client.get("/admin/model").json()["version"] == champion
        paused = drive(s, rows, lambda st: st["rollout"]["state"] != "running")
        assert paused["rollout"]["state"] == "paused", paused
        look = paused["rollout"]["estimated"]
        assert look["judged"] and look["worse"] and look["metric"] == "roc_auc"
        assert look["canary"] < look["control"] - 0.1, look
        assert "estimated roc_auc" in paused["rollout"]["reason"] and "band" in paused["rollout"]["reason"]
        assert paused["rollout"]["champion"]["labelled"] == paused["rollout"]["challenger"]["labelled"] == 0     # no label at all
        assert metric(s, "mlnb_rollout_state", state="paused") == 1
        assert metric(s, "mlnb_rollout_estimated_performance", variant="challenger", metric="roc_auc", bound="value") == pytest.approx(look["canary"], abs=1e-4)
        done = drive(s, rows, lambda st: st["rollout"]["state"] != "paused")
        assert done["rollout"]["state"] == "rolled_back" and "still worse after the pause" in done["rollout"]["reason"], done
        answers = {s.client.post("/invocations", json={"dataframe_records": [r]}).json()["model_version"] for r in rows[:30]}
        assert answers == {champion}                                                     # every request back on the champion
        assert metric(s, "mlnb_rollout_decisions_total", action="pause") == 1
    finally:
        s.stop()
    entries = rollout_entries(tmp_path / "registry/audit.jsonl")
    assert [e["action"] for e in entries] == ["rollout.start", "rollout.pause", "rollout.rollback"], [e["action"] for e in entries]
    pause, rollback = entries[1]["details"], entries[2]["details"]
    assert "estimated roc_auc" in pause["reason"] and pause["estimated"]["worse"] and pause["version"] == challenger
    assert rollback["estimated"]["rows"][1] > pause["estimated"]["rows"][1]             # judged again on more rows
    assert registry_as(env, "vic").alias("champion").version == champion


def test_an_equally_good_challenger_is_not_paused_and_becomes_champion(onnx_models, estimators, frames, tmp_path):
    rows = frames[2]
    env, champion, challenger = registered(tmp_path, onnx_models, estimators, frames, "b")
    s = Server(tmp_path / "work", rollout_params(env, tmp_path, challenger), env={"MLNB_USER": "adam", "MLNB_SECRET": SECRETS["adam"]}).wait_ready()
    try:
        status = drive(s, rows, lambda st: st["rollout"]["state"] not in ("running",))
        assert status["rollout"]["state"] in ("promoting", "promoted"), status
    finally:
        s.stop()
    entries = rollout_entries(tmp_path / "registry/audit.jsonl")
    actions = [e["action"] for e in entries]
    assert "rollout.pause" not in actions and actions[:2] == ["rollout.start", "rollout.advance"], actions
    look = entries[1]["details"]["estimated"]                                          # the look at step 1 judged it, and it was fine
    assert look["judged"] and not look["worse"] and abs(look["difference"]) < 0.05, look


def test_in_shadow_mode_a_worse_challenger_is_paused_then_stopped_on_the_same_rows(onnx_models, estimators, frames, tmp_path):
    rows = frames[2]
    env, champion, challenger = registered(tmp_path, onnx_models, estimators, frames, "bad")
    s = Server(tmp_path / "work", rollout_params(env, tmp_path, challenger, mode="shadow")).wait_ready()
    try:
        paused = drive(s, rows, lambda st: (st["shadow"] or {}).get("state") != "running")
        assert paused["shadow"]["state"] == "paused" and paused["mode"] == "shadow", paused
        rows_seen = paused["shadow"]["estimated"]["rows"]
        assert rows_seen[0] == rows_seen[1]                                               # the same rows on both sides
        done = drive(s, rows, lambda st: st["mode"] == "off")
        assert done["shadow"]["state"] == "rolled_back" and done["challenger"] is None, done
    finally:
        s.stop()
    actions = [e["action"] for e in rollout_entries(tmp_path / "registry/audit.jsonl")]
    assert actions == ["rollout.start", "rollout.pause", "rollout.rollback"], actions


def test_a_version_registered_without_an_estimator_is_served_and_the_rule_says_why_it_did_not_judge(onnx_models, estimators, frames, tmp_path):
    rows, test = frames[2], frames[3]
    env = make_env(tmp_path / "registry")
    v1 = register_with_estimator(env, onnx_models["a"], None, test)                      # an older registration: no estimator.json
    v2 = register_with_estimator(env, onnx_models["bad"], estimators["bad"], test)
    registry_as(env, "ann").approve(v1, "reviewed"); registry_as(env, "adam").promote(v1, reason="first")
    registry_as(env, "ann").approve(v2, "reviewed")
    params = rollout_params(env, tmp_path, v2)
    params["serve"]["rollout"]["plan"]["min_seconds"] = 3600                              # stays at step 1: judged at each look
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        assert s.client.get("/admin/model").json()["estimator"] is False
        status = drive(s, rows, lambda st: st["rollout"]["estimated"] is not None, limit=2000)
    finally:
        s.stop()
    assert status["rollout"]["state"] == "running" and not status["rollout"]["estimated"]["judged"]
    assert "the control has no estimator" in status["rollout"]["estimated"]["note"]


def test_the_served_estimator_is_the_approved_one_read_from_the_verified_copy(onnx_models, estimators, frames, tmp_path):
    """Registered: loaded from the private copy the approval verified (an edited estimator.json in the cache is refused);
    a bare ONNX file in development mode: the estimator.json beside it, when there is one."""
    from mlnb.core.errors import SignatureError
    from mlnb.serving.runtime import ModelRef, load_last_verified, load_registered, load_served_model
    from mlnb.stats.estimate import PerformanceEstimator
    from serving import signed_model_dir
    env = make_env(tmp_path / "registry")
    v1 = register_with_estimator(env, onnx_models["a"], estimators["a"], frames[3])
    registry_as(env, "ann").approve(v1, "reviewed"); registry_as(env, "adam").promote(v1, reason="first")
    r, cache = env["registry"], env["serve"]["model_cache_dir"]
    keys = dict(approval_key=r["approval_public_key"], record_key=env["serve"]["model_cache_key"])
    ref = ModelRef.parse("churn@champion")
    model = load_registered(registry_as(env, "vic"), ref, r["public_key"], cache, **keys)
    expected = PerformanceEstimator.load(estimators["a"].parent)
    assert model.estimator is not None and model.estimator.model_dump() == expected.model_dump() and model.estimator_note is None
    again = load_last_verified(ref, r["public_key"], cache, ConnectionError("down"), **keys)
    assert again.estimator.model_dump() == expected.model_dump()
    cached = Path(cache) / "churn" / v1 / "estimator.json"
    edited = json.loads(cached.read_text()); edited["reference"]["roc_auc"] = 0.99
    cached.write_text(json.dumps(edited))
    with pytest.raises(SignatureError, match="estimator.json"):
        load_registered(registry_as(env, "vic"), ref, r["public_key"], cache, **keys)

    dev = signed_model_dir(onnx_models["b"], tmp_path / "dev", tmp_path / "keys")
    assert load_served_model(dev / "model.onnx", tmp_path / "keys/signing.pub").estimator is None      # none beside it: None
    shutil.copy(estimators["b"], dev / "estimator.json")
    served = load_served_model(dev / "model.onnx", tmp_path / "keys/signing.pub")
    assert served.estimator.model_dump() == PerformanceEstimator.load(estimators["b"].parent).model_dump()
    (dev / "estimator.json").write_text("{not json")
    broken = load_served_model(dev / "model.onnx", tmp_path / "keys/signing.pub")
    assert broken.estimator is None and "estimator.json not loaded" in broken.estimator_note             # served, and says why
