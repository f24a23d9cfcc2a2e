"""Health answers are for anyone who can reach the port: ready or not and why, in generic words. The registry's URI
(credentials included) and exception text stay in the server log."""
import logging

from starlette.testclient import TestClient

from mlnb.examples import toy_model
from mlnb.registry.store import Registry
from mlnb.serving.app import ModelServer, create_app
from mlnb.serving.runtime import ModelRef, load_served_model

URI = "http://user:secret@127.0.0.1:9"


def test_health_bodies_name_no_uri_and_no_exception_text(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    toy = toy_model(tmp_path / "toy")
    cfg = toy.config(serve={"model": "churn@champion", "reload_poll_seconds": 0},
                     registry={"tracking_uri": URI, "users": str(tmp_path / "users.yaml"), "audit_log": str(tmp_path / "audit.jsonl")})
    server = ModelServer(cfg, ModelRef.parse("churn@champion"), toy.public_key,
                         model=load_served_model(toy.model, toy.public_key), registry=Registry.from_config(cfg))
    with caplog.at_level(logging.ERROR), TestClient(create_app(server)) as client:
        assert client.post("/admin/reload", headers={"content-type": "application/json"}).status_code >= 400   # the registry does not answer
        bodies = [client.get(path) for path in ("/health", "/v2/health/ready")]
    for r in bodies:
        assert r.status_code == 200                                             # still serving the loaded model
        assert r.json() == {"ready": True, "reload": {"ready": False, "reason": "registry unreachable"}}, r.text
        assert "secret" not in r.text and "127.0.0.1" not in r.text and "Error" not in r.text
    assert "127.0.0.1:9" in caplog.text                                         # the detail is in the server log

    no_model = ModelServer(cfg, ModelRef.parse(str(toy.model)), toy.public_key)  # not started: nothing loaded yet
    client = TestClient(create_app(no_model))                                   # (no lifespan: no load)
    for path in ("/health", "/v2/health/ready"):
        r = client.get(path)
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "no model loaded"}, r.text
