"""A user's own data, end to end: `mlnb init DATA --target COL`, `dvc repro` through register, then `mlnb serve`
answering one Open Inference Protocol (V2) and one MLflow `/invocations` request, on data sets unlike Telco:
a binary one with no sensitive attribute, a multiclass one with a rare class, a regression one, and a wide one with
an id, a high-cardinality categorical and a `Mar-2018` date column."""
import json
import math

import pandas as pd
import pytest
import yaml

from mlnb.data.datasets import affairs, doctor_visits, four_classes, wide_loans
from conftest import copy_project, deep_update, run, set_params
from serving import Server

CASES = {
    "binary_no_sensitive": lambda: affairs(n=1500, seed=1),
    "multiclass_rare_class": lambda: four_classes(n=2000, seed=1),
    "regression": lambda: doctor_visits(n=2000, seed=1),
    "wide_high_cardinality_date": lambda: wide_loans(n=2500, seed=1, titles=3000),
}
# What is under test is the path from a new file to a served model, not model quality: a small search, and the
# robustness gates out of the way (a single hyperparameter draw on 1,500 rows is brittler than a full run's model).
SMALL = {"train": {"n_iter": 1, "cv_folds": 2}, "evaluate": {"permutation_repeats": 1},
         "registry": {"gates": {"max_flip_rate": None, "max_categorical_flip_rate": None}}}


def row_without_missing(df: pd.DataFrame, columns: list[str]) -> dict:
    full = df[columns].dropna()
    assert len(full), "no complete row to send"
    return {c: (v.item() if hasattr(v, "item") else v) for c, v in full.iloc[0].items()}


def served(project, ds) -> tuple[dict, dict]:
    "Start `mlnb serve` on the registered champion; send one V2 and one /invocations request; return both answers."
    params = yaml.safe_load((project / "params.yaml").read_text())
    name = params["project"]["name"]
    server = Server(project, params).wait_ready()
    try:
        meta = server.client.get(f"/v2/models/{name}").json()
        inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
        row = row_without_missing(ds.frame, list(inputs))
        v2 = server.client.post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": n, "shape": [1, 1], "datatype": t, "data": [str(row[n]) if t == "BYTES" else float(row[n])]}
            for n, t in inputs.items()]})
        assert v2.status_code == 200, v2.text
        mlflow = server.client.post("/invocations", json={"dataframe_records": [row]})
        assert mlflow.status_code == 200, mlflow.text
        return v2.json(), mlflow.json()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_init_repro_serve(tmp_path, case):
    ds = CASES[case]()
    project = copy_project(tmp_path / "project", git=False)
    data = ds.write(project / f"data/raw/{ds.name}.csv")
    out = run(["mlnb", "init", str(data.relative_to(project)), *ds.init_args(), "--force"], project).stdout
    assert "make run" in out                                       # it says what to do next
    set_params(project, deep_update({"project": {"name": ds.name}}, SMALL))
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", project)
    run(["dvc", "repro"], project, timeout=1500)
    summary = run(["mlnb", "summary"], project).stdout              # what `make run` ends with
    assert "selected model" in summary

    spec = json.loads((project / "features/feature_spec.json").read_text())
    registration = json.loads((project / "models/registration.json").read_text())
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    export = json.loads((project / "metrics/export.json").read_text())
    assert export["parity"]["passed"]
    assert registration["status"] == "approved" and registration["aliases"] == ["champion"], registration
    for column in ds.ids:
        assert column not in spec["numeric"] + spec["categorical"] + spec["passthrough"], f"id {column} became a feature"

    v2, mlflow = served(project, ds)
    outputs = {o["name"]: o for o in v2["outputs"]}
    if ds.task == "regression":
        assert math.isfinite(outputs["variable"]["data"][0])
        assert mlflow["predictions"][0]["value"] == pytest.approx(outputs["variable"]["data"][0], rel=1e-6)
        assert metrics["r2"] > 0
    else:
        classes = sorted(ds.frame[ds.target].astype(str).unique())
        assert str(outputs["label"]["data"][0]) in classes
        assert sum(outputs["probabilities"]["data"]) == pytest.approx(1.0, abs=1e-4)
        assert mlflow["predictions"][0]["label"] == str(outputs["label"]["data"][0])     # the same row, the same answer
        assert metrics["roc_auc"] > 0.6
    if not ds.sensitive:
        card = run(["mlnb", "registry", "card", ds.name, registration["version"]], project).stdout
        assert "not measured" in card                              # fairness: no sensitive attributes, said so
