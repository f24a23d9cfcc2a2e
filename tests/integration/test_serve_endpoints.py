"""What a real `mlnb serve` on 127.0.0.1 gives away and how much it can be made to hold: a registry password reaches neither
its log nor an answer; /metrics needs a key when keys are on; a Host it does not answer for is a 400; without keys it
will not bind another interface, and a body-less state-changing POST needs a JSON Content-Type; slow or oversized
request heads and bodies are cut off (408, 431) while others are served; past the concurrency limit uvicorn answers
503, never a 500."""
import json
import socket
import subprocess
import time

import pytest
from starlette.testclient import TestClient

from conftest import BIN, tool_env
from mlnb.examples import toy_model
from mlnb.serving.app import ModelServer, create_app
from mlnb.model.signing import attest_approval, ensure_signing_key
from mlnb.serving.runtime import ModelRef, file_sha256, load_served_model, remember_verified
from serving import CHALLENGE, Server, create_key, free_port, secured_params, serve_params, signed_model_dir

PASSWORD = "pw-8c1f0e2d9b"


def test_a_registry_password_reaches_neither_the_log_nor_an_answer(model_dir, tmp_path):
    "The registry is unreachable at start: the server serves the copy it verified last, and says so without the password."
    directory, keys = model_dir
    cache, ref = tmp_path / "cache", ModelRef.parse("churn@champion")
    copy = signed_model_dir(directory / "model.onnx", cache / "churn" / "3", keys)
    ensure_signing_key(tmp_path / "approval.key", tmp_path / "approval.pub")       # the copy was approved when it was cached
    attest_approval(copy, tmp_path / "approval.key", name="churn", version="3", run_id=None, onnx_sha256=file_sha256(copy / "model.onnx"),
                    approver="ann", reason="approved before the registry went down")
    remember_verified(load_served_model(copy / "model.onnx", keys / "signing.pub", "churn", "3", "churn/3"), ref, cache, tmp_path / "cache.key")
    port = free_port()                                            # nothing listens there
    params = serve_params(directory, keys, tmp_path / "logs", model="churn@champion", model_cache_dir=str(cache),
                          model_cache_key=str(tmp_path / "cache.key"))
    params["registry"]["approval_public_key"] = str(tmp_path / "approval.pub")
    params["registry"].update(tracking_uri=f"http://mlnb-user:{PASSWORD}@127.0.0.1:{port}", users=str(tmp_path / "users.yaml"),
                              audit_log=str(tmp_path / "audit.jsonl"))
    s = Server(tmp_path / "work", params, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}).wait_ready()
    try:
        json_post = {"content-type": "application/json"}
        answers = [s.client.post("/admin/reload", headers=json_post), s.client.get("/admin/model"), s.client.get("/health"),
                   s.client.get("/v2/health/ready"), s.client.get("/metrics"), s.client.get("/admin/rollout"),
                   s.client.post("/admin/rollout/start", headers=json_post, json={"challenger": "churn@challenger"})]
        assert answers[0].status_code == 503 and answers[1].json()["registry_error"], [a.text for a in answers[:2]]
        time.sleep(0.5)
        log = s.stderr()
    finally:
        s.stop()
    assert f"127.0.0.1:{port}" in log and "***@" in log, log          # the log still says which registry
    assert PASSWORD not in log, log
    for a in answers: assert PASSWORD not in a.text, (a.request.url, a.text)


def test_metrics_need_an_operate_key_when_keys_are_on(model_dir, tmp_path):
    params = secured_params(model_dir, tmp_path)                   # serve.auth.metrics_public unset
    ops = create_key(tmp_path, "ops", "operate")
    s = Server(tmp_path, params, api_key=ops).wait_ready()
    try:
        with s.new_client() as anonymous:
            r = anonymous.get("/metrics")
            assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE, r.text
            assert anonymous.get("/openapi.json").json()["paths"]["/metrics"]["get"]["x-mlnb-role"] == "operate"
        assert "mlnb_requests_total" in s.client.get("/metrics").text
    finally:
        s.stop()


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    "A server with allowed hosts, short read timeouts, a small header limit and a concurrency limit of 3."
    directory, keys = model_dir
    root = tmp_path_factory.mktemp("limited")
    params = serve_params(directory, keys, root / "logs", allowed_hosts=["127.0.0.1", "api.example.com"], read_timeout_seconds=1.5,
                          max_header_bytes=4096, limit_concurrency=3)
    s = Server(root, params).wait_ready()
    yield s
    s.stop()


