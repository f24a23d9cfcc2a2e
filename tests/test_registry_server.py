"""The same registry code against a real MLflow tracking server on 127.0.0.1 (team mode)."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlnb.audit import AuditLog
from mlnb.export import load_verified
from test_registry import make_env, onnx_models, register, registry_as, telco_split  # noqa: F401 (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy in 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_registry_workflow_against_a_tracking_server(mlflow_server, tmp_path, onnx_models, telco_split):
    env = make_env(tmp_path / "registry")
    env["train"]["tracking_uri"] = mlflow_server
    test = telco_split[1]["test"]
    v1, created = register(env, onnx_models["a"], test)
    assert created and v1.status == "candidate" and v1.source.startswith("mlflow-artifacts:")
    registry_as(env, "ann").approve("1", "ok")
    registry_as(env, "adam").promote("1")
    v2, _ = register(env, onnx_models["b"], test)
    assert next(g for g in v2.gates if g["name"] == "quality")["detail"].count("champion v1") == 1
    registry_as(env, "ann").approve("2", "ok")
    registry_as(env, "adam").promote("2")
    assert registry_as(env, "adam").rollback().version == "1"
    model_dir = registry_as(env, "vic").download("1", tmp_path / "dl")
    assert load_verified(model_dir / "model.onnx", env["registry"]["public_key"]).inputs
    assert AuditLog(env["registry"]["audit_log"]).verify() == []
