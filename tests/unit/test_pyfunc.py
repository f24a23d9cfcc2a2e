"""The MLflow pyfunc of a version (mlnb.model.pyfunc) loads and predicts without the training toolchain."""
import json
import shutil
import sys

from mlnb.examples import toy_frame, toy_model
from mlnb.model.pyfunc import save_mlflow_model

from conftest import ROOT, run, tool_env

TOOLCHAIN = {"sklearn", "skl2onnx", "papermill", "matplotlib", "pandera", "optuna"}


def test_the_pyfunc_loads_and_predicts_without_the_training_toolchain(tmp_path):
    toy = toy_model(tmp_path / "toy")
    model = tmp_path / "mlflow-model"
    model.mkdir()
    for f in ("model.onnx", "model.onnx.sig"): shutil.copy(toy.dir / f, model / f)
    save_mlflow_model(model, toy_frame())
    rows = json.dumps(toy_frame().drop(columns="churn").to_dict("records"))
    code = ("import json, sys, pandas as pd, mlflow.pyfunc\n"
            f"m = mlflow.pyfunc.load_model({str(model)!r})\n"
            f"out = m.predict(pd.DataFrame(json.loads({rows!r})))\n"
            "print(json.dumps({'labels': list(out['label']), 'modules': sorted(sys.modules)}))")
    p = run([sys.executable, "-c", code], ROOT, env={**tool_env(), "MLNB_PUBLIC_KEY": str(toy.public_key)}, timeout=180)
    answer = json.loads(p.stdout.splitlines()[-1])
    assert len(answer["labels"]) == 6 and set(answer["labels"]) <= {"Yes", "No"}
    loaded = set(answer["modules"])
    assert "mlnb.model.pyfunc" in loaded and "onnxruntime" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in TOOLCHAIN) == []
    assert sorted(m for m in loaded if m.startswith(("mlnb.training", "mlnb.evaluation", "mlnb.registry"))) == []
