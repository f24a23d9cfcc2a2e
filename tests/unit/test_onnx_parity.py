"""Every candidate family exports to ONNX and matches scikit-learn on held-out rows, for every task."""
import numpy as np
import pandas as pd
import pytest

from mlnb.core.config import ExportConfig, FeaturesConfig, ParityConfig, config_from_dict
from mlnb.data.ingest import clean, split_data, validate
from mlnb.data.schema import load_schema
from mlnb.model.onnx import OnnxModel
from mlnb.training.export import ParityError, export
from mlnb.features.spec import feature_spec, model_frame
from mlnb.training.train import candidate_pipeline

from conftest import ROOT

DERIVED = config_from_dict({"features": {"derived": [{"name": "avg_spend", "op": "ratio", "of": ["total_charges", "tenure"]},
                                                      {"name": "log_tenure", "op": "log1p", "of": ["tenure"]}]}}).features


@pytest.fixture(scope="module")
def splits(telco):
    schema = load_schema(ROOT / "schema/telco_churn.yaml")
    df, _ = clean(validate(telco, schema), schema)
    return schema, split_data(df, "churn", "binary", 0.15, 0.3, seed=0)


def fitted(family, splits, target, task):
    schema, s = splits
    spec = feature_spec(schema, DERIVED, target, task)
    train = s["train"]
    return candidate_pipeline(family, spec, seed=0).fit(model_frame(train, spec), train[target]), spec, s["test"]


@pytest.mark.parametrize("family", ["logreg", "hgb", "rf", "mlp"])
def test_binary_parity(family, splits):
    model, spec, test = fitted(family, splits, "churn", "binary")
    result = export(model, test, spec, ExportConfig(), {"model_name": "churn"})
    assert result.parity.passed and result.parity.rows == len(test) > 2000
    assert result.parity.max_abs_diff <= 1e-4 and result.parity.label_agreement >= 0.999
    onnx_model = OnnxModel(result.proto.SerializeToString())
    assert onnx_model.metadata["model_name"] == "churn"
    # the file alone is the contract: one named input per raw column, no target
    assert set(onnx_model.inputs) == set(spec.inputs) and "churn" not in onnx_model.inputs
    assert onnx_model.inputs["contract"] == "tensor(string)" and onnx_model.inputs["tenure"] == "tensor(float)"


@pytest.mark.parametrize("family", ["logreg", "hgb", "rf", "mlp"])
def test_multiclass_parity(family, splits):
    model, spec, test = fitted(family, splits, "contract", "multiclass")
    result = export(model, test, spec, ExportConfig(), {})
    assert result.parity.passed, result.parity.detail
    assert OnnxModel(result.proto.SerializeToString()).predict_proba(model_frame(test, spec)).shape == (len(test), 3)


@pytest.mark.parametrize("family", ["ridge", "hgb", "rf", "mlp"])
def test_regression_parity(family, splits):
    model, spec, test = fitted(family, splits, "monthly_charges", "regression")
    result = export(model, test, spec, ExportConfig(), {})
    assert result.parity.passed and result.parity.max_rel_diff <= 1e-4, result.parity.detail


def test_mlp_is_quantized_and_kept_only_within_tolerance(splits):
    model, spec, test = fitted("mlp", splits, "churn", "binary")
    result = export(model, test, spec, ExportConfig(), {})
    variants = result.report["variants"]
    assert result.quantized is not None and "kept" in result.report["quantization"]
    assert variants["int8"]["bytes"] < variants["onnx"]["bytes"]
    assert abs(variants["int8"]["test_score"] - variants["onnx"]["test_score"]) <= 0.01
    strict = ExportConfig(quantize={"enabled": True, "max_metric_drop": -1.0})
    assert export(model, test, spec, strict, {}).quantized is None


def test_trees_are_not_quantized(splits):
    model, spec, test = fitted("hgb", splits, "churn", "binary")
    result = export(model, test, spec, ExportConfig(), {})
    assert result.quantized is None and "not applicable" in result.report["quantization"]


def test_parity_failure_says_by_how_much(splits):
    model, spec, test = fitted("logreg", splits, "churn", "binary")
    impossible = ExportConfig(parity=ParityConfig(max_abs_diff=0.0, min_label_agreement=1.0))
    with pytest.raises(ParityError, match=r"max \|Δprobability\| [0-9.e-]+ \(tolerance 0\)"):
        export(model, test, spec, impossible, {})


def test_unseen_category_and_missing_values_are_served(splits):
    model, spec, test = fitted("logreg", splits, "churn", "binary")
    onnx_model = OnnxModel(export(model, test, spec, ExportConfig(), {}).proto.SerializeToString())
    rows = model_frame(test.head(3), spec).copy()
    rows.loc[0, "contract"], rows.loc[1, "total_charges"] = "Weekly", np.nan
    np.testing.assert_allclose(onnx_model.predict_proba(rows), model.predict_proba(rows), atol=1e-5)
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    np.testing.assert_allclose(onnx_model.run_records(records)["probabilities"], model.predict_proba(rows), atol=1e-5)
