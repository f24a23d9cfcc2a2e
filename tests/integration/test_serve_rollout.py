"""Rollouts on a real `mlnb serve` on 127.0.0.1 with real ONNX models: sticky keyed splits, a raising, a slow and a skewed
canary rolled back with the reason in the audit log, a healthy one promoted only once approved, shadow traffic, and the
operator's commands (`mlnb rollout ...`)."""
import json
import threading
import time
from collections import Counter, defaultdict

import httpx
import numpy as np
import onnx
import pandas as pd
import pytest

from conftest import run
from mlnb.core.audit import AuditLog
from mlnb.core.config import config_from_dict
from mlnb.model.onnx import OnnxModel
from mlnb.features.spec import feature_spec, model_frame
from mlnb.predlog.log import read_log
from registration import SECRETS, make_env, register, registry_as
from serving import Server, grafted, metric, serve_params, signed_model_dir


@pytest.fixture(scope="module")
def rows(telco_split):
    "Every test-split row as a request record (about 1,400 distinct customers' inputs)."
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    return json.loads(model_frame(s["test"], spec).to_json(orient="records"))


@pytest.fixture(scope="module")
def signed(onnx_models, tmp_path_factory):
    "Signed model directories: the champion (a), a healthy challenger (b), a skewed one (bad), a slow and a slower b, and a raising a."
    root = tmp_path_factory.mktemp("rollout-models")
    keys = root / "keys"
    dirs = {name: signed_model_dir(onnx_models[name], root / name, keys) for name in ("a", "b", "bad")}
    for name, src, kind, size in (("slow", "b", "slow", 640), ("slower", "b", "slow", 1024), ("raising", "a", "raising", 0)):
        dirs[name] = signed_model_dir(grafted(onnx_models[src], root / f"{name}.onnx", kind, size), root / name, keys)
    return dirs, keys


def rollout_params(signed, work, challenger: str, **rollout):
    dirs, keys = signed
    params = serve_params(dirs["a"], keys, work / "logs", rollout={"mode": "canary", "challenger": str(dirs[challenger] / "model.onnx"), **rollout})
    params["registry"]["audit_log"] = str(work / "audit.jsonl")
    return params


def version_of(server, name) -> str:
    "The version a server reports for one of `signed`'s files (file versions are the sha256 prefix)."
    return server.client.get("/admin/rollout").json()["challenger"]["version"] if name == "challenger" else server.client.get("/admin/model").json()["version"]


def rollout_entries(work, action=None) -> list[dict]:
    return [e for e in AuditLog(work / "audit.jsonl").entries() if e["action"].startswith("rollout.") and (action is None or e["action"] == f"rollout.{action}")]


def send(server, records, n, key=None, threads=1) -> list[tuple[int, str, float]]:
    "n single-row MLflow requests (row i of `records`, key `key(i)` in the routing header): (status, model_version, seconds) each."
    out = [None] * n

    def worker(k):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for i in range(k, n, threads):
                headers = {"x-routing-key": key(i)} if key else {}
                t = time.perf_counter()
                r = c.post("/invocations", json={"dataframe_records": [records[i % len(records)]]}, headers=headers)
                out[i] = (r.status_code, r.json().get("model_version"), time.perf_counter() - t)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    return out


def until_state(server, states, records, key=None, limit=5000, batch=50) -> dict:
    "Send traffic in batches until the rollout reaches one of `states`; its status."
    sent = 0
    while sent < limit:
        answers = send(server, records[sent % len(records):] + records, batch, key)
        assert all(a[0] == 200 for a in answers), [a for a in answers if a[0] != 200][:3]
        sent += batch
        status = server.client.get("/admin/rollout").json()
        if status["rollout"]["state"] in states: return status
    raise AssertionError(f"rollout still {status['rollout']['state']} after {sent} requests: {status}")


