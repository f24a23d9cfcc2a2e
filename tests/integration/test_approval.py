"""Approval is cryptographic and enforced where models load, against a real MLflow SQLite registry with real ONNX files:
a version an alias was moved to in MLflow directly, a rejected rollout challenger, an edited model cache or cache record,
an edited champion in the quality gate, a file swapped after verification, a challenger name that is a path."""
import inspect
import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlnb.core.config import config_from_dict
from mlnb.core.errors import NotApproved, SignatureError
from mlnb.registry.store import RegistryError, RegistryUnreachable
from mlnb.serving.runtime import ModelRef, load_last_verified, load_registered
from registration import SECRETS, make_env, register, registry_as
from serving import Server


def keys(env):
    r, root = env["registry"], Path(env["registry"]["public_key"]).parent
    return (Path(r["public_key"]), Path(r.get("approval_public_key", root / "approval.pub")),
            Path(env["serve"].get("model_cache_key", root / "model-cache.key")))


@pytest.fixture
def versions(onnx_models, telco_split, tmp_path):
    "v1 approved and champion, v2 rejected, v3 a candidate nobody approved."
    test = telco_split[1]["test"]
    env = make_env(tmp_path / "registry")
    env.setdefault("serve", {}).setdefault("model_cache_dir", str(tmp_path / "registry/cache"))
    for m in ("a", "b", "c"): register(env, onnx_models[m], test)
    registry_as(env, "ann").approve("1", "reviewed"); registry_as(env, "adam").promote("1", reason="first champion")
    registry_as(env, "ann").reject("2", "worse on the holdout")
    return env


def mlflow_alias(env, alias, version):
    "What anyone with write access to the MLflow store can do, bypassing mlnb."
    MlflowClient(env["train"]["tracking_uri"]).set_registered_model_alias("churn", alias, version)


def pinned(function, env) -> dict:
    "The approval and cache keys, for a loader that takes them (the code before approvals existed took neither)."
    _, approval, cache_key = keys(env)
    return {"approval_key": approval, "record_key": cache_key} if "approval_key" in inspect.signature(function).parameters else {}


def load(env, ref, **kw):
    return load_registered(registry_as(env, "vic"), ModelRef.parse(ref), keys(env)[0], env["serve"]["model_cache_dir"],
                           **pinned(load_registered, env), **kw)


def test_an_alias_moved_in_mlflow_to_a_rejected_or_unapproved_version_is_refused(versions, monkeypatch):
    env = versions
    monkeypatch.setenv("MLNB_SECRET", SECRETS["vic"])
    assert load(env, "churn@champion").version == "1"
    mlflow_alias(env, "champion", "2")
    with pytest.raises(NotApproved, match="v2 was rejected"): load(env, "churn@champion")
    mlflow_alias(env, "champion", "3")
    with pytest.raises(NotApproved, match="v3 is candidate, not approved"): load(env, "churn@champion")
    from mlnb.pipeline.batch import load_model                       # batch scoring refuses it too
    with pytest.raises(NotApproved, match="not approved"): load_model(config_from_dict(env), "churn@champion", user="vic")


def test_a_version_whose_status_tag_was_set_to_approved_in_mlflow_is_refused(versions):
    env = versions
    MlflowClient(env["train"]["tracking_uri"]).set_model_version_tag("churn", "3", "mlnb.status", "approved")
    with pytest.raises(NotApproved, match="no approval attestation"): load(env, "churn/3")


def test_the_server_refuses_to_start_on_a_rejected_version(versions, tmp_path):
    env = versions
    mlflow_alias(env, "champion", "2")
    params = {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0}}
    s = Server(tmp_path / "work", params, env={"MLNB_USER": "vic", "MLNB_SECRET": SECRETS["vic"]})
    try:
        assert s.proc.wait(120) != 0
    finally: s.stop()
    assert "churn v2 was rejected (worse on the holdout); it is never loaded" in s.stderr()


def test_rollout_start_with_a_rejected_or_unapproved_version_is_409_and_changes_nothing(versions, tmp_path):
    env = versions
    params = {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0}}
    s = Server(tmp_path / "work", params, env={"MLNB_USER": "adam", "MLNB_SECRET": SECRETS["adam"]}).wait_ready()
    try:
        for version, why in (("2", "was rejected"), ("3", "not approved")):
            r = s.client.post("/admin/rollout/start", json={"challenger": f"churn/{version}", "mode": "canary"})
            assert r.status_code == 409 and f"v{version}" in r.text and why in r.text, r.text
        rejected_file = Path(registry_as(env, "vic").get("2").source.removeprefix("file://")) / "model.onnx"
        r = s.client.post("/admin/rollout/start", json={"challenger": str(rejected_file)})   # build-signed, but rejected
        assert r.status_code == 409 and "carries no approval" in r.text, r.text
        r = s.client.post("/admin/rollout/start", json={"challenger": "../../x@challenger"})
        assert r.status_code == 409 and "not a model name" in r.text, r.text
        status = s.client.get("/admin/rollout").json()
        assert status["challenger"] is None and (status["rollout"] or {}).get("share", 0) == 0
    finally: s.stop()
    assert not any(e["action"] == "rollout.start" for e in map(json.loads, Path(env["registry"]["audit_log"]).read_text().splitlines()))
    assert not (tmp_path / "x").exists() and not (tmp_path / "registry/x").exists()


