"""`mlnb init` rewrites a user's params.yaml: sections the text lacks are created, what it has keeps its comments."""
import yaml

from mlnb.cli import init_params


def test_params_without_a_registry_section_get_one():
    text = "data:\n  source: old.csv\n"
    out = yaml.safe_load(init_params(text, "new.csv", None, "schema/new.yaml", "y", "binary", "yes", ["sex"]))
    assert out["data"]["source"] == "new.csv" and out["data"]["sensitive"] == ["sex"]
    assert out["registry"]["gates"] == {"metric": None, "fairness_attributes": ["sex"]}


def test_params_with_a_registry_but_no_gates_section():
    text = "data:\n  source: old.csv\nregistry:\n  model_name: m   # kept\n"
    out = init_params(text, "new.csv", None, "schema/new.yaml", "y", "regression", None, [])
    parsed = yaml.safe_load(out)
    assert parsed["registry"]["gates"]["fairness_attributes"] == [] and parsed["data"]["task"] == "regression"
    assert parsed["data"]["positive_class"] is None
