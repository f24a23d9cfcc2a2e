"""`mlnb ci` and `mlnb repro-check` in a real git + DVC copy of the project whose `main` holds a committed small run;
the example GitHub Actions workflow only calls commands that exist."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import BIN, ROOT, SMALL_RUN, copy_project, run, set_params, tool_env
from mlnb.core.config import load_paths
from mlnb.pipeline.ci import resolve_base

WORKFLOW = ROOT / "deploy/github/train.yml"
COMMIT = "git -c user.name=ci -c user.email=ci@ci commit -qm"
CATALOG = load_paths(ROOT / "params.yaml")          # where the outputs are, here and in the copies under test
# The columns that carry most of the signal: without them the model is clearly worse than main's.
STRONG = ["tenure", "contract", "total_charges", "monthly_charges", "internet_service", "online_security", "tech_support",
          "payment_method", "paperless_billing", "online_backup", "device_protection"]


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    "A project whose `main` branch holds a small run: dvc.lock, metrics and plots committed, outputs in the DVC cache, v1 champion."
    project = copy_project(tmp_path_factory.mktemp("ci") / "project")
    set_params(project, SMALL_RUN)
    run("git branch -M main", project)
    run(["dvc", "repro"], project)
    run(f"git add -A && {COMMIT} 'small run'", project)
    return project


def on_branch(project: Path, name: str, params: dict | None = None) -> None:
    "A branch off main, with main's outputs checked out from the DVC cache and `params` changed in a commit."
    run(f"git checkout -q -f -B {name} main && dvc checkout -q -f", project)
    if params:
        set_params(project, params)
        run(f"git add -A && {COMMIT} '{name}'", project)


def ci(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "mlnb"), "ci", "--summary", "summary.md", *args], project, check=False, env=env)


def versions(project: Path) -> list[str]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    return sorted(v.version for v in client.search_model_versions("name='churn'"))


@pytest.mark.slow
def test_unchanged_model_passes_with_metrics_gates_and_version(committed):
    on_branch(committed, "same-model", {"evaluate": {"permutation_repeats": 2}})     # evaluate and register re-run, same model
    p = ci(committed)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Running stage 'evaluate'" in p.stdout and "Running stage 'register'" in p.stdout      # dvc repro's output, streamed
    summary = (committed / "summary.md").read_text()
    assert "## ✅ mlnb ci: no regression" in summary and "a regression is any failed gate, or test roc_auc worse than `main`" in summary
    assert "| metric" in summary and "| evaluate: roc_auc" in summary and "| train: selected" in summary
    for gate in ("quality", "fairness:female", "parity", "signature"):
        assert f"| {gate} " in summary
    assert "**FAIL**" not in summary
    assert "`churn` version **1** (unchanged: this model was already registered): status `approved`, aliases `champion`" in summary
    assert str(CATALOG.reports / "04_evaluate.html") in summary

    # a base that is not in the clone: said why, no crash, nothing else changes
    p = ci(committed, "--base", "release")
    assert p.returncode == 0, p.stdout + p.stderr
    summary = (committed / "summary.md").read_text()
    assert "No comparison with the base branch: base branch 'release' not found" in summary and "| quality " in summary

    # without the register stage: the metrics are judged, nothing is registered
    (committed / "params.yaml").write_text((committed / "params.yaml").read_text().replace("permutation_repeats: 2", "permutation_repeats: 3"))
    p = ci(committed, "--no-register")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Running stage 'evaluate'" in p.stdout and "Running stage 'register'" not in p.stdout
    summary = (committed / "summary.md").read_text()
    assert "Skipped (`--no-register`)" in summary and "| evaluate: roc_auc" in summary and "### Gates" not in summary


@pytest.mark.slow
def test_worse_model_is_a_regression_named_in_the_summary(committed, tmp_path):
    on_branch(committed, "weak-features", {"features": {"exclude": STRONG, "derived": []}})
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("earlier step\n")
    p = ci(committed, env={**tool_env(), "GITHUB_STEP_SUMMARY": str(step_summary)})
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (committed / "summary.md").read_text()
    assert "## ⚠️ mlnb ci: regression" in summary
    assert "- gate quality failed: test roc_auc" in summary and "vs champion v1" in summary
    assert "is worse than main's" in summary and "(more than registry.gates.max_metric_drop 0.01)" in summary
    assert "| quality " in summary and "**FAIL**" in summary
    assert "`churn` version **2** (new): status `candidate`, no alias" in summary
    assert step_summary.read_text() == "earlier step\n" + summary + "\n"          # appended for GitHub's job summary


@pytest.mark.slow
def test_broken_stage_exits_2_naming_the_stage(committed):
    on_branch(committed, "broken", {"evaluate": {"calibration_bins": 1}})
    before = versions(committed)
    p = ci(committed)
    assert p.returncode == 2, p.stdout + p.stderr
    summary = (committed / "summary.md").read_text()
    assert "## ❌ mlnb ci: the pipeline failed at stage `evaluate`" in summary
    assert "evaluate.calibration_bins" in summary and "failed to reproduce 'evaluate'" in summary
    assert versions(committed) == before                                            # nothing registered


def test_a_shallow_clone_says_how_to_get_the_base(tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    run(f"git init -q -b main && echo 1 > a && git add a && {COMMIT} one && echo 2 > a && git -c user.name=ci -c user.email=ci@ci commit -qam two", origin)
    shallow = tmp_path / "shallow"
    run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(shallow)], tmp_path)
    run("git checkout -q -b feature && git branch -q -D main && git remote remove origin", shallow)
    rev, why = resolve_base("main", shallow)
    assert rev is None and "shallow clone" in why and "fetch-depth: 0" in why
    assert resolve_base("main", origin) == ("main", None)


def workflow_commands() -> list[list[str]]:
    "Every mlnb and make command line the workflow runs."
    workflow = YAML(typ="safe", pure=True).load(WORKFLOW.read_text())
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                first = line.split()[:1]
                if first and (Path(first[0]).name == "mlnb" or first[0] == "make"):
                    commands.append(shlex.split(line, comments=True))
    return commands


def test_workflow_parses_and_every_command_it_runs_exists():
    workflow = YAML(typ="safe", pure=True).load(WORKFLOW.read_text())
    assert {"pull_request", "push"} <= set(workflow["on"]) and workflow["on"]["push"]["branches"] == ["main"]
    jobs = workflow["jobs"]
    steps = [s for job in jobs.values() for s in job["steps"]]
    checkouts = [s for s in steps if s.get("uses", "").startswith("actions/checkout")]
    assert len(checkouts) == 2 and all(c["with"]["fetch-depth"] == 0 for c in checkouts)       # the pull request's job and main's
    comment = next(s for s in jobs["comment"]["steps"] if "sticky-pull-request-comment" in s.get("uses", ""))
    assert comment["with"]["path"] == "ci-summary.md" and "pull_request" in jobs["comment"]["if"]
    assert any(".venv" in str(s.get("with", {}).get("path", "")) for s in steps) and any(".dvc/cache" in str(s.get("with", {}).get("path", "")) for s in steps)
    commands = workflow_commands()
    assert ["make", "env"] in commands and sum(c[1] == "ci" for c in commands if Path(c[0]).name == "mlnb") == 2
    for words in commands:
        if words[0] == "make":
            run(["make", "-n", *words[1:]], ROOT)                                    # the target exists
            continue
        sub = [w for w in words[1:] if not w.startswith("-")][:1]
        options = [w.split("=")[0] for w in words[1:] if w.startswith("--")]
        helptext = run([str(BIN / "mlnb"), *sub, "--help"], ROOT).stdout
        for option in options:
            assert option in helptext, f"{' '.join(words)}: {option} is not an option of mlnb {' '.join(sub)}"


@pytest.mark.slow
def test_repro_check_passes_on_the_committed_run_and_names_a_tampered_metric(committed):
    run("git checkout -q -f main && dvc checkout -q -f", committed)
    cache = committed / ".dvc/cache"
    cache_before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    registry_before = versions(committed)
    p = run([str(BIN / "mlnb"), "repro-check", "--report", "repro.md"], committed, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    report = (committed / "repro.md").read_text()
    assert "## ✅ reproducible: commit" in report and "Tolerances: metrics |Δ| ≤ 1e-09, predictions max |Δp| ≤ 1e-06" in report
    assert "| evaluate: roc_auc " in report and "**OUT**" not in report
    assert re.search(r"\| 140 +\| 0 +\| 100\.0000% +\|", report)                 # same probabilities, every label equal
    assert re.search(rf"\| train +\| {re.escape(str(CATALOG.model))} +\| equal +\|", report)  # the same model file
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == cache_before    # nothing written to the original's cache
    assert versions(committed) == registry_before                                   # nor to its registry

    evaluation = json.loads((committed / CATALOG.evaluate_metrics).read_text())
    evaluation["roc_auc"] = round(evaluation["roc_auc"] + 0.02, 6)
    run("git checkout -q -b tampered", committed)
    (committed / CATALOG.evaluate_metrics).write_text(json.dumps(evaluation, indent=2))
    run(f"git add -A && {COMMIT} 'a better number'", committed)
    p = run([str(BIN / "mlnb"), "repro-check"], committed, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "## ❌ not reproducible" in p.stdout
    assert f"- {CATALOG.evaluate_metrics}: roc_auc committed {evaluation['roc_auc']:.6g}, re-run" in p.stdout and "> 1e-09)" in p.stdout
