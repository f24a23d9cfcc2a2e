"""The model registry on a real MLflow SQLite store in a temporary directory, and on a real PostgreSQL-backed MLflow tracking
server (team mode), with real ONNX files and signatures."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tracking import postgres_database, running_mlflow
from mlnb.core.access import AccessDenied
from mlnb.core.audit import AuditLog
from mlnb.core.config import config_from_dict
from mlnb.model.signing import SignatureError, ensure_signing_key, load_verified, verify_model
from mlnb.registry.store import Registry, RegistryError

from conftest import ROOT, run, tool_env
from registration import _register_in_child, make_env, register, registry_as


@pytest.fixture(scope="module")
def postgres_tracking(tmp_path_factory):
    "One MLflow tracking server backed by a fresh PostgreSQL database for this module's tests (each test its own model)."
    with postgres_database() as db, running_mlflow(db, tmp_path_factory.mktemp("pg-artifacts") / "artifacts") as url:
        yield url


@pytest.fixture(params=["local", "postgresql"])
def env(request, tmp_path):
    "A registry on the local SQLite store, or on a PostgreSQL-backed tracking server (team mode)."
    params = make_env(tmp_path / "registry")
    if request.param == "postgresql":
        params["train"]["tracking_uri"] = request.getfixturevalue("postgres_tracking")
        params["registry"]["model_name"] = f"churn_{uuid.uuid4().hex[:8]}"
    return params


def test_approval_state_machine(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    v1, created = register(env, onnx_models["a"], test)
    assert created and v1.version == "1" and v1.status == "candidate" and v1.gates_passed
    admin, approver = registry_as(env, "adam"), registry_as(env, "ann")
    with pytest.raises(RegistryError, match="is candidate, not approved"):
        admin.promote("1")
    approver.approve("1", "looks good")
    assert admin.promote("1").aliases == ["champion"]

    v2, _ = register(env, onnx_models["b"], test)
    approver.reject("2", "not better")
    with pytest.raises(RegistryError, match="was rejected"):
        admin.promote("2", "challenger")
    with pytest.raises(RegistryError, match="rejected .*final"):
        approver.approve("2", "changed my mind")
    assert registry_as(env, "vic").alias("challenger") is None

    v3, _ = register(env, onnx_models["c"], test)
    approver.approve("3", "ok")
    admin.promote("3", "challenger")
    admin.promote("3")                                   # challenger -> champion moves both aliases
    assert admin.alias("champion").version == "3" and admin.alias("challenger") is None
    assert admin.rollback("regression in prod").version == "1"
    assert admin.alias("champion").version == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        admin.rollback()
    history = admin.alias_history()
    assert [(m["alias"], m["version"], m["kind"]) for m in history] == [
        ("champion", "1", "promote"), ("challenger", "3", "promote"), ("champion", "3", "promote"), ("champion", "1", "rollback")]
    assert AuditLog(env["registry"]["audit_log"]).verify() == []


def test_identical_model_is_not_registered_twice(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    v1, created1 = register(env, onnx_models["a"], test)
    v2, created2 = register(env, onnx_models["a"], test)
    assert created1 and not created2 and v1.version == v2.version
    assert len(registry_as(env, "vic").versions()) == 1


def test_quality_gate_compares_with_champion_on_same_test_set(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    register(env, onnx_models["a"], test)
    registry_as(env, "ann").approve("1", "first")
    registry_as(env, "adam").promote("1")
    bad, _ = register(env, onnx_models["bad"], test)
    quality = next(g for g in bad.gates if g["name"] == "quality")
    assert not quality["passed"] and "champion v1" in quality["detail"] and f"same {len(test)} rows" in quality["detail"]
    with pytest.raises(RegistryError, match="failed its gates .*quality.*--force"):
        registry_as(env, "ann").approve(bad.version, "ship it")
    assert registry_as(env, "ann").approve(bad.version, "known trade-off", force=True).tags["mlnb.gates_overridden"] == "true"
    last = AuditLog(env["registry"]["audit_log"]).entries()[-1]
    assert last["action"] == "approve" and last["details"]["gates_overridden"] is True


@pytest.mark.parametrize("user, action", [
    ("vic", "register"), ("ann", "register"), ("dana", "approve"), ("adam", "approve"), ("dana", "reject"),
    ("ann", "promote"), ("dana", "promote"), ("ann", "rollback"), ("vic", "rollback")])
def test_each_action_checks_the_role_and_audits_refusals(env, onnx_models, telco_split, user, action):
    test = telco_split[1]["test"]
    register(env, onnx_models["a"], test)
    register(env, onnx_models["b"], test)
    registry_as(env, "ann").approve("1", "ok"); registry_as(env, "adam").promote("1")
    registry_as(env, "ann").approve("2", "ok"); registry_as(env, "adam").promote("2")
    reg = registry_as(env, user)
    calls = {"register": lambda: register(env, onnx_models["c"], test, user), "approve": lambda: reg.approve("1", "x"),
             "reject": lambda: reg.reject("1", "x"), "promote": lambda: reg.promote("1"), "rollback": lambda: reg.rollback()}
    with pytest.raises(AccessDenied, match=f"user '{user}'.*may not {action}"):
        calls[action]()
    last = AuditLog(env["registry"]["audit_log"]).entries()[-1]
    assert last["action"] == "denied" and last["actor"] == user and last["details"]["attempted"] == action


def test_identity_is_checked(env):
    with pytest.raises(AccessDenied, match="wrong secret"):
        Registry.from_config(config_from_dict(env), "ann", "guess")
    with pytest.raises(AccessDenied, match="unknown user 'mallory'"):
        Registry.from_config(config_from_dict(env), "mallory", "x")
    assert registry_as(env, "vic").versions() == []          # viewers may read


def test_audit_log_tampering_is_detected_and_named(env, onnx_models, telco_split, tmp_path):
    register(env, onnx_models["a"], telco_split[1]["test"])
    registry_as(env, "ann").approve("1", "ok")
    registry_as(env, "adam").promote("1")
    log = AuditLog(env["registry"]["audit_log"])
    original = log.path.read_text().splitlines()
    assert len(original) >= 4 and log.verify() == []
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(env))                         # JSON is YAML

    def check(lines, fragment, line_no):
        log.path.write_text("\n".join(lines) + "\n")
        problems = log.verify()
        assert any(fragment in str(p) and p.line == line_no for p in problems), problems
        cli = run(["mlnb", "audit", "verify", "--params", str(params)], tmp_path, check=False)
        assert cli.returncode == 1 and fragment in cli.stderr

    check([original[0], original[1].replace('"actor": "', '"actor": "x', 1)] + original[2:], "edited", 2)
    check([original[0]] + original[2:], "missing (deleted)", 2)
    check([original[0], original[2], original[1]] + original[3:], "reordered", 3)
    check(original[:-1], "entries removed from the end", len(original) - 1)
    log.path.write_text("\n".join(original) + "\n")
    assert log.verify() == []


def test_signature_verification(env, onnx_models, telco_split, tmp_path):
    register(env, onnx_models["a"], telco_split[1]["test"])
    model_dir = registry_as(env, "vic").download("1", tmp_path / "dl")
    pub = env["registry"]["public_key"]
    assert load_verified(model_dir / "model.onnx", pub).inputs["tenure"] == "tensor(float)"
    data = bytearray((model_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="modified after signing"):
        load_verified(model_dir / "model.onnx", pub)
    data[len(data) // 2] ^= 0x01
    (model_dir / "model.onnx").write_bytes(bytes(data))
    ensure_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="different key"):
        verify_model(model_dir / "model.onnx", tmp_path / "other.pub")
    (model_dir / "model.onnx.sig").unlink()
    with pytest.raises(SignatureError, match="no signature"):
        verify_model(model_dir / "model.onnx", pub)


def test_signature_gate_fails_with_the_wrong_public_key(env, onnx_models, telco_split, tmp_path):
    ensure_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    env["registry"]["public_key"] = str(tmp_path / "other.pub")
    ensure_signing_key(Path(env["registry"]["signing_key"]), tmp_path / "unused.pub")
    v, _ = register(env, onnx_models["a"], telco_split[1]["test"])
    sig = next(g for g in v.gates if g["name"] == "signature")
    assert not sig["passed"] and "different key" in sig["detail"] and not v.gates_passed


def test_eight_processes_register_concurrently_without_loss_or_duplicates(env, onnx_models, telco_split, tmp_path):
    test_path = tmp_path / "test.parquet"
    telco_split[1]["test"].to_parquet(test_path)
    ensure_signing_key(Path(env["registry"]["signing_key"]), Path(env["registry"]["public_key"]))
    register(env, onnx_models["a"], telco_split[1]["test"])          # create the store and the model first
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_register_in_child, [(env, str(onnx_models[f"p{i}"]), str(test_path)) for i in range(8)])
    assert all(created for _, created in results)
    numbers = sorted(int(v) for v, _ in results)
    assert numbers == list(range(2, 10))                               # none lost, none duplicated
    versions = registry_as(env, "vic").versions()
    assert len(versions) == 9 and len({v.tags["mlnb.onnx_sha256"] for v in versions}) == 9
    assert AuditLog(env["registry"]["audit_log"]).verify() == []


@pytest.mark.parametrize("failpoint", ["register:after-version", "register:before-complete"])
def test_crash_during_registration_leaves_no_visible_version(env, onnx_models, telco_split, tmp_path, failpoint):
    env["registry"]["incomplete_after_seconds"] = 0      # on a tracking server, an incomplete version counts as crashed after this
    test_path = tmp_path / "test.parquet"
    telco_split[1]["test"].to_parquet(test_path)
    register(env, onnx_models["a"], telco_split[1]["test"])
    script = ("import sys, json; sys.path.insert(0, %r); from registration import _register_in_child; "
              "_register_in_child((json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]))") % str(ROOT / "tests")
    child = subprocess.run([sys.executable, "-c", script, json.dumps(env), str(onnx_models["b"]), str(test_path)],
                           env={**tool_env(), "MLNB_FAILPOINT": failpoint}, capture_output=True, text=True)
    assert child.returncode == 86, child.stderr
    viewer = registry_as(env, "vic")
    assert [v.version for v in viewer.versions()] == ["1"]
    with pytest.raises(RegistryError, match="not completely registered"):
        viewer.get("2")
    with pytest.raises(RegistryError, match="not completely registered"):
        registry_as(env, "ann").approve("2", "sneaky")
    v, created = register(env, onnx_models["b"], telco_split[1]["test"])   # the next registration cleans up
    assert created and v.version == "3" and [x.version for x in viewer.versions()] == ["3", "1"]
    cleanup = [e for e in AuditLog(env["registry"]["audit_log"]).entries() if e["action"] == "cleanup"]
    assert [e["details"]["version"] for e in cleanup] == ["2"]


def test_bootstrap_makes_the_first_version_champion_only_when_every_gate_passes(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    env["registry"]["gates"]["min_demographic_parity_ratio"] = 0.99       # the fixture's ratio is 0.95: fairness fails
    failing, _ = register(env, onnx_models["a"], test)
    reg = registry_as(env, "dana")
    assert not failing.gates_passed and not reg.bootstrap(failing)
    assert reg.get(failing.version).status == "candidate" and reg.alias("champion") is None
    env["registry"]["gates"]["min_demographic_parity_ratio"] = 0.8
    passing, _ = register(env, onnx_models["b"], test)
    reg = registry_as(env, "dana")                       # a data scientist: the policy, not the user, approves
    assert passing.gates_passed and reg.bootstrap(passing)
    champion = reg.alias("champion")
    assert champion.version == passing.version and champion.tags["mlnb.decided_by"] == "mlnb:bootstrap"
    actions = [(e["actor"], e["action"]) for e in AuditLog(env["registry"]["audit_log"]).entries()][-2:]
    assert actions == [("mlnb:bootstrap", "approve"), ("mlnb:bootstrap", "promote")]
    third, _ = register(env, onnx_models["c"], test)
    assert not reg.bootstrap(third) and reg.get(third.version).status == "candidate"   # only while there is no champion
