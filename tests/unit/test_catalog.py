"""The artefact catalog is defined once: `paths:` in params.yaml, read by `mlnb.core.config.Paths`, and named by
dvc.yaml as `${paths.NAME}`. Here dvc.yaml's deps and outs, once filled in from params.yaml (by mlnb and by DVC
itself), are checked against the catalog, and a params.yaml without the section still gets today's layout."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlnb.core.config import Paths, config_from_dict, load_config, load_paths, read_yaml
from mlnb.pipeline.ci import interpolate, pipeline_stages

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")
TEMPLATE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")

# Today's layout, written out: what a project without a `paths:` section must keep getting.
LAYOUT = {"processed": "data/processed", "train": "data/processed/train.parquet",
          "valid": "data/processed/valid.parquet", "test": "data/processed/test.parquet",
          "cleaning_log": "data/processed/cleaning.json",
          "features": "features", "feature_spec": "features/feature_spec.json",
          "reference_profile": "features/reference_profile.json",
          "model": "models/model.joblib", "leaderboard": "models/leaderboard.json",
          "train_metrics": "metrics/train.json",
          "evaluate_metrics": "metrics/evaluate.json", "plots": "plots/evaluate",
          "onnx_dir": "models/onnx", "onnx": "models/onnx/model.onnx", "onnx_int8": "models/onnx/model.int8.onnx",
          "export_report": "models/onnx/export_report.json", "export_metrics": "metrics/export.json",
          "estimator": "models/onnx/estimator.json", "loss_model": "models/onnx/loss_model.onnx",
          "multivariate": "models/onnx/multivariate.json",
          "registration": "models/registration.json", "reports": "reports", "run_facts": "runs"}
# The stage that writes each catalog entry that is a DVC output of its own (the others lie inside one: Paths.INSIDE).
WRITER = {"processed": "ingest", "features": "featurize", "model": "train", "leaderboard": "train",
          "train_metrics": "train", "evaluate_metrics": "evaluate", "plots": "evaluate", "onnx_dir": "export",
          "export_metrics": "export", "registration": "register"}
CODE = ("nbs/", "mlnb/")


def entries(stage: dict, kind: str) -> list[str]:
    "The paths of one kind (deps, outs, metrics) of a stage; an entry with options is a one-key mapping."
    return [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(kind, [])]


@pytest.fixture(scope="module")
def catalog() -> Paths:
    return load_config(ROOT / "params.yaml").paths


@pytest.fixture(scope="module")
def stages() -> dict:
    return pipeline_stages(ROOT / "dvc.yaml")


def test_without_a_paths_section_the_layout_is_todays():
    expected = {name: Path(path) for name, path in LAYOUT.items()}
    assert dict(Paths()) == expected
    assert dict(config_from_dict({"train": {"n_iter": 2}}).paths) == expected
    old = ROOT / "params.yaml"
    text = old.read_text()
    assert "\npaths:" in text
    without = {k: v for k, v in read_yaml(old).items() if k != "paths"}
    assert config_from_dict(without, "params.yaml").paths == Paths()


def test_params_yaml_declares_every_entry_of_the_catalog(catalog):
    declared = read_yaml(ROOT / "params.yaml")["paths"]
    assert set(declared) == set(Paths.model_fields)
    assert catalog == Paths(**declared)


def test_dvc_yaml_names_artefacts_only_through_the_catalog():
    "Every dep and out of dvc.yaml is code, or a `${...}` of params: no artefact path is written there as a literal."
    raw = read_yaml(ROOT / "dvc.yaml")["stages"]
    for name, stage in raw.items():
        for kind in ("deps", "outs", "metrics", "plots"):
            for path in entries(stage, kind):
                assert path.startswith(CODE) or TEMPLATE.search(path) or path == "data/feedback", (name, kind, path)
    for plot in read_yaml(ROOT / "dvc.yaml")["plots"]:
        (spec,) = plot.values()
        for path in spec["y"]:
            assert path.startswith("${paths.plots}/"), path


def test_every_dvc_path_is_a_catalog_entry_and_every_entry_is_in_dvc_yaml(catalog, stages):
    cfg = load_config(ROOT / "params.yaml")
    by_path = {path: name for name, path in catalog}
    params_inputs = {Path(cfg.data.source), Path(cfg.data.schema_path), Path(cfg.registry.users), Path("data/feedback")}
    for name, stage in stages.items():
        outs = [Path(p) for p in entries(stage, "outs") + entries(stage, "metrics")]
        for out in outs:
            assert out in by_path or out.parent == catalog.reports, (name, out)
        for dep in map(Path, entries(stage, "deps")):
            if not str(dep).startswith(CODE):
                assert dep in by_path or dep in params_inputs, (name, dep)
    written = {Path(p): name for name, stage in stages.items()
               for p in entries(stage, "outs") + entries(stage, "metrics")}
    for entry, stage in WRITER.items():
        assert written.get(getattr(catalog, entry)) == stage, entry
    inside = {f for files in Paths.INSIDE.values() for f in files}
    assert set(WRITER) | inside | {"reports", "run_facts"} == set(Paths.model_fields)          # each entry is accounted for
    # run facts (timings, run ids) differ on every run: in no stage's outputs, or the lock would never be reproduced
    assert not any(p == catalog.run_facts or p.is_relative_to(catalog.run_facts) for p in written), "paths.run_facts is a DVC output"
    for directory, files in Paths.INSIDE.items():
        assert getattr(catalog, directory) in written
        for f in files:
            assert getattr(catalog, f).is_relative_to(getattr(catalog, directory))
    # each stage reads what an earlier one wrote: the deps that are catalog entries lie in an earlier stage's outputs
    order = list(stages)
    for name, stage in stages.items():
        for dep in map(Path, entries(stage, "deps")):
            if dep in by_path:
                producer = next(s for p, s in written.items() if dep == p or dep.is_relative_to(p))
                assert order.index(producer) < order.index(name), (name, dep, producer)


def test_plots_are_read_from_the_catalogs_plot_directory(catalog):
    doc = read_yaml(ROOT / "dvc.yaml")
    plots = interpolate(doc["plots"], read_yaml(ROOT / "params.yaml"))
    files = [Path(f) for plot in plots for spec in plot.values() for f in spec["y"]]
    assert files and all(f.parent == catalog.plots for f in files)


def dvc_view(project: Path) -> dict:
    "Each stage's deps and outs as DVC itself resolves them."
    from dvc.repo import Repo
    with Repo(str(project)) as repo:
        return {s.name: (sorted(d.def_path for d in s.deps if d.def_path != "params.yaml"),
                         sorted(o.def_path for o in s.outs)) for s in repo.index.stages}


def mlnb_view(project: Path) -> dict:
    out = {}
    for name, stage in pipeline_stages(project / "dvc.yaml").items():
        out[name] = (sorted(entries(stage, "deps")), sorted(entries(stage, "outs") + entries(stage, "metrics")))
    return out


def test_mlnb_fills_in_dvc_yaml_as_dvc_does():
    assert mlnb_view(ROOT) == dvc_view(ROOT)


def test_moving_an_artefact_is_one_edit_of_params(tmp_path):
    "The catalog changed in params.yaml alone: DVC's graph and the stages' `cfg.paths` move together."
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    text = (tmp_path / "params.yaml").read_text()
    moved = (text.replace("  model: models/model.joblib", "  model: build/churn.joblib")
             .replace("  reports: reports", "  reports: build/reports"))
    assert moved != text
    (tmp_path / "params.yaml").write_text(moved)
    paths = load_paths(tmp_path / "params.yaml")
    assert (paths.model, paths.reports) == (Path("build/churn.joblib"), Path("build/reports"))
    assert paths.onnx == Path("models/onnx/model.onnx")                          # the rest stays where it was
    view = dvc_view(tmp_path)
    assert "build/churn.joblib" in view["train"][1] and "build/churn.joblib" in view["register"][0]
    assert "build/reports/03_train.html" in view["train"][1]
    assert not any("models/model.joblib" in deps for deps, _ in view.values())
    assert mlnb_view(tmp_path) == view


def test_a_file_outside_its_directory_output_is_refused_naming_both(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  processed: data/clean\n")          # the splits still say data/processed/...
    inside = r"paths.train \(data/processed/train.parquet\) must lie inside paths.processed \(data/clean\)"
    with pytest.raises(ValueError, match=inside):
        load_paths(params)
