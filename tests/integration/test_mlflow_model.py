"""A registered version is an MLflow 3 model (issue 20): registered from a LoggedModel with the `onnx` and `python_function`
flavors, a signature, an input example, pinned requirements and the evaluation metrics; `mlflow.pyfunc.load_model` and
`mlflow models serve` answer like `mlnb serve`, after verifying the graph's signature; versions registered before keep serving.
Against a real MLflow store: a local SQLite one, and a tracking server backed by PostgreSQL (team mode, slow)."""
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model

from mlnb.core.config import config_from_dict
from mlnb.data.schema import load_schema
from mlnb.features.spec import feature_spec, model_frame
from mlnb.model.bundle import VersionBundle, VersionFacts
from mlnb.model.onnx import OnnxModel
from mlnb.model.pyfunc import pinned_requirements
from mlnb.model.signing import ensure_signing_key, sign_model
from mlnb.registry.store import COMPLETE, STATUS, run_gates

from conftest import BIN, ROOT, run, tool_env
from registration import make_env, registry_as
from serving import Server, free_port
from tracking import postgres_database, running_mlflow

SCHEMA = ROOT / "schema/telco_churn.yaml"
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def thresholded(telco_split, tmp_path_factory) -> Path:
    "A Telco logistic regression exported with a binary decision threshold of 0.3 baked into its graph."
    from sklearn.model_selection import FixedThresholdClassifier
    from mlnb.training.export import to_onnx
    from mlnb.training.train import candidate_pipeline
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    fitted = candidate_pipeline("logreg", spec, 0).fit(model_frame(s["train"], spec), s["train"]["churn"])
    model = FixedThresholdClassifier(fitted, threshold=THRESHOLD, pos_label="Yes")
    path = tmp_path_factory.mktemp("thr") / "model.onnx"
    path.write_bytes(to_onnx(model, spec, metadata={"model_name": "churn", "classes": json.dumps(["No", "Yes"])}).SerializeToString())
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request, tmp_path):
    "The registry's MLflow store: a local SQLite file, or a tracking server on 127.0.0.1 backed by PostgreSQL."
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite": yield f"sqlite:///{tmp_path / 'registry' / 'mlruns.db'}"
        else: yield stack.enter_context(running_mlflow(stack.enter_context(postgres_database()), tmp_path / "server-artifacts"))


def register_version(env: dict, model: Path, test: pd.DataFrame, root: Path):
    "Register `model` as the pipeline does: a bundle with the schema and the evaluation, five test rows as the input example."
    cfg = config_from_dict(env)
    key, pub = Path(cfg.registry.signing_key), Path(cfg.registry.public_key)
    ensure_signing_key(key, pub)
    graph = OnnxModel(model)
    out = graph.run(test)
    y = (test["churn"] == "Yes").to_numpy()
    evaluation = {"rows": len(test), "accuracy": float((out["label"] == test["churn"].to_numpy()).mean()),
                  "brier": float(np.mean((out["probabilities"][:, 1] - y) ** 2))}
    (root / "evaluate.json").write_text(json.dumps(evaluation))
    bundle = VersionBundle(files={"onnx": model, "schema": SCHEMA, "evaluation": root / "evaluate.json"},
                           facts=VersionFacts(task="binary", target="churn", classes=["No", "Yes"], positive_class="Yes",
                                              threshold=THRESHOLD, family="logreg"))
    fairness = {"female": {"demographic_parity_ratio": 0.95}}
    gates = lambda cand, champ, sig_err: run_gates(cand, champ, test, cfg, fairness, {"passed": True}, sig_err)
    start = time.perf_counter()
    v, created = registry_as(env, "dana").register(bundle, {}, {"task": "binary"}, gates, key, pub, example=test.head(5))
    return v, evaluation, time.perf_counter() - start


def champion_env(store: str, model: Path, telco_split, tmp_path):
    env = make_env(tmp_path / "registry")
    env["train"]["tracking_uri"] = store
    test = telco_split[1]["test"]
    v, evaluation, seconds = register_version(env, model, test, tmp_path)
    registry_as(env, "ann").approve(v.version, "reviewed")
    registry_as(env, "adam").promote(v.version, reason="first champion")
    return env, registry_as(env, "vic").get(v.version), evaluation


@contextlib.contextmanager
def tracking(uri: str, public_key: str):
    "MLflow's default tracking and registry URI, and the public key the pyfunc verifies with, for the block."
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLNB_PUBLIC_KEY")}
    os.environ.update({"MLFLOW_TRACKING_URI": uri, "MLNB_PUBLIC_KEY": public_key})
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    try: yield
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
        mlflow.set_tracking_uri(None); mlflow.set_registry_uri(None)


