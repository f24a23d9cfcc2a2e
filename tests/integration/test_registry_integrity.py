"""Registry roles and races (issue 18, findings 7-8): user secrets stay out of git, only an approver's approval moves an
alias (audited as the real user), approve's alias move happens under the store lock, and concurrent promoters on the
PostgreSQL team-mode server lose no alias history."""
import contextlib
import json
import multiprocessing as mp
import stat
import subprocess

import pytest
from filelock import FileLock, Timeout

from conftest import run
from mlnb.core.access import AccessDenied, Users
from mlnb.core.audit import AuditLog
from registration import _promote_in_child, make_env, register, registry_as
from tracking import postgres_database, running_mlflow


def test_users_add_keeps_secret_hashes_out_of_users_yaml_in_a_0600_file_git_ignores(tmp_path):
    shutil = __import__("shutil")
    shutil.copy(__import__("conftest").ROOT / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}}))
    run("git init -q", tmp_path)
    run("MLNB_NEW_SECRET=boss-pw mlnb users add boss --role admin", tmp_path)
    run("MLNB_USER=boss MLNB_SECRET=boss-pw MLNB_NEW_SECRET=ann-pw mlnb users add ann --role approver", tmp_path)  # boss's secret was found
    users_yaml = (tmp_path / "registry" / "users.yaml").read_text()
    assert "secret_hash" not in users_yaml and "scrypt" not in users_yaml, users_yaml
    secrets = tmp_path / "registry" / "secrets" / "users.secrets.yaml"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600 and stat.S_IMODE(secrets.parent.stat().st_mode) == 0o700
    assert secrets.read_text().count("scrypt$") == 2
    untracked = run("git status --porcelain --untracked-files=all", tmp_path).stdout
    assert "registry/users.yaml" in untracked and "secrets" not in untracked, untracked
    assert Users.load(tmp_path / "registry" / "users.yaml").users["ann"].secret_hash.startswith("scrypt$")


def test_an_old_users_yaml_with_hashes_still_loads_and_the_next_add_moves_them_out(tmp_path):
    from mlnb.core.access import hash_secret
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}}))
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "users.yaml").write_text(f"users: {{boss: {{roles: [admin], secret_hash: '{hash_secret('boss-pw')}'}}}}\n")
    with pytest.warns(UserWarning, match="moves them to"):
        assert Users.load(tmp_path / "registry" / "users.yaml").users["boss"].secret_hash
    run("MLNB_USER=boss MLNB_SECRET=boss-pw MLNB_NEW_SECRET=ann-pw mlnb users add ann --role approver", tmp_path)
    assert "scrypt" not in (tmp_path / "registry" / "users.yaml").read_text()
    assert (tmp_path / "registry" / "secrets" / "users.secrets.yaml").read_text().count("scrypt$") == 2


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path / "registry")


def test_a_data_scientist_cannot_move_champion_through_on_approval(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    register(env, onnx_models["a"], test)
    registry_as(env, "ann").approve("1", "ok")
    registry_as(env, "adam").promote("1")
    register(env, onnx_models["b"], test)
    registry_as(env, "ann").approve("2", "ok")                            # approved, but nobody with the role promoted it
    with pytest.raises(AccessDenied, match="may not promote"):
        registry_as(env, "dana").on_approval("2", "champion", "ann", "naming someone else as the actor")
    assert registry_as(env, "vic").alias("champion").version == "1"
    assert not [e for e in AuditLog(env["registry"]["audit_log"]).entries() if e["action"] == "promote" and e["details"]["version"] == "2"]


def test_an_approval_moves_the_marked_alias_as_the_approver_naming_the_policy(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    register(env, onnx_models["a"], test)
    registry_as(env, "ann").approve("1", "ok")
    registry_as(env, "adam").promote("1")
    register(env, onnx_models["b"], test)
    registry_as(env, "dana").on_approval("2", "challenger", "mlnb:retrain", "retrained")
    assert registry_as(env, "vic").alias("challenger") is None             # marked, not moved: it is not approved
    registry_as(env, "ann").approve("2", "reviewed")
    assert registry_as(env, "vic").alias("challenger").version == "2"
    move = [e for e in AuditLog(env["registry"]["audit_log"]).entries() if e["action"] == "promote"][-1]
    assert (move["actor"], move["details"].get("policy"), move["details"]["alias"]) == ("ann", "mlnb:retrain", "challenger")
    last = registry_as(env, "vic").alias_history()[-1]
    assert (last["by"], last.get("policy")) == ("ann", "mlnb:retrain")


def test_approve_moves_the_alias_while_holding_the_store_lock(env, onnx_models, telco_split):
    test = telco_split[1]["test"]
    register(env, onnx_models["a"], test)
    registry_as(env, "ann").approve("1", "ok")
    registry_as(env, "adam").promote("1")
    register(env, onnx_models["b"], test)
    registry_as(env, "dana").on_approval("2", "challenger", "mlnb:retrain", "retrained")
    approver = registry_as(env, "ann")
    store_lock = env["train"]["tracking_uri"].removeprefix("sqlite:///") + ".lock"
    held, set_alias = [], approver.client.set_registered_model_alias

    def observed(*args, **kwargs):                   # what another process (a promote) would find at this moment
        try:
            with FileLock(store_lock, timeout=0): held.append(False)
        except Timeout: held.append(True)
        return set_alias(*args, **kwargs)

    approver.client.set_registered_model_alias = observed
    approver.approve("2", "reviewed")
    assert held == [True], "the alias moved while another process could take the store lock and interleave"


@pytest.mark.slow
def test_eight_concurrent_promoters_on_postgresql_lose_no_alias_history(tmp_path, onnx_models, telco_split):
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_mlflow(stack.enter_context(postgres_database()), tmp_path / "server-artifacts"))
        env = make_env(tmp_path / "registry")
        env["train"]["tracking_uri"] = server
        test = telco_split[1]["test"]
        for m in ("a", "b", "p0"):
            register(env, onnx_models[m], test)
        for v in ("1", "2", "3"):
            registry_as(env, "ann").approve(v, "ok")
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(8) as pool:
            barrier = manager.Barrier(8)
            jobs = [(env, [str((i + j) % 3 + 1) for j in range(4)], barrier) for i in range(8)]
            pool.map(_promote_in_child, jobs)
        reg = registry_as(env, "vic")
        history = reg.alias_history()
        assert [m["seq"] for m in history] == list(range(1, len(history) + 1)), history     # no gap, no duplicate
        assert len(history) >= 8
        for before, after in zip(history, history[1:]):                                    # each move starts where the last ended
            assert after["previous"] == before["version"], (before, after)
        assert reg.alias("champion").version == history[-1]["version"]
        promotes = [e for e in AuditLog(env["registry"]["audit_log"]).entries() if e["action"] == "promote"]
        assert len(promotes) == len(history)                                              # one audited move per history entry
        assert AuditLog(env["registry"]["audit_log"]).verify() == []
        claims = [m.name for m in reg.client.search_registered_models() if ".mlnb-alias-move." in m.name]
        assert len(claims) == len(history)