def test_ten_thousand_keyed_requests_follow_the_weights_and_each_key_sticks(signed, rows, tmp_path):
    # stickiness, not the timeout fallback or the latency rule (each tested on its own): on a loaded machine a 250 ms canary
    # deadline could hand a late challenger answer to the champion, and a p99 blip could roll the split back mid-test
    params = rollout_params(signed, tmp_path, "b", mode="split", weights={"champion": 0.8, "challenger": 0.2}, key_field="customer_id",
                            canary_timeout_ms=10_000, plan={"max_p99_ratio": 1000, "min_p99_ms": 10_000})
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        champion, challenger = version_of(s, "champion"), version_of(s, "challenger")
        answers = send(s, rows, 10_000, key=lambda i: f"cust-{i % 4000}", threads=4)
        assert all(a[0] == 200 for a in answers)
        by_key = defaultdict(set)
        for i, a in enumerate(answers): by_key[f"cust-{i % 4000}"].add(a[1])
        assert all(len(v) == 1 for v in by_key.values())                                  # each key always reaches the same variant
        share = sum(a[1] == challenger for a in answers) / len(answers)
        assert abs(share - 0.2) <= 0.02, share
        assert {a[1] for a in answers} == {champion, challenger}
        # the key can come in the body instead: taken out of the row, it routes the same way
        extra = []
        for k in ("cust-1", "cust-2", "cust-3", "cust-7"):
            r = s.client.post("/invocations", json={"dataframe_records": [{**rows[0], "customer_id": k}]})
            assert r.status_code == 200 and {r.json()["model_version"]} == by_key[k]
            extra.append(r.json()["model_version"])
        # an explicit version goes straight to that model, outside the split
        v2 = s.client.post(f"/v2/models/churn/versions/{challenger}/infer", json={"inputs": [
            {"name": n, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]} for n, v in rows[0].items()]})
        assert v2.status_code == 200 and v2.json()["model_version"] == challenger
        extra.append(challenger)
        assert s.client.get(f"/v2/models/churn/versions/{challenger}").json()["versions"] == [challenger]
        status = s.client.get("/admin/rollout").json()
        assert status["rollout"]["state"] == "running" and status["rollout"]["fixed_share"] == 0.2
        assert metric(s, "mlnb_rollout_canary_ratio") == 0.2
    finally:
        assert s.stop() in (0, -15, 143)
    log = read_log(tmp_path / "logs/predictions", ["variant", "model_version"])
    counts = Counter(zip(log["variant"], log["model_version"]))
    assert counts[("challenger", challenger)] == sum(a[1] == challenger for a in answers) + extra.count(challenger)
    assert counts[("champion", champion)] == sum(a[1] == champion for a in answers) + extra.count(champion)


def test_a_raising_challenger_fails_no_caller_and_is_rolled_back_within_min_errors(signed, rows, tmp_path):
    params = rollout_params(signed, tmp_path, "raising", plan={"steps": [0.5, 1.0], "min_requests": 100, "min_seconds": 0, "min_errors": 5})
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        champion = version_of(s, "champion")
        answers = send(s, [r for r in rows if r["tenure"] > 0], 300)
        assert [a for a in answers if a[0] != 200] == [] and {a[1] for a in answers} == {champion}    # every caller got the champion's answer
        status = s.client.get("/admin/rollout").json()["rollout"]
        assert status["state"] == "rolled_back" and status["share"] == 0
        assert status["challenger"]["requests"] == 5 == status["challenger"]["errors"]               # out after exactly min_errors canary requests
        assert metric(s, "mlnb_canary_fallbacks_total", reason="error") == 5
        assert metric(s, "mlnb_rollout_state", state="rolled_back") == 1 and metric(s, "mlnb_rollout_canary_ratio") == 0
        cli = run(["mlnb", "rollout", "status", "--url", s.url], tmp_path)
        assert "state rolled back" in cli.stdout and "error rate 100.00%" in cli.stdout
    finally:
        s.stop()
    (rollback,) = rollout_entries(tmp_path, "rollback")
    assert "error rate 100.00%" in rollback["details"]["reason"] and rollback["details"]["windows"]["challenger"]["errors"] == 5
    assert AuditLog(tmp_path / "audit.jsonl").verify() == []


@pytest.mark.parametrize("timeout_ms, reason", [(5000, "p99 latency"), (4, "error rate")], ids=["slow", "timed-out"])
def test_a_slow_challenger_is_rolled_back_with_the_reason(signed, rows, tmp_path, timeout_ms, reason):
    params = rollout_params(signed, tmp_path, "slow", canary_timeout_ms=timeout_ms,
                            plan={"steps": [0.5, 1.0], "min_requests": 60, "min_seconds": 0})
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        status = until_state(s, {"rolled_back", "promoting", "promoted"}, rows)
        assert status["rollout"]["state"] == "rolled_back" and reason in status["rollout"]["reason"]
        if timeout_ms < 100: assert metric(s, "mlnb_canary_fallbacks_total", reason="timeout") >= 5
    finally:
        s.stop()
    (rollback,) = rollout_entries(tmp_path, "rollback")
    assert reason in rollback["details"]["reason"]


