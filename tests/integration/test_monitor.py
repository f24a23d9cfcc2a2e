"""`mlnb monitor` on the prediction log of a real `mlnb serve` on 127.0.0.1: synthetic traffic with known drift and
feedback labels, the result JSON, the feature history, and alerts posted to a local webhook receiver."""
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pandas as pd
import pytest
import yaml

from conftest import ROOT, run
from mlnb.data.ingest import synthesize
from mlnb.features.spec import model_frame
from serving import Server, workspace


class Receiver:
    "A webhook receiver on 127.0.0.1 that keeps what it is sent."
    def __init__(self):
        self.received, self.pushed = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204); self.end_headers()

            def do_PUT(self):                                # a Pushgateway: PUT /metrics/job/<job>, the text format
                outer.pushed.append((self.path, self.rfile.read(int(self.headers["Content-Length"])).decode()))
                self.send_response(200); self.end_headers()

            def log_message(self, *args): pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self): self.httpd.shutdown(); self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def serve_traffic(root, spec, frames: list[pd.DataFrame], label_share: float = 1.0):
    "Send each row of the frames as one request to a real server, and feedback with the true churn for a share of them."
    s = Server(root / "srv", yaml.safe_load((root / "params.yaml").read_text())).wait_ready()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for df in frames:
                records = json.loads(model_frame(df, spec).to_json(orient="records"))
                ids = [c.post("/invocations", json={"dataframe_records": [r]}).json()["predictions"][0]["prediction_id"] for r in records]
                labelled = int(len(ids) * label_share)
                for start in range(0, labelled, 200):
                    c.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": a} for i, a in
                                                           zip(ids[start:start + 200], df["churn"].iloc[start:start + 200])]}).raise_for_status()
    finally:
        assert s.stop() in (0, -15, 143)


def monitor(root, *args, check=True):
    return run(["mlnb", "monitor", "--params", "params.yaml", "--model", str(root / "served/model.onnx"), *args], root, check=check)


def test_iid_traffic_raises_no_alert(onnx_models, spec, receiver, tmp_path):
    workspace(tmp_path, spec, onnx_models, receiver.url)
    serve_traffic(tmp_path, spec, [synthesize(600, seed=3)])
    out = monitor(tmp_path, "--fail-on-alert", "--push", receiver.url.removesuffix("/hook"))
    result = json.loads((tmp_path / "monitoring/latest.json").read_text())
    assert result["rows"] == 600 and result["verdict"] and result["alerts"] == [], result["alerts"]
    ((path, text),) = receiver.pushed
    assert path == "/metrics/job/mlnb_monitor" and "mlnb_monitor_dataset_drift 0.0" in text and "mlnb_monitor_window_rows 600.0" in text
    assert text.count("mlnb_monitor_feature_drifted{") == 19
    assert result["drift"]["dataset_drift"] is False and result["prediction_drift"]["drifted"] is False
    assert result["performance"]["labelled"] == 600 and not result["performance"]["decayed"]
    assert "600 rows" in out.stdout and receiver.received == []
    history = pd.read_parquet(tmp_path / "monitoring/feature_history.parquet")
    assert len(history) == 19 and set(history["column"]) == set(spec.inputs)


def test_drifted_traffic_with_decayed_accuracy_is_flagged_and_alerted(onnx_models, spec, receiver, tmp_path):
    workspace(tmp_path, spec, onnx_models, receiver.url)
    shifted = synthesize(800, seed=4, shift={"tenure": 0.7, "monthly_charges": 0.7}, shares={"contract": {"Month-to-month": 0.3}},
                         churn_offset=2.5)                  # the same customers churn far more: the model's accuracy falls
    serve_traffic(tmp_path, spec, [shifted])
    failed = monitor(tmp_path, "--fail-on-alert", check=False)
    assert failed.returncode == 2 and "ALERT" in failed.stdout
    result = json.loads((tmp_path / "monitoring/latest.json").read_text())
    assert {"tenure", "monthly_charges", "contract"} <= set(result["drift"]["drifted_columns"])
    assert result["prediction_drift"]["drifted"] and result["performance"]["decayed"]
    assert any(a.startswith("accuracy decay") for a in result["alerts"]) and any(a.startswith("prediction drift") for a in result["alerts"])
    (alert,) = receiver.received
    assert alert["alerts"] == result["alerts"] and alert["text"].startswith("mlnb monitor:") and alert["rows"] == 800
    (tmp_path / "nbs/stages").mkdir(parents=True)
    shutil.copy(ROOT / "nbs/stages/07_monitor.ipynb", tmp_path / "nbs/stages")
    reported = monitor(tmp_path, "--report")                                        # a second window appends to the history
    history = pd.read_parquet(tmp_path / "monitoring/feature_history.parquet")
    assert len(history) == 38 and history.loc[history["column"] == "tenure", "drifted"].all()
    html = (tmp_path / "monitoring/07_monitor.html").read_text()
    assert "07_monitor.ipynb" in reported.stdout and html.count("image/png") >= 5 and "ALERT feature drift" in html
    # estimated without labels, realized beside it: here the same customers churn more (a concept shift), which only the labels show
    e = result["estimation"]
    assert e["realized"]["rows"] == 800 and {"roc_auc", "accuracy"} <= set(e["metrics"]) and e["drift_impact"]
    assert "Performance without labels" in html and "drift impact" in html.lower()
    assert len(list((tmp_path / "monitoring/windows").glob("*.json"))) >= 1


def test_a_window_without_enough_rows_gets_no_verdict_and_bad_settings_are_named(onnx_models, spec, receiver, tmp_path):
    workspace(tmp_path, spec, onnx_models, receiver.url)
    serve_traffic(tmp_path, spec, [synthesize(50, seed=5)])
    out = monitor(tmp_path)
    assert "fewer than 300: no verdict" in out.stdout
    assert json.loads((tmp_path / "monitoring/latest.json").read_text())["drift"] is None
    (tmp_path / "features/reference_profile.json").unlink()
    missing = monitor(tmp_path, check=False)
    assert missing.returncode == 1 and "no reference profile" in missing.stderr
