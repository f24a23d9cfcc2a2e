"""Hot reload: `mlnb serve churn@champion` follows the registry alias under concurrent load with zero failed requests."""
import threading
import time

import httpx

from mlnb.core.config import config_from_dict
from registration import make_env, register, registry_as
from serving import Server, metric


def two_approved_versions(onnx_models, telco_split, tmp_path, second: str):
    "A registry with versions of models `a` and `second`, both approved, the first champion."
    _, split = telco_split
    env = make_env(tmp_path / "registry")
    v1, _ = register(env, onnx_models["a"], split["test"])
    v2, _ = register(env, onnx_models[second], split["test"])
    for v in (v1, v2): registry_as(env, "ann").approve(v.version, "reviewed")
    registry_as(env, "adam").promote(v1.version, reason="first champion")
    return env, v1, v2


def test_alias_move_is_followed_under_load_with_zero_errors(onnx_models, telco_split, records, tmp_path):
    env, v1, v2 = two_approved_versions(onnx_models, telco_split, tmp_path, "b")
    params = {**env, "serve": {"model": "churn@champion", "reload_poll_seconds": 0.3, "model_cache_dir": str(tmp_path / "cache"),
                               "prediction_log": {"dir": str(tmp_path / "logs/p"), "feedback_dir": str(tmp_path / "logs/f")}}}
    s = Server(tmp_path / "work", params).wait_ready()
    answers, stop = [], threading.Event()

    def load(k):
        with httpx.Client(base_url=s.url, timeout=30) as c:
            i = k
            while not stop.is_set():
                r = c.post("/invocations", json={"dataframe_records": [records[i % len(records)]]})
                answers.append((time.monotonic(), r.status_code, r.json().get("model_version")))
                i += 6
    threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
    try:
        assert s.client.get("/admin/model").json()["version"] == v1.version
        for t in threads: t.start()
        time.sleep(1.5)
        registry_as(env, "adam").promote(v2.version, reason="better")
        moved = time.monotonic()
        deadline = moved + 30
        while time.monotonic() < deadline and not any(v == v2.version for _, _, v in answers): time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads: t.join()
    try:
        assert len(answers) > 200
        assert [a for a in answers if a[1] != 200] == []                       # zero failed requests across the switch
        versions = [v for _, _, v in answers]
        assert versions[0] == v1.version and v2.version in versions
        switched = min(t for t, _, v in answers if v == v2.version)          # by polling: one reload, counted below
        assert all(v == v2.version for t, _, v in answers if t > switched + 1.0)
        assert s.client.get("/v2/models/churn").json()["versions"] == [v2.version]
        assert metric(s, "mlnb_model_reloads_total", outcome="ok") == 1
        assert metric(s, "mlnb_model_info", version=v2.version) == 1 and metric(s, "mlnb_model_info", version=v1.version) == 0
        r = s.client.post("/admin/reload", headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json() == {"reloaded": False, "version": v2.version}
    finally:
        s.stop()


def test_admin_reload_and_a_failed_reload_keeps_serving(onnx_models, telco_split, records, tmp_path):
    env, v1, v2 = two_approved_versions(onnx_models, telco_split, tmp_path, "c")
    params = {**env, "serve": {"model": "churn@champion", "reload_poll_seconds": 0, "model_cache_dir": str(tmp_path / "cache"),
                               "prediction_log": {"enabled": False}}}
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        # the next version's cached copy is tampered with before the reload: refused, old version kept
        registry_as(env, "adam").promote(v2.version, reason="try")
        reg = registry_as(env, "vic")
        cached = tmp_path / "cache" / "churn" / v2.version
        reg.download(v2.version, tmp_path / "dl")
        cached.mkdir(parents=True)
        for f in (tmp_path / "dl" / "model").iterdir(): (cached / f.name).write_bytes(f.read_bytes())
        (cached / "model.onnx").write_bytes((cached / "model.onnx").read_bytes() + b"\0")
        r = s.client.post("/admin/reload", headers={"content-type": "application/json"})
        assert r.status_code == 503 and "changed after approval: model.onnx" in r.json()["error"] and f"still serving version {v1.version}" in r.json()["error"]
        assert s.client.post("/invocations", json={"dataframe_records": records[:1]}).json()["model_version"] == v1.version
        assert "approval attestation does not verify" in s.client.get("/admin/model").json()["last_reload_error"]
        assert metric(s, "mlnb_model_reloads_total", outcome="failed") == 1
        # with the bad copy gone, the same endpoint loads the new version
        for f in cached.iterdir(): f.unlink()
        cached.rmdir()
        r = s.client.post("/admin/reload", headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json() == {"reloaded": True, "version": v2.version, "previous": v1.version}
        assert s.client.post("/invocations", json={"dataframe_records": records[:1]}).json()["model_version"] == v2.version
    finally:
        s.stop()
