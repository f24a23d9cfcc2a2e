"""The same registry code against a real MLflow tracking server on 127.0.0.1 (team mode)."""
import contextlib
import multiprocessing as mp

import pytest

from mlnb.core.audit import AuditLog
from mlnb.model.signing import load_verified
from tracking import postgres_database, running_mlflow
from registration import _register_in_child, make_env, register, registry_as


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path):
    "A real MLflow tracking server on 127.0.0.1, backed by SQLite or by PostgreSQL (team mode)."
    with contextlib.ExitStack() as stack:
        backend = f"sqlite:///{tmp_path / 'server.db'}" if request.param == "sqlite" else stack.enter_context(postgres_database())
        yield stack.enter_context(running_mlflow(backend, tmp_path / "server-artifacts"))


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
