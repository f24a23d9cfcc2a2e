"""Access control and TLS on a real `mlnb serve` on 127.0.0.1: API keys made with `mlnb api-key`, 401 and 403 on the inference
fast path and on the Starlette routes, admin-only endpoints, open endpoints, revocation without a restart, keys kept out of the
server's log, and HTTPS (two workers) with a self-signed certificate made on the fly."""
import ipaddress
import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from conftest import run, tool_env
from mlnb.core.config import config_from_dict
from mlnb.features.spec import feature_spec, model_frame
from serving import signed_logreg, CHALLENGE, Server, create_key, metric, secured_params, serve_params, signed_model_dir, tls_params

ROLES = {"app": "predict", "ops": "operate", "root": "admin", "temp": "predict"}


@pytest.fixture(scope="module")
def model_dir(telco_split, tmp_path_factory):
    "One real exported logistic regression, signed."
    return signed_logreg(telco_split, tmp_path_factory.mktemp("auth-model"))


@pytest.fixture(scope="module")
def row(telco_split):
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    return json.loads(model_frame(s["test"].head(1), spec).to_json(orient="records"))[0]


@pytest.fixture(scope="module")
def secured(model_dir, certificate, tmp_path_factory):
    "A server with access control over https, and a key per name in ROLES."
    work = tmp_path_factory.mktemp("secured")
    params = secured_params(model_dir, work, tls=tls_params(certificate), auth={"metrics_public": True})   # scraped without a key here
    keys = {name: create_key(work, name, role) for name, role in ROLES.items()}
    s = Server(work, params, cacert=certificate[0]).wait_ready()
    yield s, keys
    s.stop()


def infer_v2(client, row, **kw):
    inputs = [{"name": k, "shape": [1, 1], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [v]} for k, v in row.items()]
    return client.post("/v2/models/churn/infer", json={"inputs": inputs}, **kw)


def test_the_store_holds_hashes_only(secured):
    s, keys = secured
    text = (s.workdir / "keys.yaml").read_text()
    assert (s.workdir / "keys.yaml").stat().st_mode & 0o777 == 0o600
    assert all(key.startswith("mlnb_") and key not in text for key in keys.values())
    listed = run(["mlnb", "api-key", "list", "--params", "params.yaml"], s.workdir).stdout
    assert [line.split()[:2] for line in listed.splitlines()] == [[n, r] for n, r in ROLES.items()]
    again = run(["mlnb", "api-key", "create", "app", "--role", "admin", "--params", "params.yaml"], s.workdir, check=False)
    assert again.returncode == 1 and "a key named 'app' exists already" in again.stderr


