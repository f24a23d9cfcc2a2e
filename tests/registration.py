"""Helpers for the registry tests: a registry whose store, users, audit log and keys all live under one directory, and
registering real ONNX files in it as one of its four users."""
import os
from pathlib import Path

import pandas as pd

from mlnb.core.access import User, Users, hash_secret
from mlnb.core.config import config_from_dict
from mlnb.model.signing import ensure_signing_key
from mlnb.registry.store import Registry, run_gates

SECRETS = {"dana": "ds-secret", "ann": "approver-secret", "adam": "admin-secret", "vic": "viewer-secret"}
ROLES = {"dana": ["data-scientist"], "ann": ["approver"], "adam": ["admin"], "vic": ["viewer"]}


def make_env(root: Path) -> dict:
    "A params mapping whose registry lives entirely under `root`, with four users."
    root.mkdir(parents=True, exist_ok=True)
    users = Users(default_roles=["viewer"], users={n: User(roles=ROLES[n], secret_hash=hash_secret(s)) for n, s in SECRETS.items()})
    users.save(root / "users.yaml")
    return {"data": {"sensitive": ["female"]}, "train": {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "experiment": "reg-tests"},
            "serve": {"model_cache_dir": str(root / "cache"), "model_cache_key": str(root / "keys/model-cache.key")},
            "registry": {"audit_log": str(root / "audit.jsonl"), "users": str(root / "users.yaml"),
                         "signing_key": str(root / "keys/signing.key"), "public_key": str(root / "keys/signing.pub"),
                         "approval_key": str(root / "keys/approval.key"), "approval_public_key": str(root / "keys/approval.pub"),
                         "gates": {"fairness_attributes": ["female"]}}}


def registry_as(params: dict, user: str) -> Registry:
    return Registry.from_config(config_from_dict(params), user, SECRETS.get(user))


def register(params: dict, model: Path, test: pd.DataFrame, user: str = "dana"):
    cfg = config_from_dict(params)
    reg = registry_as(params, user)
    key, pub = Path(cfg.registry.signing_key), Path(cfg.registry.public_key)
    ensure_signing_key(key, pub)
    fairness = {"female": {"demographic_parity_ratio": 0.95}}
    gates = lambda cand, champ, sig_err: run_gates(cand, champ, test, cfg, fairness, {"passed": True}, sig_err)
    return reg.register({"model.onnx": model}, {"mlnb.family": "logreg"}, {"task": "binary"}, gates, key, pub)


def _register_in_child(args):
    "`register` in another process (a multiprocessing pool's or a `python -c` child's); the test split from Parquet."
    params, model, test_path = args
    test = pd.read_parquet(test_path)
    v, created = register(params, Path(model), test)
    return v.version, created


def _promote_in_child(args):
    "Promote each of `versions` to champion in turn, as the admin, in another process (own client); start at `barrier`."
    params, versions, barrier = args
    reg = registry_as(params, "adam")
    barrier.wait(120)
    for v in versions:
        reg.promote(v, reason=f"promoter {os.getpid()}")
    return os.getpid()
