"""Bad input stops ingest with a message naming what is wrong, and writes nothing."""
import pandas as pd
import pytest

from conftest import run, set_params

CASES = {
    "missing column": (lambda df: df.drop(columns=["tenure"]), ["column 'tenure' is missing"]),
    "wrong dtype": (lambda df: df.assign(monthly_charges=df.monthly_charges.astype(str).where(df.index % 100 != 0, "about 70")),
                    ["'monthly_charges' cannot be read as 'float64'", "71 row(s)"]),
    "unknown category": (lambda df: df.assign(contract=df.contract.where(df.index >= 3, "Weekly")),
                         ["'contract' must be one of", "unknown category", "3 row(s)", "'Weekly'"]),
    "target missing": (lambda df: df.drop(columns=["churn"]), ["target column 'churn' is missing"]),
    "out of range": (lambda df: df.assign(tenure=df.tenure.where(df.index != 5, -4)), ["'tenure' must be >= 0: 1 row(s)", "row 5: -4"]),
}


def ingest_outputs(project):
    return [p for p in (project / "data/processed").glob("*")] if (project / "data/processed").exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_clear_message(project, telco, case):
    mutate, expected = CASES[case]
    mutate(telco).to_csv(project / "data/raw/bad.csv", index=False)
    set_params(project, {"data": {"source": "data/raw/bad.csv"}})
    p = run(["mlnb", "stage", "ingest"], project, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    for fragment in expected:
        assert fragment in p.stderr, f"{fragment!r} not in:\n{p.stderr}"
    assert "data/raw/bad.csv" in p.stderr
    assert ingest_outputs(project) == []
    assert not (project / "reports/01_ingest.ipynb").exists()
    assert (project / "reports/01_ingest.failed.ipynb").exists()


@pytest.mark.parametrize("content, message", [("", "file is empty"), ("churn,female,tenure\n", "has a header but no rows")])
def test_empty_files(project, content, message):
    (project / "data/raw/empty.csv").write_text(content)
    set_params(project, {"data": {"source": "data/raw/empty.csv"}})
    p = run(["mlnb", "stage", "ingest"], project, check=False)
    assert p.returncode == 1 and message in p.stderr and "data/raw/empty.csv" in p.stderr
    assert ingest_outputs(project) == []


def test_failure_keeps_previous_outputs_intact(project, telco):
    "A failed re-run leaves the last good outputs as they were, not half-replaced."
    run(["mlnb", "stage", "ingest"], project)
    before = {p.name: p.read_bytes() for p in ingest_outputs(project)}
    assert {"train.parquet", "valid.parquet", "test.parquet", "cleaning.json"} <= set(before)
    telco.drop(columns=["tenure"]).to_csv(project / "data/raw/telco_churn.csv", index=False)
    assert run(["mlnb", "stage", "ingest"], project, check=False).returncode == 1
    assert {p.name: p.read_bytes() for p in ingest_outputs(project)} == before