def test_inference_needs_a_predict_key(secured, row):
    s, keys = secured
    c = s.client
    body = {"dataframe_records": [row]}
    for headers in ({}, {"Authorization": "Bearer mlnb_wrong"}, {"X-API-Key": "mlnb_wrong"}, {"Authorization": "Basic YXBwOnB3"},
                    {"Authorization": f"Bearer {keys['app']}x"}):
        for r in (c.post("/invocations", json=body, headers=headers), infer_v2(c, row, headers=headers)):
            assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE, (headers, r.text)
            assert r.json()["error"] in ("unknown or revoked API key", "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                         "malformed credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    for name in ("app", "ops", "root"):     # roles nest: operate and admin keys predict too
        for headers in ({"Authorization": f"Bearer {keys[name]}"}, {"X-API-Key": keys[name]}):
            r = c.post("/invocations", json=body, headers=headers)
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("Yes", "No"), r.text
            assert infer_v2(c, row, headers=headers).status_code == 200
    pid = c.post("/invocations", json=body, headers={"X-API-Key": keys["app"]}).json()["predictions"][0]["prediction_id"]
    feedback = {"feedback": [{"prediction_id": pid, "actual": "No"}]}
    assert c.post("/feedback", json=feedback).status_code == 401
    assert c.post("/feedback", json=feedback, headers={"X-API-Key": keys["app"]}).status_code == 403   # a predict key does not label
    assert c.post("/feedback", json=feedback, headers={"X-API-Key": keys["ops"]}).json()["accepted"] == 1   # an operator labels any prediction
    for path in ("/v2", "/v2/models/churn", "/v2/models/churn/ready"):
        assert c.get(path).status_code == 401 and c.get(path, headers={"X-API-Key": keys["app"]}).status_code == 200, path


def test_operator_endpoints_need_operate(secured):
    s, keys = secured
    with s.new_client(keys["app"]) as app, s.new_client(keys["ops"]) as ops, s.new_client(keys["root"]) as root:
        for method, path in (("POST", "/admin/reload"), ("GET", "/admin/rollout"), ("POST", "/admin/rollout/pause"), ("GET", "/admin/model")):
            r = app.request(method, path)
            assert r.status_code == 403 and "www-authenticate" not in r.headers, r.text
            assert r.json() == {"error": f"key 'app' (role predict) may not {method} {path}; it needs operate"}
            assert s.client.request(method, path).status_code == 401
        for client in (ops, root):
            assert client.post("/admin/reload").status_code == 200 and client.get("/admin/model").json()["name"] == "churn"
            assert client.get("/admin/rollout").json()["mode"] == "off"
            r = client.post("/admin/rollout/pause")           # past access control: refused by the rollout's state
            assert r.status_code == 409 and "may not" not in r.json()["error"]


def test_key_management_needs_admin(secured):
    s, keys = secured
    with s.new_client(keys["ops"]) as ops, s.new_client(keys["root"]) as root:
        r = ops.get("/admin/keys")
        assert r.status_code == 403 and r.json()["error"] == "key 'ops' (role operate) may not GET /admin/keys; it needs admin"
        assert ops.post("/admin/keys/reload").status_code == 403
        listed = root.get("/admin/keys").json()
        assert {k["name"]: k["role"] for k in listed["keys"]} == ROLES and all(set(k) == {"name", "role", "created"} for k in listed["keys"])
        assert not any(key in json.dumps(listed) for key in keys.values())
        assert root.post("/admin/keys/reload").status_code == 200


def test_open_endpoints_stay_open(secured):
    s, keys = secured
    c = s.client
    for path in ("/v2/health/live", "/v2/health/ready", "/ping", "/health", "/metrics"):
        assert c.get(path).status_code == 200, path
    assert c.get("/openapi.json").status_code != 401
    assert c.get("/no/such/route").status_code == 401               # no key: nothing to learn about which routes exist
    assert c.get("/no/such/route", headers={"X-API-Key": keys["app"]}).status_code == 404


def test_refusals_are_counted_by_reason(secured):
    s, keys = secured
    before = {reason: metric(s, "mlnb_auth_failures_total", reason=reason) for reason in ("missing", "unknown", "forbidden")}
    s.client.post("/invocations", json={})
    s.client.get("/admin/model", headers={"X-API-Key": "mlnb_nope"}); s.client.get("/admin/model", headers={"X-API-Key": "mlnb_nope"})
    s.client.post("/admin/reload", headers={"X-API-Key": keys["app"]})
    after = {reason: metric(s, "mlnb_auth_failures_total", reason=reason) for reason in before}
    assert {reason: after[reason] - before[reason] for reason in before} == {"missing": 1, "unknown": 2, "forbidden": 1}


def test_revocation_and_new_keys_need_no_restart(secured, row):
    s, keys = secured
    body = {"dataframe_records": [row]}
    with s.new_client(keys["temp"]) as temp:
        assert temp.post("/invocations", json=body).status_code == 200
        assert "revoked key 'temp'" in run(["mlnb", "api-key", "revoke", "temp", "--params", "params.yaml"], s.workdir).stdout
        deadline = time.time() + 10                        # the server looks at the file at most once a second
        while temp.post("/invocations", json=body).status_code == 200 and time.time() < deadline: time.sleep(0.1)
        r = temp.post("/invocations", json=body)
        assert r.status_code == 401 and r.json()["error"] == "unknown or revoked API key"
    late = create_key(s.workdir, "late", "operate")
    assert s.client.post("/admin/keys/reload", headers={"X-API-Key": keys["root"]}).status_code == 200
    assert s.client.post("/admin/reload", headers={"X-API-Key": late}).status_code == 200     # at once after the reload
    assert s.proc.poll() is None


def test_keys_never_reach_the_log_but_names_do(secured, row):
    s, keys = secured
    wrong = "mlnb_" + "w" * 43
    s.client.post("/invocations", json={"dataframe_records": [row]}, headers={"X-API-Key": keys["app"], "X-Request-ID": "auth-ok"})
    s.client.post("/admin/reload", headers={"Authorization": f"Bearer {keys['app']}", "X-Request-ID": "auth-403"})
    s.client.post("/invocations", json={"dataframe_records": [row]}, headers={"Authorization": f"Bearer {wrong}", "X-Request-ID": "auth-401"})
    s.client.get("/admin/model", headers={"X-API-Key": keys["ops"], "X-Request-ID": "auth-admin"})
    deadline, lines = time.time() + 10, {}
    while time.time() < deadline and len(lines) < 4:
        time.sleep(0.2)
        lines = {e["request_id"]: e for e in map(json.loads, s.stderr().splitlines()) if str(e.get("request_id", "")).startswith("auth-")}
    assert lines["auth-ok"]["key"] == "app" and lines["auth-ok"]["status"] == 200
    assert (lines["auth-403"]["key"], lines["auth-403"]["status"], lines["auth-403"]["auth"]) == ("app", 403, "forbidden")
    assert (lines["auth-401"]["key"], lines["auth-401"]["status"], lines["auth-401"]["auth"]) == (None, 401, "unknown")
    assert (lines["auth-admin"]["key"], lines["auth-admin"]["status"], lines["auth-admin"]["path"]) == ("ops", 200, "/admin/model")
    everything = s.stderr() + s.client.get("/metrics").text
    for secret in (*keys.values(), wrong):
        assert secret not in everything and secret[len("mlnb_"):] not in everything


def test_a_missing_keys_file_or_certificate_stops_the_server(model_dir, tmp_path):
    directory, keys = model_dir
    cases = [({"auth": {"keys_file": str(tmp_path / "nokeys.yaml")}}, f"serve.auth.keys_file: {tmp_path / 'nokeys.yaml'} not found"),
             ({"tls": {"certfile": str(tmp_path / "none.pem"), "keyfile": str(tmp_path / "none.key")}}, f"serve.tls.certfile: {tmp_path / 'none.pem'}")]
    for serve, message in cases:
        (tmp_path / "params.yaml").write_text(json.dumps(serve_params(directory, keys, tmp_path / "logs", **serve)))
        p = run(["mlnb", "serve", "--params", "params.yaml", "--port", "9"], tmp_path, check=False, timeout=120)
        assert p.returncode == 1 and message in p.stderr, (serve, p.stderr)


def test_https_only_for_clients_that_trust_the_certificate(secured, certificate):
    s, keys = secured
    assert s.url.startswith("https://") and s.client.get("/v2/health/live").status_code == 200
    with pytest.raises(httpx.TransportError):                                    # plain http to the TLS port
        httpx.get(s.url.replace("https://", "http://") + "/v2/health/live", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):   # a client that does not trust the certificate
        httpx.get(s.url + "/v2/health/live", timeout=10)
    cli = ["mlnb", "rollout", "status", "--url", s.url, "--cacert", str(certificate[0])]
    assert run(cli, s.workdir, env={**tool_env(), "MLNB_API_KEY": keys["ops"]}).stdout.startswith("mode off")
    refused = run(cli, s.workdir, check=False)
    assert refused.returncode == 1 and "missing API key" in refused.stderr and "MLNB_API_KEY" in refused.stderr
    untrusting = run(cli[:-2] + ["--api-key", keys["ops"]], s.workdir, check=False)
    assert untrusting.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusting.stderr


@pytest.mark.slow
def test_https_with_two_workers_and_private_metrics(model_dir, certificate, row, tmp_path):
    params = secured_params(model_dir, tmp_path, workers=2, auth={"metrics_public": False}, tls=tls_params(certificate))
    ops = create_key(tmp_path, "ops", "operate")
    s = Server(tmp_path, params, cacert=certificate[0]).wait_ready()
    try:
        with s.new_client(ops) as client:
            for _ in range(4): assert client.post("/invocations", json={"dataframe_records": [row]}).status_code == 200
            assert s.client.get("/metrics").status_code == 401 and "mlnb_requests_total" in client.get("/metrics").text
        assert s.client.get("/v2/health/ready").status_code == 200
    finally:
        s.stop()