def test_champion_loads_with_pyfunc_and_answers_like_the_server(store, thresholded, telco_split, tmp_path):
    env, v, evaluation = champion_env(store, thresholded, telco_split, tmp_path)
    inputs = list(OnnxModel(thresholded).inputs)
    batch = telco_split[1]["test"][inputs].head(200)
    with tracking(store, env["registry"]["public_key"]):
        answer = mlflow.pyfunc.load_model("models:/churn@champion").predict(batch)
    params = {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0,
                               "prediction_log": {"dir": str(tmp_path / "logs/p"), "feedback_dir": str(tmp_path / "logs/f")}}}
    s = Server(tmp_path / "work", params).wait_ready()
    try:
        served = s.client.post("/invocations", json={"dataframe_records": json.loads(batch.to_json(orient="records"))})
    finally: s.stop()
    assert served.status_code == 200, served.text
    predictions = served.json()["predictions"]
    assert len(answer) == len(predictions) == 200
    assert list(answer["label"]) == [p["label"] for p in predictions]
    ours = np.array([[p["No"], p["Yes"]] for p in answer["probabilities"]])
    theirs = np.array([[p["probabilities"]["No"], p["probabilities"]["Yes"]] for p in predictions])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    between = (ours[:, 1] >= THRESHOLD) & (ours[:, 1] < 0.5)          # rows only the threshold labels "Yes"
    assert between.any() and (answer["label"][between] == "Yes").all()


def test_the_logged_model_has_the_evaluation_metrics_and_the_signature(store, thresholded, telco_split, tmp_path):
    env, v, evaluation = champion_env(store, thresholded, telco_split, tmp_path)
    assert v.model_id and v.model_uri == f"models:/{v.model_id}"
    client = MlflowClient(store, store)
    logged = client.get_logged_model(v.model_id)
    assert {m.key: m.value for m in logged.metrics} == pytest.approx(evaluation)
    assert logged.source_run_id == v.run_id and logged.status == LoggedModelStatus.READY
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "churn", "version": v.version}]
    assert client.get_model_version("churn", v.version).source == f"models:/{v.model_id}"   # registered from that model
    with tracking(store, env["registry"]["public_key"]):
        info = Model.load("models:/churn@champion")
        example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/input_example.json",
                                                                     dst_path=str(tmp_path / "ex"))).read_text())
        requirements = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/requirements.txt",
                                                                dst_path=str(tmp_path / "req"))).read_text().split()
    assert sorted(info.flavors) == ["onnx", "python_function"]
    assert info.flavors["python_function"]["loader_module"] == "mlnb.model.pyfunc"
    graph, schema = OnnxModel(thresholded), load_schema(SCHEMA)
    types = {c.name: c.type.name for c in info.signature.inputs.inputs}
    assert list(types) == list(graph.inputs)                                       # one named input per raw column
    assert types["tenure"] == "long" and types["total_charges"] == "double" and types["contract"] == "string"
    assert all(types[n] == ("string" if schema.columns[n].dtype == "str" else "long" if not schema.columns[n].nullable else "double")
               for n in graph.inputs if schema.columns[n].dtype in ("str", "int"))
    assert example["columns"] == list(graph.inputs) and len(example["data"]) == 5
    assert requirements == pinned_requirements() and "mlflow==" + mlflow.__version__ in requirements
    # the bundle stays where mlnb reads it, the version's run's model/, and MLflow merges no LoggedModel file into it
    with tracking(store, env["registry"]["public_key"]):
        directory = registry_as(env, "vic").download(v.version, tmp_path / "bundle")
    names = {p.name for p in directory.iterdir()}
    assert {"model.onnx", "model.onnx.sig", "schema.yaml", "evaluate.json", "bundle.json", "model_card.md", "approval.sig"} <= names
    assert "MLmodel" not in names and "requirements.txt" not in names
    assert registry_as(env, "vic").mlflow_model(v.version) == v.model_uri


