"""The package's layers (nbs/index.ipynb, pyproject.toml [tool.importlinter]): `lint-imports` passes on the real
package, fails on a small package that breaks them on purpose and names the import that does; and importing the server
loads no training toolchain."""
import json
import sys
import textwrap

import pytest

from conftest import ROOT, run, tool_env

# what the server must never load: the training, conversion, stage-running, tracking, plotting and validation libraries
TOOLCHAIN = {"skl2onnx", "sklearn", "papermill", "mlflow", "matplotlib", "pandera"}


def lint_imports(cwd):
    "`lint-imports` on the contracts of the pyproject.toml in `cwd` (it finds the packages there too)."
    return run(["lint-imports", "--no-cache"], cwd, check=False, timeout=120)


def test_the_package_keeps_its_layers():
    p = lint_imports(ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Layers: each imports only from its own layer or lower ones KEPT" in out, out
    assert "The server does not import training or evaluation, even indirectly KEPT" in out, out
    assert " 0 broken" in out, out


CONTRACTS = '''
[tool.importlinter]
root_package = "toy"

[[tool.importlinter.contracts]]
name = "toy layers"
type = "layers"
containers = ["toy"]
layers = ["high", "low"]
exhaustive = true
'''


def toy_package(root, modules: dict[str, str]):
    "A package `toy` under `root` with the two-layer contract above; `modules`: code by dotted name below `toy`."
    (root / "pyproject.toml").write_text(CONTRACTS)
    for package in ("toy", "toy/high", "toy/low"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    for name, code in modules.items():
        path = root / "toy" / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("")
        path.write_text(textwrap.dedent(code))
    return root


def test_a_package_within_its_layers_passes(tmp_path):
    "The control for the cases below: the higher layer importing the lower one is what the layers allow."
    toy_package(tmp_path, {"high.top": "from toy.low.base import VALUE\n", "low.base": "VALUE = 1\n"})
    p = lint_imports(tmp_path)
    assert p.returncode == 0 and "toy layers KEPT" in p.stdout, p.stdout + p.stderr
    assert "Analyzed 5 files, 1 dependenc" in p.stdout, p.stdout          # it saw the package and its one import


# the modules, and the line of toy/low/base.py that imports upwards
UPWARD = {
    "at the top of a module": ({"high.top": "VALUE = 2\n", "low.base": "from toy.high.top import VALUE\n"}, 1),
    "inside a function": ({"high.top": "VALUE = 2\n",
                           "low.base": "def value():\n    from toy.high.top import VALUE\n    return VALUE\n"}, 2),
    "in a cycle between the layers": ({"high.top": "from toy.low.base import VALUE\n",
                                       "low.base": "VALUE = 1\n\ndef top():\n    import toy.high.top\n"
                                                   "    return toy.high.top\n"}, 4),
}


@pytest.mark.parametrize("case", list(UPWARD))
def test_an_upward_import_fails_the_check_and_is_named(tmp_path, case):
    modules, line = UPWARD[case]
    toy_package(tmp_path, modules)
    p = lint_imports(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "toy layers BROKEN" in out and "toy.low is not allowed to import toy.high" in out, out
    assert f"toy.low.base -> toy.high.top (l.{line})" in out, out


def test_a_subpackage_outside_every_layer_fails_the_check(tmp_path):
    "The contract is exhaustive: a new subpackage needs its place in the list of layers."
    toy_package(tmp_path, {"high.top": "VALUE = 2\n", "low.base": "VALUE = 1\n", "extra.thing": "VALUE = 3\n"})
    p = lint_imports(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "toy layers BROKEN" in out and "toy.extra" in out, out


def test_importing_the_server_loads_no_training_toolchain():
    code = "import json, sys; import mlnb.serving.app; print(json.dumps(sorted(sys.modules)))"
    p = run([sys.executable, "-c", code], ROOT, env=tool_env(), timeout=120)
    loaded = set(json.loads(p.stdout.splitlines()[-1]))
    assert {"mlnb.serving.app", "onnxruntime"} <= loaded             # the server itself, and what it runs models with
    assert sorted(m for m in loaded if m.split(".")[0] in TOOLCHAIN) == []
    assert sorted(m for m in loaded if m.startswith(("mlnb.training", "mlnb.evaluation"))) == []
