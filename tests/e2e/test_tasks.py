"""Multiclass and regression runs of the whole pipeline (all five stage notebooks under DVC) on small data."""
import json

import onnx
import pytest

from conftest import SMALL_RUN, deep_update, run, set_params

TASKS = {
    "multiclass": {"data": {"target": "contract", "task": "multiclass", "positive_class": None},
                   "train": {"candidates": ["logreg", "mlp"]}},
    "regression": {"data": {"target": "monthly_charges", "task": "regression", "positive_class": None},
                   "train": {"candidates": ["ridge", "hgb"]}},
}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_runs_end_to_end(project, task):
    set_params(project, deep_update(deep_update({}, SMALL_RUN), TASKS[task]))
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    export = json.loads((project / "metrics/export.json").read_text())
    assert export["parity"]["passed"]
    if task == "regression":
        assert set(metrics) >= {"rmse", "mae", "r2"} and metrics["r2"] > 0.9      # charges follow from the services
        assert (project / "plots/evaluate/predicted_vs_actual.csv").exists()
        assert [o.name for o in onnx.load(project / "models/onnx/model.onnx").graph.output] == ["variable"]
    else:
        assert set(metrics) >= {"accuracy", "f1", "roc_auc", "log_loss"} and metrics["accuracy"] > 0.5
        assert (project / "plots/evaluate/confusion.csv").exists() and not (project / "plots/evaluate/roc.csv").exists()
        assert "accuracy_difference" in metrics["fairness"]["female"]