def test_a_host_the_server_does_not_answer_for_is_a_400(limited, records):
    r = limited.client.post("/invocations", json={"dataframe_records": records[:1]}, headers={"Host": "evil.example"})
    assert r.status_code == 400 and "Host header" in r.json()["error"], r.text
    assert limited.client.get("/admin/model", headers={"Host": "evil.example:8080"}).status_code == 400
    r = limited.client.post("/invocations", json={"dataframe_records": records[:1]}, headers={"Host": "API.example.com:443"})
    assert r.status_code == 200, r.text


def raw(server, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head)
    return sock


def answer(sock: socket.socket, deadline: float, trickle: bytes = b"") -> tuple[float, str, dict]:
    "Wait for the server's answer, sending a byte of `trickle` every 0.2 s meanwhile: (seconds waited, status line, JSON body)."
    started, sock_timeout = time.monotonic(), sock.gettimeout()
    sock.settimeout(0.2)
    data = b""
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
                if not chunk: break
                data += chunk
                if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1]: break
            except socket.timeout:
                if trickle: sock.sendall(trickle[:1]); trickle = trickle[1:]
    finally:
        sock.settimeout(sock_timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    return time.monotonic() - started, head.split(b"\r\n")[0].decode(), json.loads(body) if body else {}


def test_a_body_trickled_slower_than_the_read_timeout_gets_a_408_and_others_are_served(limited, records):
    head = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n"
            b'{"dataframe_records": [')
    with raw(limited, head) as sock:
        assert limited.client.get("/v2/health/ready").status_code == 200          # served while that one trickles
        waited, status, body = answer(sock, time.monotonic() + 10, trickle=b" " * 100)
    assert status == "HTTP/1.1 408 Request Timeout" and "body did not arrive within 1.5 s" in body["error"], (status, body)
    assert 1.0 < waited < 4.0, waited
    r = limited.client.post("/invocations", json={"dataframe_records": records[:1]})
    assert r.status_code == 200, r.text


