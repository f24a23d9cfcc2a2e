"""The same registry code against a real MLflow tracking server on 127.0.0.1 (team mode)."""
import contextlib
import json
import multiprocessing as mp
import os
import socket
import subprocess
import uuid
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlnb.audit import AuditLog
from mlnb.export import load_verified
from test_registry import _register_in_child, make_env, onnx_models, register, registry_as, telco_split  # noqa: F401 (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POSTGRES = os.environ.get("MLNB_TEST_POSTGRES", "postgresql://mlnb:mlnb@127.0.0.1:5432/mlnb")


@contextlib.contextmanager
def postgres_database():
    "A fresh, empty database on the local PostgreSQL (deploy/team/postgres.sh; `make test` starts it), dropped afterwards."
    import psycopg
    from psycopg import sql
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"no PostgreSQL at {POSTGRES} ({e}); run `bash deploy/team/postgres.sh` (make test does)")
    name = f"mlnb_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as c: c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path):
    "A real MLflow tracking server on 127.0.0.1, backed by SQLite or by PostgreSQL (team mode)."
    with contextlib.ExitStack() as stack:
        backend = f"sqlite:///{tmp_path / 'server.db'}" if request.param == "sqlite" else stack.enter_context(postgres_database())
        yield stack.enter_context(running_mlflow(backend, tmp_path / "server-artifacts"))


@contextlib.contextmanager
def running_mlflow(backend: str, artifacts: Path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                             "--backend-store-uri", backend,
                             "--artifacts-destination", str(artifacts)],
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


def test_eight_processes_register_concurrently_against_a_tracking_server(mlflow_server, tmp_path, onnx_models, telco_split):
    env = make_env(tmp_path / "registry")
    env["train"]["tracking_uri"] = mlflow_server
    test_path = tmp_path / "test.parquet"
    telco_split[1]["test"].to_parquet(test_path)
    register(env, onnx_models["a"], telco_split[1]["test"])          # the model exists first
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_register_in_child, [(env, str(onnx_models[f"p{i}"]), str(test_path)) for i in range(8)])
    assert all(created for _, created in results)
    assert sorted(int(v) for v, _ in results) == list(range(2, 10))  # none lost, none duplicated
    versions = registry_as(env, "vic").versions()
    assert len(versions) == 9 and len({v.tags["mlnb.onnx_sha256"] for v in versions}) == 9
    assert AuditLog(env["registry"]["audit_log"]).verify() == []
