"""The package is the notebooks' export, and the notebooks are committed clean."""
import filecmp
import json

from conftest import copy_project, run


def tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_nbdev_export_leaves_the_package_unchanged(tmp_path):
    project = copy_project(tmp_path / "p", git=False)
    before = tree(project / "mlnb")
    run(["nbdev-export"], project)
    after = tree(project / "mlnb")
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"mlnb/ is out of sync with nbs/ (run nbdev-export and commit): {changed}"


def test_notebooks_are_clean(tmp_path):
    project = copy_project(tmp_path / "p", git=False)
    before = tree(project / "nbs")
    run(["nbdev-clean"], project)
    after = tree(project / "nbs")
    changed = sorted(str(p) for p in before if before[p] != after.get(p))
    assert not changed, f"notebooks are not clean (run nbdev-clean and commit): {changed}"


def test_stage_notebooks_keep_their_parameters_tag(tmp_path):
    project = copy_project(tmp_path / "p", git=False)
    run(["nbdev-clean"], project)
    notebooks = sorted((project / "nbs/stages").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        tagged = [c for c in json.loads(nb.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
        assert [c["cell_type"] for c in tagged] == ["code"], nb.name          # the one cell papermill injects after