def test_headers_sent_slower_than_the_read_timeout_get_a_408(limited):
    with raw(limited, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n") as sock:
        waited, status, body = answer(sock, time.monotonic() + 10, trickle=b"X-Slow: 1" * 20)
    assert status == "HTTP/1.1 408 Request Timeout" and "headers did not arrive" in body["error"], (status, body)
    assert waited < 4.0
    with raw(limited, b"") as idle:                                   # connected, and nothing sent at all
        _, status, _ = answer(idle, time.monotonic() + 10)
    assert status == "HTTP/1.1 408 Request Timeout"


def test_headers_over_the_limit_get_a_json_431(limited):
    r = limited.client.get("/ping", headers={"X-Big": "a" * 5000})
    assert r.status_code == 431 and "serve.max_header_bytes" in r.json()["error"], r.text
    assert limited.client.get("/ping").status_code == 200


def test_past_the_concurrency_limit_uvicorn_answers_503_not_500(limited):
    limited.client.get("/ping")                                       # the test client's own connection: 1 of 3
    idle = [raw(limited, b"") for _ in range(2)]
    try:
        time.sleep(0.2)
        r = limited.client.get("/ping")
        assert r.status_code == 503, r.text                           # uvicorn's own "Service Unavailable"
    finally:
        for sock in idle: sock.close()
    time.sleep(0.3)
    assert limited.client.get("/ping").status_code == 200


def test_a_body_less_state_changing_post_needs_a_json_content_type(model_dir, tmp_path):
    "What a page in the operator's browser can send to 127.0.0.1 without a preflight: a POST with no body and no Content-Type."
    s = Server(tmp_path, serve_params(*model_dir, tmp_path / "logs")).wait_ready()
    try:
        for path in ("/admin/reload", "/admin/rollout/rollback", "/admin/rollout/start"):
            r = s.client.post(path)
            assert "content-type" not in r.request.headers and r.status_code == 415, (path, r.text)
            assert "send application/json, even without a body" in r.json()["error"]
        assert s.client.post("/admin/reload", headers={"content-type": "application/json"}).status_code == 200
    finally:
        s.stop()


def test_without_keys_a_non_loopback_bind_is_refused_unless_insecure(model_dir, tmp_path):
    params = serve_params(*model_dir, tmp_path / "logs")
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    proc = subprocess.Popen([str(BIN / "mlnb"), "serve", "--params", "params.yaml", "--host", "0.0.0.0", "--port", str(free_port())],
                            cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try: _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.communicate()
        pytest.fail("mlnb serve --host 0.0.0.0 without keys kept serving")
    assert proc.returncode != 0 and "access control is off" in err and "--insecure" in err, err
    help_text = subprocess.run([str(BIN / "mlnb"), "serve", "--help"], env=tool_env(), capture_output=True, text=True).stdout
    assert "--insecure" in help_text


@pytest.mark.parametrize("insecure", [False, True], ids=["default", "insecure"])
def test_without_keys_admin_rollout_and_feedback_answer_only_this_machine(tmp_path, insecure):
    "The whole app in process, its requests coming from another machine's address (a TCP peer the test cannot be)."
    toy = toy_model(tmp_path / "toy")
    cfg = toy.config(serve={"reload_poll_seconds": 0, **({"insecure": True} if insecure else {})}, registry={"audit_log": str(tmp_path / "audit.jsonl")})
    server = ModelServer(cfg, ModelRef.parse(str(toy.model)), toy.public_key, model=load_served_model(toy.model, toy.public_key))
    json_post = {"content-type": "application/json"}
    app = create_app(server)
    with TestClient(app, client=("192.0.2.10", 40000)) as remote:               # runs the lifespan: the server starts
        local = TestClient(app, client=("127.0.0.1", 40001))
        row = {"dataframe_records": [{"tenure": 3, "contract": "Month-to-month"}]}
        assert remote.post("/invocations", json=row).status_code == 200            # predictions stay open
        assert remote.get("/v2/health/ready").status_code == 200
        refused = [remote.post("/admin/reload", headers=json_post), remote.get("/admin/model"), remote.get("/admin/rollout"),
                   remote.post("/admin/rollout/start", json={}), remote.post("/feedback", json={"feedback": [{"prediction_id": "x", "actual": "Yes"}]})]
        assert local.post("/admin/reload", headers=json_post).status_code == 200
    if insecure:
        assert [r.status_code for r in refused][:3] == [200, 200, 200], [r.text for r in refused]
    else:
        assert [r.status_code for r in refused] == [403] * 5, [r.text for r in refused]
        assert all("only to this machine" in r.json()["error"] and "192.0.2" not in r.text for r in refused)


def _whole(sock: socket.socket) -> bytes:
    "Everything the server sends until it closes the connection."
    data = b""
    while chunk := sock.recv(65536): data += chunk
    return data


def test_a_response_is_one_write_and_connection_close_and_pipelining_still_get_whole_answers(limited, records):
    "The head and body of a reply leave in one write (a corked transport): a closing or pipelined connection loses neither."
    body = json.dumps({"dataframe_records": records[:1]}).encode()
    post = lambda extra=b"", version=b"1.1": (b"POST /invocations HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                              b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)
    for request in (post(b"Connection: close\r\n"), post(version=b"1.0")):     # closed right after the reply's body
        with raw(limited, request) as sock: data = _whole(sock)
        head, _, reply = data.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].endswith(b"200 OK") and json.loads(reply)["predictions"], data
    with raw(limited, post() + post() + post(b"Connection: close\r\n")) as sock:   # three pipelined on one connection
        data = _whole(sock)
    assert data.count(b"HTTP/1.1 200 OK") == 3 and data.count(b'"predictions"') == 3, data
