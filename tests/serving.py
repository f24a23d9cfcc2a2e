"""Helpers for the serving tests: signed model directories, a real `mlnb serve` process on 127.0.0.1, its metrics, access
control and TLS settings, and a workspace for `mlnb monitor` next to a served model."""
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlnb.data.ingest import synthesize
from mlnb.features.spec import model_frame, reference_profile
from mlnb.model.onnx import OnnxModel
from mlnb.model.signing import ensure_signing_key, sign_model

from conftest import BIN, ROOT, run, tool_env

CHALLENGE = 'Bearer realm="mlnb"'          # what a server with access control answers a request without a known key


def wait_for(check, timeout: float, what: str):
    "The first true value `check()` returns, polled every 0.5 s; an AssertionError naming `what` after `timeout` s."
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value: return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed_model_dir(model: Path, dest: Path, keys: Path) -> Path:
    "`model` copied to `dest/model.onnx` with the project's schema beside it, signed with the key pair in `keys`."
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, dest / "model.onnx")
    shutil.copy(ROOT / "schema/telco_churn.yaml", dest / "schema.yaml")
    ensure_signing_key(keys / "signing.key", keys / "signing.pub")
    sign_model(dest / "model.onnx", keys / "signing.key")
    return dest


class Server:
    """`mlnb serve` in a subprocess; `stop()` sends SIGTERM and waits. Its `client` sends `api_key` (as a Bearer token) and `headers`
    with every request; with `serve.tls` in the params it speaks https, trusting the CA certificate `cacert`. `mlnb` is the
    executable (default: this venv's); `env` entries override the tools' environment, and a None value removes that variable."""
    def __init__(self, workdir: Path, params: dict, extra_args: tuple = (), env: dict | None = None,
                 api_key: str | None = None, headers: dict | None = None, cacert: Path | None = None, mlnb: Path | None = None):
        self.workdir, self.port = workdir, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "params.yaml").write_text(json.dumps(params))          # JSON is YAML
        self.stderr_path = workdir / f"serve-{self.port}.err"
        env = {k: v for k, v in {**tool_env(), **(env or {})}.items() if v is not None}
        self.proc = subprocess.Popen([str(mlnb or BIN / "mlnb"), "serve", "--params", "params.yaml", "--port", str(self.port), *extra_args],
                                     cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"))
        self.url = f"{'https' if (params.get('serve') or {}).get('tls') else 'http'}://127.0.0.1:{self.port}"
        self.verify = ssl.create_default_context(cafile=str(cacert)) if cacert else True
        self.client = self.new_client(api_key, headers)

    def new_client(self, api_key: str | None = None, headers: dict | None = None) -> httpx.Client:
        "A client for this server (its URL and CA) sending `api_key` as a Bearer token and `headers` with every request."
        headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, verify=self.verify)

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlnb serve exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                if self.client.get("/v2/health/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"mlnb serve not ready after {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait()
        return self.proc.returncode


def signed_logreg(telco_split, root: Path) -> tuple[Path, Path]:
    "One real exported logistic regression of the Telco split, signed: (its model directory, the keys directory)."
    import json
    from mlnb.core.config import config_from_dict
    from mlnb.features.spec import feature_spec, model_frame
    from mlnb.training.export import to_onnx
    from mlnb.training.train import candidate_pipeline
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    model = candidate_pipeline("logreg", spec, 0).fit(model_frame(s["train"], spec), s["train"]["churn"])
    meta = {"model_name": "churn", "classes": json.dumps([str(c) for c in model.classes_])}
    (root / "a.onnx").write_bytes(to_onnx(model, spec, metadata=meta).SerializeToString())
    return signed_model_dir(root / "a.onnx", root / "model", root / "keys"), root / "keys"


def serve_params(model_dir: Path, keys: Path, logs: Path, **serve) -> dict:
    "Params serving the ONNX file in `model_dir`, logs under `logs`, fast flushes; `serve` overrides."
    base = {"model": str(model_dir / "model.onnx"), "reload_poll_seconds": 0, "max_rows": 50, "max_body_bytes": 65536,
            "prediction_log": {"dir": str(logs / "predictions"), "feedback_dir": str(logs / "feedback"), "flush_seconds": 0.2}}
    for k, v in serve.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return {"registry": {"public_key": str(keys / "signing.pub")}, "serve": base}


def metrics(server) -> dict:
    "Samples by (name, sorted labels)."
    text = server.client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(server, name, **labels) -> float:
    return sum(v for (n, ls), v in metrics(server).items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def create_key(work, name: str, role: str) -> str:
    "A key made by `mlnb api-key create`, in the keys file the params in `work` name."
    return run(["mlnb", "api-key", "create", name, "--role", role, "--params", "params.yaml"], work).stdout.strip()


def secured_params(model_dir, work, **serve) -> dict:
    directory, keys = model_dir
    params = serve_params(directory, keys, work / "logs", auth={"keys_file": str(work / "keys.yaml"), **serve.pop("auth", {})}, **serve)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(json.dumps(params))
    return params


def tls_params(certificate) -> dict:
    "`serve.tls` for the (certificate, key) pair of the `certificate` fixture."
    return {"certfile": str(certificate[0]), "keyfile": str(certificate[1])}


def workspace(root, spec, onnx_models, webhook):
    "A project workspace whose reference is synthetic: profile, feature spec, test split, evaluation, served model and params."
    (root / "features").mkdir(parents=True); (root / "data/processed").mkdir(parents=True); (root / "metrics").mkdir()
    train, test = synthesize(5000, seed=1), synthesize(1500, seed=2)
    reference_profile(train, spec).save(root / "features/reference_profile.json")
    spec.save(root / "features/feature_spec.json")
    test.to_parquet(root / "data/processed/test.parquet", index=False)
    label = OnnxModel(onnx_models["a"]).predict(model_frame(test, spec))
    (root / "metrics/evaluate.json").write_text(json.dumps({"rows": len(test), "accuracy": float((label == test["churn"]).mean())}))
    from mlnb.stats.estimate import PerformanceEstimator          # label-free monitoring's reference, as the export stage writes it
    from mlnb.stats.multivariate import ReconstructionDrift
    (root / "models/onnx").mkdir(parents=True)
    scores = OnnxModel(onnx_models["a"]).run(model_frame(test, spec))["probabilities"][:, 1]
    PerformanceEstimator.fit(scores, test["churn"], "binary", ["No", "Yes"], "Yes", features=model_frame(test, spec)).save(root / "models/onnx")
    ReconstructionDrift.fit(model_frame(train, spec)).save(root / "models/onnx/multivariate.json")
    model_dir = signed_model_dir(onnx_models["a"], root / "served", root / "keys")
    params = serve_params(model_dir, root / "keys", root / "logs")
    params["monitor"] = {"min_rows": 300, "min_labelled": 300, "webhook": webhook, "output_dir": str(root / "monitoring")}
    params["data"] = {"positive_class": "Yes"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return model_dir


def grafted(model: Path, dest: Path, kind: str, size: int = 640) -> Path:
    """A copy of a real ONNX model with its graph changed: `slow` adds two `size`×`size` matrix products per call (about 10-40 ms
    here) that feed its probabilities; `raising` fails in ONNX Runtime (an out-of-range Gather) for any request with tenure > 0,
    which the warm-up's zero rows never trigger."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    m = onnx.load(model)
    g = m.graph
    out = next(o for o in g.output if o.name == "probabilities")
    for node in g.node:
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
    const = lambda name, arr: g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    nodes = [helper.make_node("ReduceMax", ["tenure"], ["g_t"], keepdims=0)]
    if kind == "slow":
        const("g_w", np.random.default_rng(0).standard_normal((size, size)).astype(np.float32) / size)
        const("g_shape", np.array([size, size], dtype=np.int64)); const("g_zero", np.array(0.0, dtype=np.float32))
        nodes += [helper.make_node("Expand", ["g_t", "g_shape"], ["g_x"]), helper.make_node("MatMul", ["g_x", "g_w"], ["g_y"]),
                  helper.make_node("MatMul", ["g_y", "g_w"], ["g_z"]), helper.make_node("ReduceSum", ["g_z"], ["g_s"], keepdims=0),
                  helper.make_node("Mul", ["g_s", "g_zero"], ["g_nothing"])]
    elif kind == "raising":
        const("g_table", np.array([0.0], dtype=np.float32)); const("g_limit", np.array(0.0, dtype=np.float32))
        nodes += [helper.make_node("Greater", ["g_t", "g_limit"], ["g_big"]), helper.make_node("Cast", ["g_big"], ["g_index"], to=TensorProto.INT64),
                  helper.make_node("Gather", ["g_table", "g_index"], ["g_nothing"])]
    else:
        raise ValueError(kind)
    nodes.append(helper.make_node("Add", ["probabilities_raw", "g_nothing"], [out.name]))
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, dest)
    return dest
