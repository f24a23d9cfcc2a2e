"""The registry commands as a person uses them: roles from a users file, secrets from the environment."""
import json
import os

import pytest

from conftest import run
from registration import SECRETS, make_env, register

COMMANDS = ["list", "show", "approve", "reject", "promote", "rollback", "history", "lineage", "card"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_registry_command_has_help(tmp_path, command):
    out = run(["mlnb", "registry", command, "--help"], tmp_path).stdout
    assert "Usage" in out and "--params" in out


def test_audit_and_users_have_help(tmp_path):
    assert "Usage" in run(["mlnb", "audit", "verify", "--help"], tmp_path).stdout
    assert "Usage" in run(["mlnb", "users", "add", "--help"], tmp_path).stdout


def as_user(cmd, project, user, check=True):
    env_vars = f"MLNB_USER={user} MLNB_SECRET={SECRETS[user]} "
    return run(env_vars + " ".join(cmd), project, check=check)


def test_approve_promote_and_refusals_from_the_command_line(tmp_path, onnx_models, telco_split):
    env = make_env(tmp_path / "registry")
    (tmp_path / "params.yaml").write_text(json.dumps(env))
    register(env, onnx_models["a"], telco_split[1]["test"])
    denied = as_user(["mlnb", "registry", "promote", "churn", "1"], tmp_path, "ann", check=False)
    assert denied.returncode == 3 and "may not promote: it needs the admin role" in denied.stderr
    not_approved = as_user(["mlnb", "registry", "promote", "churn", "1"], tmp_path, "adam", check=False)
    assert not_approved.returncode == 1 and "not approved" in not_approved.stderr
    no_reason = as_user(["mlnb", "registry", "approve", "churn", "1"], tmp_path, "ann", check=False)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    assert "approved" in as_user(["mlnb", "registry", "approve", "churn", "1", "--reason", "'fine'"], tmp_path, "ann").stdout
    assert "now champion" in as_user(["mlnb", "registry", "promote", "churn", "1"], tmp_path, "adam").stdout
    shown = as_user(["mlnb", "registry", "show", "churn", "1"], tmp_path, "vic").stdout
    assert "approved [champion]" in shown and "gate quality" in shown
    assert "chain intact" in run(["mlnb", "audit", "verify", "--params", "params.yaml"], tmp_path).stdout
    html = tmp_path / "card.html"
    as_user(["mlnb", "registry", "card", "churn", "1", "--html", str(html)], tmp_path, "vic")
    assert "<table>" in html.read_text()


def test_first_admin_then_users_need_admin(tmp_path):
    env = make_env(tmp_path / "registry")
    env["registry"]["users"] = str(tmp_path / "fresh-users.yaml")
    (tmp_path / "params.yaml").write_text(json.dumps(env))
    run("MLNB_NEW_SECRET=pw mlnb users add boss --role admin", tmp_path)      # the local OS user creates the first admin
    refused = run("MLNB_NEW_SECRET=pw mlnb users add eve --role approver", tmp_path, check=False)
    assert refused.returncode == 3 and "manage-users" in refused.stderr
    run("MLNB_USER=boss MLNB_SECRET=pw MLNB_NEW_SECRET=pw2 mlnb users add ann --role approver", tmp_path)
    listing = run("mlnb users list", tmp_path).stdout
    assert "boss: admin" in listing and "ann: approver" in listing and "pw" not in (tmp_path / "fresh-users.yaml").read_text().replace("scrypt", "")


def test_history_and_lineage_of_what_was_never_registered_are_answers_not_tracebacks(tmp_path):
    env = make_env(tmp_path / "registry")
    (tmp_path / "params.yaml").write_text(json.dumps(env))
    history = as_user(["mlnb", "registry", "history", "churn"], tmp_path, "vic")
    assert "churn: no alias has been set yet" in history.stdout
    lineage = as_user(["mlnb", "registry", "lineage", "churn", "1"], tmp_path, "vic", check=False)
    assert lineage.returncode == 1 and lineage.stderr.strip() == "error: model 'churn' has no version 1"
    assert "Traceback" not in lineage.stderr + history.stderr


def test_os_identity_comes_from_the_effective_uid_not_logname(tmp_path):
    import pwd
    real = pwd.getpwuid(os.geteuid()).pw_name
    assert real != "alice"
    env = make_env(tmp_path / "registry")
    env["registry"]["users"] = str(tmp_path / "os-users.yaml")
    (tmp_path / "params.yaml").write_text(json.dumps(env))
    (tmp_path / "os-users.yaml").write_text("users: {alice: {roles: [admin], os_user: true}}\n")
    spoofed = run("LOGNAME=alice USER=alice LNAME=alice USERNAME=alice mlnb users add eve --role approver --os-user",
                  tmp_path, check=False)
    assert spoofed.returncode == 3 and f"user '{real}'" in spoofed.stderr and "manage-users" in spoofed.stderr
    assert "eve" not in (tmp_path / "os-users.yaml").read_text()
    entries = [json.loads(line) for line in (tmp_path / "registry" / "audit.jsonl").read_text().splitlines()]
    assert [e.get("actor") for e in entries] == [real]