def test_a_skewed_challenger_is_rolled_back_for_its_output_shift(signed, rows, tmp_path):
    params = rollout_params(signed, tmp_path, "bad", plan={"steps": [0.5, 1.0], "min_requests": 150, "min_seconds": 0})
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        status = until_state(s, {"rolled_back", "promoting", "promoted"}, rows)
    finally:
        s.stop()
    assert status["rollout"]["state"] == "rolled_back"
    (rollback,) = rollout_entries(tmp_path, "rollback")
    assert "output distribution shift" in rollback["details"]["reason"] and "p99" not in rollback["details"]["reason"]


def test_a_healthy_approved_challenger_walks_the_plan_and_becomes_champion(onnx_models, telco_split, rows, tmp_path):
    "Only an approved version can be a challenger (an unapproved one is refused with 409: tests/integration/test_approval.py)."
    _, split = telco_split
    env = make_env(tmp_path / "registry")
    v1, _ = register(env, onnx_models["a"], split["test"])
    twin = onnx.load(onnx_models["a"]); twin.doc_string = "retrained, same answers"   # healthy by construction: the champion's outputs, another file
    onnx.save(twin, tmp_path / "twin.onnx")
    v2, _ = register(env, tmp_path / "twin.onnx", split["test"])
    registry_as(env, "ann").approve(v1.version, "reviewed")
    registry_as(env, "adam").promote(v1.version, reason="first champion")
    registry_as(env, "ann").approve(v2.version, "offline evaluation reviewed; canary next")
    params = {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0.3,
                               "prediction_log": {"dir": str(tmp_path / "logs/p"), "feedback_dir": str(tmp_path / "logs/f")},
                               "rollout": {"mode": "canary", "challenger": f"churn/{v2.version}",
                                           "plan": {"steps": [0.2, 0.5, 1.0], "min_requests": 40, "min_seconds": 0.5}}}}
    s = Server(tmp_path / "work", params, env={"MLNB_USER": "adam", "MLNB_SECRET": SECRETS["adam"]}).wait_ready()
    audit = tmp_path / "registry/audit.jsonl"
    try:
        status = until_state(s, {"promoted", "rolled_back"}, rows)
        assert status["rollout"]["state"] == "promoted" and status["champion"] == v2.version
        assert registry_as(env, "vic").alias("champion").version == v2.version
        assert {a[1] for a in send(s, rows, 30)} == {v2.version}                                  # every request now on the new champion
        assert metric(s, "mlnb_model_info", version=v2.version) == 1
    finally:
        s.stop()
    actions = [e["action"] for e in AuditLog(audit).entries() if e["action"].startswith("rollout.")]
    assert actions == ["rollout.start", "rollout.advance", "rollout.advance", "rollout.promote", "rollout.promoted"], actions
    moves = registry_as(env, "vic").alias_history()
    assert moves[-1]["version"] == v2.version and moves[-1]["by"] == "adam" and moves[-1]["reason"].startswith("rollout:")


