"""Robustness on the real pipeline: the evaluate stage's measurements in metrics/evaluate.json and the plots, and the register
stage's robustness gates, which block a version like any other gate."""
import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import ROOT, run, set_params, small_project
from mlnb.core.config import load_config, load_paths, read_yaml
from mlnb.registry.store import robustness_gates

CATALOG = load_paths(ROOT / "params.yaml")          # where the outputs are, here and in the copies under test


def test_the_bundled_model_passes_the_default_gates_with_a_margin():
    "The committed `make run` measurement of the bundled model against the gates params.yaml sets."
    cfg = load_config(ROOT / "params.yaml")
    block = json.loads((ROOT / CATALOG.evaluate_metrics).read_text())["robustness"]
    assert block["rows"] == 1409 and list(block["flip_rate"]) == [f"{e:g}" for e in cfg.evaluate.robustness.epsilons]
    gates = robustness_gates(block, cfg)
    assert [g.name for g in gates] == ["robustness:numeric", "robustness:categorical"] and all(g.passed for g in gates)
    g = cfg.registry.gates
    assert block["flip_rate"][f"{g.flip_rate_epsilon:g}"] < 0.75 * g.max_flip_rate
    assert block["categorical_flip_rate"] < 0.75 * g.max_categorical_flip_rate


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    "One small `dvc repro` (default robustness settings; the small run's gates)."
    project = small_project(tmp_path_factory.mktemp("robust") / "project")
    run(["dvc", "repro"], project)
    return project


def evaluation(project):
    return json.loads((project / CATALOG.evaluate_metrics).read_text())


def version_of(project, db: str, version: str = "1"):
    return MlflowClient(f"sqlite:///{project / db}").get_model_version("churn", version)


@pytest.mark.slow
def test_evaluate_records_robustness(pipeline):
    block = evaluation(pipeline)["robustness"]
    params = read_yaml(pipeline / "params.yaml")["evaluate"]["robustness"]
    assert block["task"] == "binary" and block["rows"] == 140 and block["draws"] == params["draws"]
    assert block["numeric_features"] == 3 and block["categorical_features"] == 16   # 10 categorical columns and 6 flags
    rates = block["flip_rate"]
    assert list(rates) == [f"{e:g}" for e in params["epsilons"]]
    assert all(0 <= r <= 1 for r in rates.values()) and rates["0.5"] > rates["0.01"] and rates["0.5"] > 0
    by_feature = block["categorical_flip_rate_by_feature"]
    assert "contract" in by_feature and "female" in by_feature
    assert max(by_feature.values()) <= block["categorical_flip_rate"] <= min(1.0, sum(by_feature.values())) and block["categorical_flip_rate"] > 0
    risky = block["riskiest"]
    assert risky["rows"] == params["riskiest_n"] and risky["max_epsilon"] == params["max_epsilon"]
    assert 0 <= risky["unflippable_share"] <= 1 and 0 <= risky["swap_flippable_share"] <= 1
    if risky["unflippable_share"] < 1:
        assert 0 < risky["min_epsilon"] <= risky["median_epsilon"] <= params["max_epsilon"]
    curve = pd.read_csv(pipeline / CATALOG.plots / "robustness.csv")
    assert curve.epsilon.tolist() == params["epsilons"] and curve.flip_rate.round(6).tolist() == list(rates.values())
    riskiest = pd.read_csv(pipeline / CATALOG.plots / "robustness_riskiest.csv")
    assert len(riskiest) == params["riskiest_n"] and riskiest.risk.is_monotonic_decreasing
    assert (pipeline / CATALOG.plots / "robustness.png").stat().st_size > 0
    assert "Robustness" in (pipeline / CATALOG.reports / "04_evaluate.html").read_text()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], pipeline).stdout)
    assert "robustness" in json.dumps(shown) and "flip_rate" in json.dumps(shown)


@pytest.mark.slow
def test_passing_robustness_gates_are_recorded_on_the_version(pipeline):
    registration = json.loads((pipeline / CATALOG.registration).read_text())
    assert registration["gates_passed"] and registration["aliases"] == ["champion"]
    v = version_of(pipeline, "mlruns.db")
    gates = {g["name"]: g for g in json.loads(v.tags["mlnb.gates"])}
    block = evaluation(pipeline)["robustness"]
    assert gates["robustness:numeric"]["passed"] and gates["robustness:numeric"]["value"] == block["flip_rate"]["0.1"]
    assert gates["robustness:categorical"]["passed"] and gates["robustness:categorical"]["value"] == block["categorical_flip_rate"]
    assert json.loads(v.tags["mlnb.robustness"]) == block                    # the gates' input, kept on the version
    card = run(["mlnb", "registry", "card", "churn", "1"], pipeline).stdout
    assert "## Robustness" in card and "robustness:numeric" in card and "rows flipped by one categorical swap" in card


@pytest.mark.slow
def test_a_threshold_below_the_measured_flip_rate_fails_the_gate_and_promotes_nothing(pipeline):
    block = evaluation(pipeline)["robustness"]
    numeric, categorical = block["flip_rate"]["0.1"], block["categorical_flip_rate"]
    assert numeric > 0 and categorical > 0
    # a fresh registry (so this is a first version, which bootstrap would promote if every gate passed)
    set_params(pipeline, {"registry": {"tracking_uri": "sqlite:///strict.db", "audit_log": "registry/strict.jsonl",
                                       "gates": {"max_flip_rate": round(numeric / 2, 6), "max_categorical_flip_rate": round(categorical / 2, 6)}}})
    out = run(["dvc", "repro"], pipeline)
    assert [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")] == ["register"]
    registration = json.loads((pipeline / CATALOG.registration).read_text())
    assert not registration["gates_passed"] and registration["status"] == "candidate" and registration["aliases"] == []
    v = version_of(pipeline, "strict.db")
    gates = {g["name"]: g for g in json.loads(v.tags["mlnb.gates"])}
    failed = sorted(name for name, g in gates.items() if not g["passed"])
    assert failed == ["robustness:categorical", "robustness:numeric"]
    assert f"maximum {numeric / 2:.1%}" in gates["robustness:numeric"]["detail"]
    assert MlflowClient(f"sqlite:///{pipeline / 'strict.db'}").get_registered_model("churn").aliases == {}
    card = run(["mlnb", "registry", "card", "churn", "1"], pipeline).stdout
    assert "Gate **robustness:numeric** failed" in card
