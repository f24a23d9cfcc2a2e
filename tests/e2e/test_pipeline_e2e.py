"""The whole pipeline under DVC in a temporary copy of the repo, on a small sample of the bundled data."""
import json

import onnx
import pytest

from conftest import ROOT, run, set_params, small_project
from mlnb.core.config import load_paths, read_yaml

CATALOG = load_paths(ROOT / "params.yaml")          # where the outputs are, here and in the copies under test
OUTPUTS = [CATALOG.train, CATALOG.valid, CATALOG.test, CATALOG.feature_spec, CATALOG.reference_profile, CATALOG.model,
           CATALOG.onnx, CATALOG.evaluate_metrics, CATALOG.train_metrics, CATALOG.export_metrics,
           CATALOG.plots / "roc.csv", CATALOG.reports / "04_evaluate.html"]
METRICS = {"train": CATALOG.train_metrics, "evaluate": CATALOG.evaluate_metrics, "export": CATALOG.export_metrics}


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    "One small `dvc repro` shared by the tests below (they only read its results or change params)."
    project = small_project(tmp_path_factory.mktemp("e2e") / "project")
    first = run(["dvc", "repro"], project)
    first.metrics = {n: (project / path).read_text() for n, path in METRICS.items()}
    first.lock = read_yaml(project / "dvc.lock")["stages"]
    first.leaderboard = (project / CATALOG.leaderboard).read_text()
    first.train_facts = json.loads((project / CATALOG.run_facts_file("train")).read_text())
    first.registration = json.loads((project / CATALOG.registration).read_text())
    return project, first


def test_repro_produces_every_output(repro):
    project, first = repro
    assert stages_run(first.stdout) == ["ingest", "featurize", "train", "evaluate", "export", "register"]
    for rel in OUTPUTS:
        assert (project / rel).exists(), rel
    metrics = json.loads((project / CATALOG.evaluate_metrics).read_text())
    assert metrics["rows"] == 140 and 0.6 < metrics["roc_auc"] <= 1
    assert set(metrics["fairness"]) == {"female", "senior_citizen"}
    lock = read_yaml(project / "dvc.lock")
    assert set(lock["stages"]) == {"ingest", "featurize", "train", "evaluate", "export", "register"}


def test_onnx_carries_provenance_matching_dvc_lock(repro):
    project, _ = repro
    meta = {p.key: p.value for p in onnx.load(project / CATALOG.onnx).metadata_props}
    lock = read_yaml(project / "dvc.lock")
    raw = next(d for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/raw/telco_churn.csv")
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert meta["data_md5"] == raw["md5"] and meta["model_name"] == "churn"
    assert "git_commit" not in meta and head not in meta.values()      # a run fact: the registry records it (lineage.git_commit)
    assert len(meta["params_hash"]) == 64 and meta["metric"] == "roc_auc"
    inputs = [i.name for i in onnx.load(project / CATALOG.onnx).graph.input]
    assert "tenure" in inputs and "contract" in inputs and "churn" not in inputs


def test_second_repro_changes_nothing(repro):
    project, _ = repro
    again = run(["dvc", "repro"], project)
    assert stages_run(again.stdout) == [], again.stdout


def test_changing_one_param_reruns_only_downstream(repro):
    project, _ = repro
    set_params(project, {"evaluate": {"permutation_repeats": 2}})
    out = run(["dvc", "repro"], project)
    assert stages_run(out.stdout) == ["evaluate", "register"], out.stdout
    set_params(project, {"export": {"quantize": {"max_metric_drop": 0.02}}})
    out = run(["dvc", "repro"], project)
    assert stages_run(out.stdout) == ["export", "register"], out.stdout


def test_dvc_exp_run_with_set_param(repro):
    project, _ = repro
    run("git add -A && git commit -qm 'params'", project)
    out = run(["dvc", "exp", "run", "-S", "train.candidates=[logreg]"], project)
    assert stages_run(out.stdout) == ["train", "evaluate", "export", "register"], out.stdout
    assert json.loads((project / CATALOG.train_metrics).read_text())["selected"] == "logreg"
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    ran = [exp["data"]["params"]["params.yaml"]["data"]["train"]["candidates"]
           for base in shown for group in base.get("experiments") or [] for exp in group["revs"]]
    assert ["logreg"] in ran, shown                              # listed as an experiment, with the parameter it set


def test_two_clean_runs_give_identical_results(repro, tmp_path):
    project, first = repro
    other = small_project(tmp_path / "again")
    run(["dvc", "repro"], other)
    for name in ("train", "evaluate", "export"):
        assert (other / METRICS[name]).read_text() == first.metrics[name], name
    lock = read_yaml(other / "dvc.lock")["stages"]
    for stage in ("ingest", "featurize"):
        assert lock[stage]["outs"][0] == first.lock[stage]["outs"][0], stage


def test_every_candidate_is_an_mlflow_run(repro):
    from mlflow.tracking import MlflowClient
    project, first = repro
    client = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("churn")
    runs = client.search_runs([experiment.experiment_id], "tags.mlnb.stage = 'train'")
    assert len(runs) >= 1
    parent = runs[-1]                     # the first training of this store
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["mlnb.family"] for c in children) == ["hgb", "logreg"]
    for child in children:
        assert {"cv_roc_auc", "cv_roc_auc_std", "valid_roc_auc", "fit_seconds"} <= set(child.data.metrics)
        assert child.data.params                      # the chosen hyperparameters
    board = json.loads(first.leaderboard)
    assert first.train_facts["parent_run_id"] == parent.info.run_id
    assert "parent_run_id" not in board                                 # a run fact, kept out of the DVC-tracked leaderboard
    assert parent.data.tags["mlnb.selected_family"] == board["selected"]


def test_dvc_plots_and_metrics_render(repro):
    project, _ = repro
    shown = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert {"ROC", "Precision-recall", "Calibration", "Confusion matrix", "Permutation importance"} <= set(shown)
    metrics = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "roc_auc" in metrics and "max_abs_diff" in metrics


def test_repro_registers_a_servable_champion(repro):
    "A fresh project ends with a champion: the first version is auto-approved when every gate passes (bootstrap)."
    project, first = repro
    reg = first.registration
    assert reg["version"] == "1" and reg["status"] == "approved" and reg["aliases"] == ["champion"] and reg["gates_passed"]
    listing = run(["mlnb", "registry", "list", "churn"], project).stdout
    assert "champion" in listing and "approved" in listing   # later tests may have added candidates
    lineage = run(["mlnb", "registry", "lineage", "churn", "1"], project).stdout
    assert "raw data" in lineage and "processed data" in lineage and "features" in lineage
    card = run(["mlnb", "registry", "card", "churn", "1"], project).stdout
    assert "# Model card: churn version 1" in card and "## Metrics by sensitive group" in card and "senior_citizen" in card
    audit = run(["mlnb", "audit", "verify"], project).stdout
    assert "chain intact" in audit
    actions = [json.loads(line)["action"] for line in (project / "registry/audit.jsonl").read_text().splitlines()]
    assert actions[:6] == ["signing-key-created", "register", "gates", "approval-key-created", "approve", "promote"]
