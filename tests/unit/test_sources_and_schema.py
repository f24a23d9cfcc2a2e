"""Sources other than CSV, and drafting a schema for new data."""
import pandas as pd
import sqlalchemy

from mlnb.core.config import config_from_dict
from mlnb.data.schema import DataError, load_schema
from mlnb.data.ingest import ingest

from conftest import ROOT, run


def splits_of(data_cfg):
    return ingest(data_cfg, seed=42).splits


def test_parquet_and_sql_sources_give_the_same_splits(tmp_path, telco):
    base = {"schema": str(ROOT / "schema/telco_churn.yaml")}
    from_csv = splits_of(config_from_dict({"data": {**base, "source": str(ROOT / "data/raw/telco_churn.csv")}}).data)
    telco.to_parquet(tmp_path / "telco.parquet", index=False)
    from_parquet = splits_of(config_from_dict({"data": {**base, "source": str(tmp_path / "telco.parquet")}}).data)
    url = f"sqlite:///{tmp_path / 'telco.db'}"
    telco.to_sql("customers", sqlalchemy.create_engine(url), index=False)
    from_sql = splits_of(config_from_dict({"data": {**base, "source": url, "query": "SELECT * FROM customers"}}).data)
    for name in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(from_csv[name], from_parquet[name])
        pd.testing.assert_frame_equal(from_csv[name], from_sql[name], check_dtype=False)


def test_sql_source_needs_a_query():
    cfg = config_from_dict({"data": {"source": "sqlite:///x.db", "schema": str(ROOT / "schema/telco_churn.yaml")}}).data
    try:
        ingest(cfg, 0)
        raise AssertionError("expected an error")
    except ValueError as e:
        assert "data.query" in str(e)


def test_schema_infer_drafts_a_schema_the_data_passes(tmp_path):
    out = tmp_path / "schema.yaml"
    run(["mlnb", "schema", "infer", str(ROOT / "data/raw/telco_churn.csv"), "-o", str(out)], tmp_path)
    schema = load_schema(out)
    assert schema.columns["total_charges"].nullable and schema.columns["contract"].allowed == ["Month-to-month", "One year", "Two year"]
    cfg = config_from_dict({"data": {"source": str(ROOT / "data/raw/telco_churn.csv"), "schema": str(out)}}).data
    assert sum(len(s) for s in ingest(cfg, 0).splits.values()) == 7043


def test_missing_data_file_is_named(tmp_path):
    cfg = config_from_dict({"data": {"source": str(tmp_path / "nope.csv"), "schema": str(ROOT / "schema/telco_churn.yaml")}}).data
    try:
        ingest(cfg, 0)
        raise AssertionError("expected an error")
    except DataError as e:
        assert "nope.csv: data file not found" in str(e)