def test_shadow_answers_with_the_champion_only_and_logs_both(signed, rows, tmp_path):
    dirs, _ = signed
    s = Server(tmp_path / "work", rollout_params(signed, tmp_path, "slower", mode="shadow")).wait_ready()
    try:
        champion, shadow = version_of(s, "champion"), version_of(s, "challenger")
        answers = send(s, rows, 200)
        assert {a[1] for a in answers} == {champion} and all(a[0] == 200 for a in answers)
        seconds = sorted(a[2] for a in answers)
        time.sleep(1.0)
        shadowed = metric(s, "mlnb_shadow_requests_total", outcome="ok")
        dropped = metric(s, "mlnb_shadow_requests_total", outcome="dropped")
        assert shadowed + dropped == 200 and shadowed >= 64     # a shadow slower than the traffic is bounded: the excess is dropped and counted
    finally:
        s.stop()
    # the shadow costs about 50 ms a call; the caller never waits for it
    assert seconds[len(seconds) // 2] < 0.025, seconds[len(seconds) // 2]
    log = read_log(tmp_path / "logs/predictions", ["prediction_id", "variant", "model_version", "proba.Yes"])
    main, copy = log[log["variant"] == "champion"], log[log["variant"] == "shadow"]
    assert len(main) == 200 and len(copy) == shadowed and set(copy["model_version"]) == {shadow}
    assert set(copy["prediction_id"]) <= set(main["prediction_id"])                           # the same ids: feedback labels both
    joined = copy.merge(main, on="prediction_id", suffixes=("_shadow", "_champion"))
    assert (joined["proba.Yes_shadow"] != joined["proba.Yes_champion"]).mean() > 0.9           # the challenger's own answers were logged
    expected = OnnxModel(dirs["b"] / "model.onnx").run(pd.DataFrame(rows[:200]))["probabilities"][:, 1]
    assert np.abs(copy["proba.Yes"].to_numpy()[:, None] - expected[None, :]).min(axis=1).max() < 1e-5


def test_operators_start_pause_resume_and_roll_back_from_the_command_line(signed, rows, tmp_path):
    dirs, keys = signed
    params = serve_params(dirs["a"], keys, tmp_path / "logs")
    params["registry"]["audit_log"] = str(tmp_path / "audit.jsonl")
    s = Server(tmp_path / "work", params).wait_ready()
    rollout = lambda *args, check=True: run(["mlnb", "rollout", *args, "--url", s.url], tmp_path, check=check)
    try:
        assert "mode off" in rollout("status").stdout and metric(s, "mlnb_rollout_state", state="none") == 1
        bad = rollout("start", str(dirs["a"] / "model.onnx"), check=False)
        assert bad.returncode == 1 and "champion's own model file" in bad.stderr
        started = rollout("start", str(dirs["b"] / "model.onnx"), "--reason", "try C=0.3").stdout
        assert "state running" in started and "canary share 5%" in started
        assert "state paused" in rollout("pause", "--reason", "holiday freeze").stdout
        again = rollout("pause", check=False)
        assert again.returncode == 1 and "only a running rollout can be paused" in again.stderr
        assert "state running" in rollout("resume").stdout
        assert "state rolled back" in rollout("rollback", "--reason", "support tickets").stdout
        assert {a[1] for a in send(s, rows, 50)} == {version_of(s, "champion")}
        assert "shadowing" in rollout("start", str(dirs["b"] / "model.onnx"), "--mode", "shadow").stdout
        assert metric(s, "mlnb_rollout_state", state="shadow") == 1
        assert "mode off" in rollout("rollback").stdout
        nothing = rollout("pause", check=False)
        assert nothing.returncode == 1 and "no rollout to pause" in nothing.stderr
    finally:
        s.stop()
    entries = rollout_entries(tmp_path)
    assert [e["action"] for e in entries] == ["rollout.start", "rollout.pause", "rollout.resume", "rollout.rollback", "rollout.start", "rollout.rollback"]
    assert entries[1]["details"]["reason"] == "holiday freeze" and entries[3]["details"]["reason"] == "support tickets"


def test_a_less_accurate_challenger_is_rolled_back_on_feedback_labels(signed, rows, telco_split, tmp_path):
    "Output drift is switched off here, so only the online accuracy from `POST /feedback` can catch the shuffled-label model."
    labels = telco_split[1]["test"]["churn"].astype(str).tolist()
    params = rollout_params(signed, tmp_path, "bad", plan={"steps": [0.5, 1.0], "min_requests": 100, "min_seconds": 3600, "max_output_drift": 1.0,
                                                           "min_labelled": 100, "accuracy_p_value": 0.01})
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        for start in range(0, 6000, 100):
            batch = [(rows[i % len(rows)], labels[i % len(rows)]) for i in range(start, start + 100)]
            ids = [s.client.post("/invocations", json={"dataframe_records": [r]}).json()["predictions"][0]["prediction_id"] for r, _ in batch]
            s.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": y} for i, (_, y) in zip(ids, batch)]}).raise_for_status()
            status = s.client.get("/admin/rollout").json()["rollout"]
            if status["state"] != "running": break
    finally:
        s.stop()
    assert status["state"] == "rolled_back" and "online accuracy" in status["reason"], status
    assert status["challenger"]["accuracy"] < status["champion"]["accuracy"] - 0.02
    (rollback,) = rollout_entries(tmp_path, "rollback")
    assert "online accuracy" in rollback["details"]["reason"]