def test_an_edited_model_cache_is_refused(versions):
    env = versions
    cached = load(env, "churn@champion").path.parent
    facts = cached / "bundle.json"                                     # any file of the bundle: schema, facts, reference
    facts.write_text(facts.read_text().replace('"task"', '"task" ', 1))
    with pytest.raises(SignatureError, match="bundle.json"): load(env, "churn@champion")
    facts.write_text(facts.read_text().replace('"task" ', '"task"', 1)); (cached / "schema.yaml").write_text("columns: {}\n")
    with pytest.raises(SignatureError, match="schema.yaml"): load(env, "churn@champion")        # an added file too
    shutil.rmtree(cached)
    assert load(env, "churn@champion").version == "1"                  # fetched afresh from the registry
    (cached / "model.onnx").write_bytes((cached / "model.onnx").read_bytes() + b" ")
    with pytest.raises(SignatureError, match="model.onnx"): load(env, "churn@champion")


def test_an_edited_cache_record_cannot_downgrade_a_server_with_the_registry_down(versions, onnx_models, telco_split):
    env = versions
    registry_as(env, "ann").approve("3", "also fine")
    registry_as(env, "adam").promote("3", reason="newer")
    public, approval, cache_key = keys(env)
    cache, ref, down = env["serve"]["model_cache_dir"], ModelRef.parse("churn@champion"), ConnectionError("down")
    load(env, "churn/1")                                               # an old approved version, in the cache
    assert load(env, "churn@champion").version == "3"
    assert load_last_verified(ref, public, cache, down, **pinned(load_last_verified, env)).version == "3"
    record_path = Path(cache) / "churn/verified-champion.json"
    record = json.loads(record_path.read_text())
    old = load(env, "churn/1")
    record.update(version="1", file="churn/1/model.onnx", sha256=old.sha256)
    record_path.write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="does not verify under the cache key"):
        load_last_verified(ref, public, cache, down, **pinned(load_last_verified, env))


def test_the_gate_refuses_an_edited_champion(versions, onnx_models, telco_split):
    env = versions
    champion = registry_as(env, "vic").get("1")
    artifacts = Path(MlflowClient(env["train"]["tracking_uri"]).download_artifacts(champion.run_id, "model", str(Path(env["serve"]["model_cache_dir"]) / "dl")))
    store = Path(champion.source.removeprefix("file://"))               # the artifact store's copy
    assert (store / "bundle.json").exists(), store
    (store / "bundle.json").write_text((artifacts / "bundle.json").read_text().replace('"task"', '"task" ', 1))
    with pytest.raises(NotApproved, match="champion churn v1 does not verify"):
        register(env, onnx_models["d"] if "d" in onnx_models else _twin(onnx_models["a"], Path(env["serve"]["model_cache_dir"])), telco_split[1]["test"])
    assert [v.version for v in registry_as(env, "vic").versions()] == ["3", "2", "1"]      # nothing registered


def _twin(model: Path, where: Path) -> Path:
    import onnx
    twin = onnx.load(model); twin.doc_string = "another build"
    where.mkdir(parents=True, exist_ok=True); onnx.save(twin, where / "twin.onnx")
    return where / "twin.onnx"


def test_a_file_swapped_after_verification_is_not_what_is_served(versions, monkeypatch):
    "Finding 3: the swap lands in the cache right after the signature check; what loads is still the verified bytes."
    import mlnb.serving.runtime as runtime
    env = versions
    registry_as(env, "ann").approve("3", "also fine")
    good = load(env, "churn/1")
    cached = good.path
    other = load(env, "churn/3")
    import mlnb.model.signing as signing
    real = signing.verify_model
    def verify_then_swap(*args, **kw):
        real(*args, **kw)                                              # the check passes, then the cache's file is replaced
        shutil.copy(other.path, cached); shutil.copy(f"{other.path}.sig", f"{cached}.sig")   # a signed file, the wrong one
    monkeypatch.setattr(signing, "verify_model", verify_then_swap)
    monkeypatch.setattr(runtime, "verify_model", verify_then_swap, raising=False)
    served = load(env, "churn/1")
    assert served.sha256 == good.sha256 != other.sha256
    import hashlib
    assert hashlib.sha256(served.data).hexdigest() == good.sha256


def test_a_challenger_name_that_is_a_path_is_refused_and_writes_nothing(versions, tmp_path):
    env = versions
    public, approval, cache_key = keys(env)
    before = set(tmp_path.rglob("*"))
    for text in ("../../x@challenger", "../x/1", "a/b@champion"):
        with pytest.raises(ValueError, match="not a model name"):
            ModelRef.parse(text, default_name="churn")
    with pytest.raises(Exception, match="not a model name|holds model"):
        load_registered(registry_as(env, "vic"), ModelRef(name="../../x", alias="challenger"), public,
                        env["serve"]["model_cache_dir"], **pinned(load_registered, env))
    assert {p for p in set(tmp_path.rglob("*")) - before if "x" == p.name} == set()
