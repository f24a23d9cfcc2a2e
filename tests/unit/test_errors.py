"""One error hierarchy: every exception mlnb defines is an `MlnbError`, and the `mlnb` command turns each kind into
`error: <message>` on stderr and the kind's exit status."""
import importlib
import inspect
import json
import pkgutil

import pytest

import mlnb
from conftest import run
from mlnb.core.access import User, Users, hash_secret
from mlnb.core.errors import AccessDenied, ConfigError, MlnbError, RegistryError


def defined_exceptions() -> list[type]:
    "Every exception class defined (not just imported) in a module of the mlnb package."
    found = []
    for info in pkgutil.walk_packages(mlnb.__path__, "mlnb."):
        module = importlib.import_module(info.name)
        found += [c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, BaseException) and c.__module__ == module.__name__]
    return found


def test_every_exception_mlnb_defines_is_an_mlnb_error():
    kinds = defined_exceptions()
    assert len(kinds) >= 15, kinds                     # the walk did reach the package's modules
    assert [k.__qualname__ for k in kinds if not issubclass(k, MlnbError)] == []


def test_old_homes_still_export_the_same_classes():
    from mlnb.core.config import ConfigError as from_config
    from mlnb.data.schema import DataError
    from mlnb.model.signing import SignatureError
    from mlnb.registry.store import RegistryUnreachable
    from mlnb.training.export import ParityError
    from mlnb.core import errors
    assert from_config is ConfigError and DataError is errors.DataError and SignatureError is errors.SignatureError
    assert RegistryUnreachable is errors.RegistryUnreachable and issubclass(RegistryUnreachable, RegistryError)
    assert not issubclass(ParityError, AssertionError)
    assert issubclass(ConfigError, ValueError) and issubclass(AccessDenied, PermissionError)


@pytest.fixture
def project(tmp_path):
    "A params file whose registry (an empty MLflow store, an audit log, users) lives in tmp_path."
    admin = User(roles=["admin"], secret_hash=hash_secret("admin-secret"))
    users = Users(default_roles=["viewer"], users={"adam": admin})
    users.save(tmp_path / "users.yaml")
    params = {"train": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "errors"},
              "registry": {"audit_log": str(tmp_path / "audit.jsonl"), "users": str(tmp_path / "users.yaml")}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    return tmp_path


def test_a_config_error_exits_1_naming_the_field(project):
    params = json.loads((project / "params.yaml").read_text())
    (project / "typo.yaml").write_text(json.dumps({**params, "train": {**params["train"], "n_iters": 3}}))
    p = run(["mlnb", "registry", "list", "--params", "typo.yaml"], project, check=False)
    assert p.returncode == ConfigError.exit_code == 1, p.stderr
    assert p.stderr.startswith("error: typo.yaml") and "n_iters" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_access_denial_exits_3(project):
    p = run(["mlnb", "registry", "promote", "churn", "1"], project, check=False)        # the OS user is a viewer here
    assert p.returncode == AccessDenied.exit_code == 3, p.stderr
    assert p.stderr.startswith("error: ") and "may not promote: it needs the admin role" in p.stderr, p.stderr
    p = run("MLNB_NEW_SECRET=pw mlnb users add eve --role approver", project, check=False)
    assert p.returncode == 3 and "manage-users" in p.stderr, p.stderr


def test_a_registry_error_exits_1_naming_the_version(project):
    p = run(["mlnb", "registry", "show", "churn", "7"], project, check=False)
    assert p.returncode == RegistryError.exit_code == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: model 'churn' has no version 7", p.stderr
    assert "Traceback" not in p.stderr


def test_signature_failures_are_told_apart_by_type(tmp_path):
    from mlnb.core.errors import ModifiedAfterSigning, SignatureError, SignatureMissing, SignedWithOtherKey
    from mlnb.model.signing import ensure_signing_key, sign_model, signature_path, verify_model
    ensure_signing_key(tmp_path / "k", tmp_path / "k.pub"); ensure_signing_key(tmp_path / "other", tmp_path / "other.pub")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"model bytes")
    sign_model(model, tmp_path / "k")
    verify_model(model, tmp_path / "k.pub")
    with pytest.raises(SignedWithOtherKey, match="signed with a different key"): verify_model(model, tmp_path / "other.pub")
    model.write_bytes(b"model bytez")
    with pytest.raises(ModifiedAfterSigning, match="modified after signing"): verify_model(model, tmp_path / "k.pub")
    signature_path(model).unlink()
    with pytest.raises(SignatureMissing, match="no signature"): verify_model(model, tmp_path / "k.pub")
    assert issubclass(SignatureMissing, SignatureError) and SignatureMissing.exit_code == 1
