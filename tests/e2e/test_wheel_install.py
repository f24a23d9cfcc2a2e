"""The wheel as a user gets it: built from the sources, installed with its `serve` extra into a fresh venv (pinned by
requirements.lock), and `mlnb serve` from that venv answering a real prediction for a signed ONNX model.

Nothing here imports the installed package by module path: the new venv's own interpreter walks every module it holds, and
the server is driven through its CLI and HTTP, so moving modules around inside mlnb/ does not break this test."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import BIN, ROOT, copy_project, run
from mlnb.core.config import config_from_dict
from mlnb.model.onnx import OnnxModel
from mlnb.features.spec import feature_spec, model_frame
from serving import Server, serve_params, signed_model_dir

pytestmark = pytest.mark.slow

# What the other extras bring: with only `serve` installed, these are the only imports allowed to be missing.
OTHER_EXTRAS_IMPORTS = {"dask", "distributed", "tqdm", "psycopg"}

# Run by the new venv's interpreter: import every module of the installed mlnb, then every third-party module those import
# anywhere, inside functions too (read from the installed sources: those run only on some paths, e.g. signing), and report.
WALK = r"""
import ast, importlib, importlib.metadata as md, json, pathlib, pkgutil, sys
import mlnb
names = [m.name for m in pkgutil.walk_packages(mlnb.__path__, "mlnb.")]
failed = {}
for name in names:
    try: importlib.import_module(name)
    except ModuleNotFoundError as e: failed[name] = e.name
third_party = set()
for path in pathlib.Path(mlnb.__file__).parent.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
               [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        third_party |= {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names | {"mlnb", "__future__"}}
for name in sorted(third_party):
    try: importlib.import_module(name)
    except ModuleNotFoundError as e: failed[name] = e.name
print(json.dumps({"file": mlnb.__file__, "modules": names, "third_party": sorted(third_party), "failed": failed, "loaded": sorted(sys.modules),
                  "requires": md.requires("mlnb"), "extras": md.metadata("mlnb").get_all("Provides-Extra"),
                  "installed": {d.metadata["Name"]: d.version for d in md.distributions()}}))
"""


def uv() -> str:
    return str(BIN / "uv") if (BIN / "uv").exists() else shutil.which("uv")


def venv_env(venv: Path) -> dict:
    "The environment of a user of `venv`: its bin first on PATH, this venv's tools and the source tree out of the way."
    path = [str(venv / "bin")] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    return {"PATH": os.pathsep.join(path), "PYTHONPATH": None, "VIRTUAL_ENV": None, "PYTHONHOME": None}


def clean(env: dict) -> dict:
    return {k: v for k, v in {**os.environ, **env}.items() if v is not None}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The wheel, built without network from a copy of the sources (the build leaves build/ and *.egg-info behind)."
    root = tmp_path_factory.mktemp("wheel")
    src = copy_project(root / "src", git=False)
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"), str(src)], root)
    (whl,) = (root / "dist").glob("mlnb-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    "A fresh venv with `mlnb[serve]` from the wheel, every version pinned by requirements.lock; removed afterwards (~1 GB)."
    venv = tmp_path_factory.mktemp("installed") / "venv"
    env = clean(venv_env(venv))
    run([uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], venv.parent, env=env)
    run([uv(), "pip", "install", "--quiet", "--python", str(venv / "bin/python"), f"{wheel}[serve]",
         "-c", str(ROOT / "requirements.lock")], venv.parent, env=env, timeout=1200)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture(scope="module")
def walked(venv) -> dict:
    p = run([str(venv / "bin/python"), "-c", WALK], venv.parent, env=clean(venv_env(venv)))
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(onnx_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return signed_model_dir(onnx_models["a"], root / "model", root / "keys"), root / "keys"


@pytest.fixture(scope="module")
def records(telco_split):
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    return json.loads(model_frame(s["test"].head(8), spec).to_json(orient="records"))


def test_the_installed_package_is_the_wheels_and_its_dependencies_are_consistent(venv, walked):
    assert Path(walked["file"]).is_relative_to(venv), walked["file"]          # not the source tree
    p = subprocess.run([uv(), "pip", "check", "--python", str(venv / "bin/python")], capture_output=True, text=True,
                       env=clean(venv_env(venv)))
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_module_but_the_other_extras_imports(walked):
    """All of mlnb imports with `serve` alone, the server's app included, and so does every third-party module it imports
    (inside functions too); only what batch or team bring may be missing."""
    assert len(walked["modules"]) > 20 and "mlnb.cli" in walked["modules"] and "model_signing" in walked["third_party"]
    missing = {module: name.split(".")[0] for module, name in walked["failed"].items()}
    assert set(missing.values()) <= OTHER_EXTRAS_IMPORTS, missing
    assert {"starlette", "prometheus_client", "orjson"} <= set(walked["loaded"])         # the server's modules were imported


def test_metadata_lists_the_extras_and_the_serve_extra_is_installed(walked):
    assert {"serve", "batch", "team", "all", "dev"} <= set(walked["extras"])
    reqs = [Requirement(r) for r in walked["requires"]]
    serve = [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "serve"})]
    base = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    names = lambda rs: {canonicalize_name(r.name) for r in rs}
    assert {"starlette", "uvicorn", "orjson", "prometheus-client", "python-json-logger", "httpx", "opentelemetry-sdk"} <= names(serve)
    assert {"mlflow", "dvc", "papermill", "skl2onnx", "onnxruntime", "cryptography", "model-signing"} <= names(base)
    installed = {canonicalize_name(n): v for n, v in walked["installed"].items()}
    for r in base + serve:
        assert canonicalize_name(r.name) in installed and r.specifier.contains(installed[canonicalize_name(r.name)], prereleases=True), r


def test_mlnb_serve_from_the_installed_venv_answers_a_prediction(venv, model_dir, records, tmp_path):
    directory, keys = model_dir
    work = tmp_path / "server"
    server = Server(work, serve_params(directory, keys, work / "logs"), mlnb=venv / "bin/mlnb", env=venv_env(venv))
    try:
        server.wait_ready()
        r = server.client.post("/invocations", json={"dataframe_records": records})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        want = OnnxModel(directory / "model.onnx").run(pd.DataFrame(records))
        assert len(preds) == len(records) and {p["label"] for p in preds} <= {"No", "Yes"}
        assert [p["label"] for p in preds] == list(want["label"])
        proba = np.array([[p["probabilities"]["No"], p["probabilities"]["Yes"]] for p in preds])
        np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(proba, want["probabilities"], atol=1e-6)
        metrics = server.client.get("/metrics")
        assert metrics.status_code == 200 and "mlnb_requests_total" in metrics.text
    finally:
        server.stop()