def test_a_tampered_onnx_file_fails_the_pyfunc_load(thresholded, telco_split, tmp_path):
    store = f"sqlite:///{tmp_path / 'registry' / 'mlruns.db'}"
    env, v, _ = champion_env(store, thresholded, telco_split, tmp_path)
    location = MlflowClient(store, store).get_logged_model(v.model_id).artifact_location
    stored = Path(location.removeprefix("file://")) / "model.onnx"
    with tracking(store, env["registry"]["public_key"]):
        assert mlflow.pyfunc.load_model("models:/churn@champion")                 # verifies as stored
        stored.write_bytes(stored.read_bytes() + b"\0")
        with pytest.raises(Exception, match="model.onnx: signature verification failed: the file was modified after signing"):
            mlflow.pyfunc.load_model("models:/churn@champion")
        os.environ["MLNB_PUBLIC_KEY"] = ""
        with contextlib.chdir(tmp_path), pytest.raises(Exception, match="set MLNB_PUBLIC_KEY to the build signing public key"):
            mlflow.pyfunc.load_model("models:/churn@champion")


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(thresholded, telco_split, tmp_path):
    store = f"sqlite:///{tmp_path / 'registry' / 'mlruns.db'}"
    env, v, _ = champion_env(store, thresholded, telco_split, tmp_path)
    batch = telco_split[1]["test"][list(OnnxModel(thresholded).inputs)].head(5)
    with tracking(store, env["registry"]["public_key"]):
        expected = mlflow.pyfunc.load_model("models:/churn@champion").predict(batch)
    port = free_port()
    environment = {**tool_env(), "MLFLOW_TRACKING_URI": store, "MLNB_PUBLIC_KEY": env["registry"]["public_key"]}
    log = (tmp_path / "mlflow-serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/churn@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=environment, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "mlflow-serve.log").read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200: break
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=30,
                       json={"dataframe_records": json.loads(batch.to_json(orient="records"))})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["label"] for p in predictions] == list(expected["label"])
    np.testing.assert_allclose([p["probabilities"]["Yes"] for p in predictions], [p["Yes"] for p in expected["probabilities"]])


def old_style_version(env: dict, model: Path, root: Path) -> str:
    """A version as mlnb registered it before versions were MLflow models: the signed graph in its run's `model/` directory,
    the version's source that directory, no LoggedModel, no MLmodel."""
    cfg = config_from_dict(env)
    key, pub = Path(cfg.registry.signing_key), Path(cfg.registry.public_key)
    ensure_signing_key(key, pub)
    d = root / "old" / "model"; d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(model.read_bytes()); sign_model(d / "model.onnx", key)
    (d / "schema.yaml").write_bytes(SCHEMA.read_bytes())
    client = MlflowClient(cfg.registry_uri, cfg.registry_uri)
    experiment = client.create_experiment("old-style", artifact_location=(root / "old-artifacts").as_uri())
    run_ = client.create_run(experiment, run_name="register-churn")
    client.log_artifacts(run_.info.run_id, str(d), "model")
    client.set_terminated(run_.info.run_id)
    client.create_registered_model("churn", tags={"mlnb.managed": "true"})
    sha = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()
    tags = {STATUS: "candidate", "mlnb.onnx_sha256": sha, "mlnb.gates": "[]", "mlnb.gates_passed": "true", "mlnb.task": "binary", COMPLETE: "complete"}
    return str(client.create_model_version("churn", f"{run_.info.artifact_uri}/model", run_id=run_.info.run_id, tags=tags).version)


def test_an_old_style_version_still_serves_and_show_says_it_is_not_pyfunc_loadable(onnx_models, records, tmp_path):
    env = make_env(tmp_path / "registry")
    version = old_style_version(env, onnx_models["a"], tmp_path)
    registry_as(env, "ann").approve(version, "reviewed")
    registry_as(env, "adam").promote(version, reason="first champion")
    assert registry_as(env, "vic").mlflow_model(version) is None
    params = {**env, "serve": {**env["serve"], "model": "churn@champion", "reload_poll_seconds": 0,
                               "prediction_log": {"dir": str(tmp_path / "logs/p"), "feedback_dir": str(tmp_path / "logs/f")}}}
    s = Server(tmp_path / "work", params).wait_ready()
    try: r = s.client.post("/invocations", json={"dataframe_records": records[:3]})
    finally: s.stop()
    assert r.status_code == 200 and r.json()["model_version"] == version, r.text
    (tmp_path / "work" / "params.yaml").write_text(json.dumps(env))
    shown = run(f"MLNB_USER=vic MLNB_SECRET=viewer-secret {BIN / 'mlnb'} registry show churn {version}", tmp_path / "work").stdout
    assert "not pyfunc-loadable" in shown, shown


def test_registry_show_says_a_new_version_is_pyfunc_loadable(thresholded, telco_split, tmp_path):
    store = f"sqlite:///{tmp_path / 'registry' / 'mlruns.db'}"
    env, v, _ = champion_env(store, thresholded, telco_split, tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(env))
    shown = run(f"MLNB_USER=vic MLNB_SECRET=viewer-secret {BIN / 'mlnb'} registry show churn {v.version}", tmp_path).stdout
    assert f"pyfunc-loadable: MLflow model models:/{v.model_id}" in shown and "not pyfunc-loadable" not in shown, shown
