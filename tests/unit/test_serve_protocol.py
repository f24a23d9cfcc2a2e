"""Requests in both protocols, parsed against a real exported model's contract, run in a real ONNX Runtime session."""
import json

import numpy as np
import pytest

from mlnb.core.config import config_from_dict
from mlnb.model.onnx import OnnxModel
from mlnb.training.export import to_onnx
from mlnb.features.spec import feature_spec, model_frame
from mlnb.serving.protocol import RequestError, contract_from, mlflow_response, parse_mlflow, parse_v2, v2_response
from mlnb.training.train import candidate_pipeline


@pytest.fixture(scope="module")
def served(telco_split):
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    model = candidate_pipeline("hgb", spec, 0).fit(model_frame(s["train"], spec), s["train"]["churn"])
    meta = {"classes": json.dumps([str(c) for c in model.classes_])}
    onnx_model = OnnxModel(to_onnx(model, spec, metadata=meta).SerializeToString())
    rows = model_frame(s["test"].head(25), spec)
    records = json.loads(rows.to_json(orient="records"))      # what a client's JSON looks like
    return onnx_model, contract_from(onnx_model.inputs, schema, "churn", max_rows=100), rows, records


def v2_body(records, names, types):
    return {"id": "req-1", "inputs": [{"name": n, "shape": [len(records), 1], "datatype": "BYTES" if t == "tensor(string)" else "FP64",
                                       "data": [[r[n]] for r in records]} for n, t in zip(names, types)]}


def test_both_protocols_give_the_models_own_predictions(served):
    onnx_model, contract, rows, records = served
    expected = onnx_model.run(rows)
    bodies = [("v2", v2_body(records, list(onnx_model.inputs), list(onnx_model.inputs.values())))]
    bodies += [("mlflow", {"dataframe_records": records}), ("mlflow", {"instances": records}),
               ("mlflow", {"dataframe_split": {"columns": list(records[0]), "data": [list(r.values()) for r in records]}}),
               ("mlflow", {"inputs": {k: [r[k] for r in records] for k in records[0]}})]
    for kind, body in bodies:
        batch = (parse_v2 if kind == "v2" else parse_mlflow)(body, contract)
        got = dict(zip(onnx_model.outputs, onnx_model.session.run(None, batch.columns)))
        np.testing.assert_array_equal(got["label"], expected["label"])
        np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=0, atol=1e-7)
    response, blobs = v2_response(got, "churn", "3", [f"p{i}" for i in range(len(records))], "req-1")
    assert blobs == []
    assert response["id"] == "req-1" and response["outputs"][1]["shape"] == [len(records), 2]
    assert json.loads(json.dumps(response))["parameters"]["prediction_ids"][0] == "p0"
    first = mlflow_response(got, "churn", "3", ["p0"] * len(records), ["No", "Yes"])["predictions"][0]
    assert set(first) == {"label", "probabilities", "prediction_id"} and abs(sum(first["probabilities"].values()) - 1) < 1e-6


@pytest.mark.parametrize("mutate, message, status", [
    (lambda r: [{k: v for k, v in x.items() if k != "tenure"} for x in r], "missing input(s) ['tenure']", 400),
    (lambda r: [{**x, "customer_id": 7} for x in r], "unknown input(s) ['customer_id']", 400),
    (lambda r: [{**x, "tenure": "twelve"} for x in r], "'tenure': row 0 value 'twelve' is not a number", 400),
    (lambda r: [{**x, "contract": 2} for x in r], "'contract': row 0 value 2 is not a string", 400),
    (lambda r: [{**x, "monthly_charges": None} for x in r], "row 0 is null, but 'monthly_charges' may not be missing", 400),
    (lambda r: [{**x, "monthly_charges": float("inf")} for x in r], "must be a finite number", 400),
    (lambda r: [], "empty batch", 400),
    (lambda r: r * 5, "batch of 125 rows is over the limit of 100", 413),
])
def test_bad_requests_are_named(served, mutate, message, status):
    _, contract, _, records = served
    with pytest.raises(RequestError) as err:
        parse_mlflow({"dataframe_records": mutate(records)}, contract)
    assert message in str(err.value) and err.value.status == status


def test_nullable_and_unknown_categories_are_served_and_counted(served):
    onnx_model, contract, _, records = served
    body = {"dataframe_records": [{**records[0], "total_charges": None, "contract": "Weekly"}, records[1]]}
    batch = parse_mlflow(body, contract)
    assert batch.unknown_categories == {"contract": 1} and np.isnan(batch.columns["total_charges"][0, 0])
    probabilities = onnx_model.session.run(None, batch.columns)[1]
    assert probabilities.shape == (2, 2) and np.isfinite(probabilities).all()


def test_v2_shape_and_datatype_are_checked(served):
    onnx_model, contract, _, records = served
    body = v2_body(records[:2], list(onnx_model.inputs), list(onnx_model.inputs.values()))
    body["inputs"][0]["shape"] = [3, 1]
    with pytest.raises(RequestError, match=r"shape \[3, 1\] needs 3 value\(s\), 'data' has 2"):
        parse_v2(body, contract)
    body = v2_body(records[:2], list(onnx_model.inputs), list(onnx_model.inputs.values()))
    string_input = next(t for t in body["inputs"] if t["datatype"] == "BYTES")
    string_input["datatype"] = "FP32"
    with pytest.raises(RequestError, match="is a category, send BYTES"):
        parse_v2(body, contract)
