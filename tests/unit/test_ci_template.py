"""The GitHub Actions template deploy/github/train.yml, linted for what a pull request must not get: secrets (the signing
key, the MLflow credentials, MLNB_SECRET) only in jobs that run on a push to main in a protected environment; the jobs
that run a pull request's code get a read-only token and no secret, and take the registry users from the base branch;
no `${{ }}` expression is written into a shell script (an attacker-chosen branch name would run as code)."""
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT

WORKFLOW = ROOT / "deploy/github/train.yml"
SECRET = re.compile(r"\$\{\{[^}]*\bsecrets\.")
EXPRESSION = re.compile(r"\$\{\{")
UNTRUSTED = re.compile(r"\$\{\{[^}]*\b(github|inputs|env)\.")
PROTECTED_SECRETS = ("MLNB_SIGNING_KEY_PEM", "MLNB_SECRET", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def load(path: Path = WORKFLOW) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def triggers(workflow: dict) -> dict:
    on = workflow.get("on", workflow.get(True))          # YAML 1.1 reads a bare `on` as True
    return {name: None for name in on} if isinstance(on, list) else {on: None} if isinstance(on, str) else dict(on)


def text(value) -> str:
    "Every string inside a YAML value, joined."
    if isinstance(value, dict): return "\n".join(text(k) + "\n" + text(v) for k, v in value.items())
    if isinstance(value, list): return "\n".join(text(v) for v in value)
    return "" if value is None else str(value)


def runs_on_main_push_only(job: dict) -> bool:
    "The job's `if` keeps it to pushes (and manual runs) on main: never a pull request, never another branch."
    condition = str(job.get("if", ""))
    return "github.ref == 'refs/heads/main'" in condition and "github.event_name != 'pull_request'" in condition


def can_run_on_a_pull_request(job: dict) -> bool:
    condition = str(job.get("if", ""))
    return not runs_on_main_push_only(job) and "github.event_name != 'pull_request'" not in condition


def problems(workflow: dict) -> list[str]:
    "What the rules say is wrong with `workflow`, one line each."
    out = []
    on = triggers(workflow)
    if "pull_request_target" in on: out.append("pull_request_target runs with secrets on a pull request's behalf")
    if SECRET.search(text(workflow.get("env", {}))): out.append("workflow-level env holds secrets: every job, pull requests too, gets them")
    top = workflow.get("permissions")
    if top != {"contents": "read"} and top != {}: out.append(f"workflow-level permissions {top!r}: should be contents: read")
    for name, job in workflow["jobs"].items():
        steps = job.get("steps", [])
        for step in steps:
            script = step.get("run", "")
            if EXPRESSION.search(script):
                out.append(f"job {name}, step {step.get('name', script[:40])!r}: a ${{{{ }}}} expression in a run: script (pass it through env:)")
        has_secrets = bool(SECRET.search(text(job)))
        checks_out = any(str(s.get("uses", "")).startswith("actions/checkout") for s in steps)
        if has_secrets:
            if not runs_on_main_push_only(job):
                out.append(f"job {name} has secrets but may run on a pull request or another branch (if: {job.get('if')!r})")
            if not job.get("environment"):
                out.append(f"job {name} has secrets outside a protected environment")
        if can_run_on_a_pull_request(job):
            perms = job.get("permissions", top)
            if checks_out and perms != {"contents": "read"}:
                out.append(f"job {name} runs the pull request's code with permissions {perms!r}")
            if job.get("environment"): out.append(f"job {name} runs on pull requests in environment {job['environment']!r}")
            if checks_out and not any("git show" in s.get("run", "") and "registry/users.yaml" in s.get("run", "") and "origin/" in s.get("run", "")
                                      for s in steps):
                out.append(f"job {name} runs on pull requests and does not read registry/users.yaml from the base branch")
    if not any(runs_on_main_push_only(j) for j in workflow["jobs"].values()) or on.get("push", {}).get("branches") != ["main"]:
        out.append("no job registers on a push to main")
    return out


def test_the_template_passes_the_rules():
    assert problems(load()) == []


def test_only_the_protected_main_job_names_the_signing_key_and_credentials():
    workflow = load()
    for secret in PROTECTED_SECRETS:
        holders = [name for name, job in workflow["jobs"].items() if f"secrets.{secret}" in text(job)]
        assert holders, f"no job gets {secret}"
        for name in holders:
            job = workflow["jobs"][name]
            assert runs_on_main_push_only(job) and job["environment"], (secret, name)
    assert not SECRET.search(text(workflow.get("env", {})))


def test_no_expression_reaches_a_shell_and_the_base_ref_goes_through_env():
    workflow = load()
    scripts = [s["run"] for j in workflow["jobs"].values() for s in j.get("steps", []) if "run" in s]
    assert scripts and not [s for s in scripts if UNTRUSTED.search(s) or EXPRESSION.search(s)]
    users = next(s for j in workflow["jobs"].values() for s in j.get("steps", []) if "registry/users.yaml" in s.get("run", ""))
    assert users["env"]["BASE_REF"] == "${{ github.base_ref }}" and '"origin/${BASE_REF}:registry/users.yaml"' in users["run"]


# The rules catch what they are for: each broken variant of the template is named.
def broken(mutate) -> dict:
    workflow = load()
    mutate(workflow)
    return workflow

def _pr_gets_a_secret(w): w["jobs"]["check"].setdefault("env", {})["MLNB_SECRET"] = "${{ secrets.MLNB_SECRET }}"
def _expression_in_run(w): w["jobs"]["check"]["steps"][-3]["run"] = ".venv/bin/mlnb ci --base ${{ github.base_ref }}"
def _write_token_on_pr(w): w["jobs"]["check"]["permissions"] = {"contents": "write"}
def _main_job_unprotected(w): w["jobs"]["register"].pop("environment")
def _main_job_on_any_branch(w): w["jobs"]["register"]["if"] = "github.event_name != 'pull_request'"
def _workflow_env_secret(w): w["env"] = {"MLNB_SECRET": "${{ secrets.MLNB_SECRET }}"}
def _users_from_the_pr(w): w["jobs"]["check"]["steps"] = [s for s in w["jobs"]["check"]["steps"] if "registry/users.yaml" not in s.get("run", "")]

@pytest.mark.parametrize("mutate, words", [(_pr_gets_a_secret, "may run on a pull request"), (_expression_in_run, "in a run: script"),
                                           (_write_token_on_pr, "runs the pull request's code with permissions"),
                                           (_main_job_unprotected, "outside a protected environment"),
                                           (_main_job_on_any_branch, "may run on a pull request or another branch"),
                                           (_workflow_env_secret, "workflow-level env holds secrets"),
                                           (_users_from_the_pr, "from the base branch")],
                         ids=["pr-secret", "expression", "write-token", "unprotected", "any-branch", "workflow-env", "pr-users"])
def test_each_rule_names_a_broken_template(mutate, words):
    found = problems(broken(mutate))
    assert any(words in p for p in found), found
