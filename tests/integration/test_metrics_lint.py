"""A real `mlnb serve` on 127.0.0.1 with every feature that adds series on (prediction log, cache, a split rollout, access
control, the monitor's gauges from a `latest.json`), scraped and piped to `promtool check metrics`: no lint warnings
(help text, `_total` on counters, base units), and the Prometheus naming conventions promtool does not check itself."""
import json
import re
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run
from serving import Server, create_key, serve_params, signed_model_dir

RESULT = {"window_end": "2026-11-01T00:00:00+00:00", "rows": 500, "verdict": True, "alerts": ["x"],
          "drift": {"columns": [{"column": "tenure", "test": "ks", "statistic": 0.01, "threshold": 0.05, "drifted": True}],
                    "drifted_columns": ["tenure"], "dataset_drift": True},
          "prediction_drift": {"test": "ks", "statistic": 0.2, "threshold": 0.05, "drifted": False},
          "performance": {"labelled": 300, "accuracy": 0.7, "reference_accuracy": 0.8, "decayed": True},
          "versions": [{"version": "1", "rows": 500, "alerts": []}]}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (apt-get install prometheus; `make tools` installs it)")
    return path


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def exposition(request, onnx_models, records, tmp_path_factory) -> str:
    """The /metrics text of a server that has answered, cached, split, logged, refused a key and read a monitoring result;
    with one worker (and a split rollout), and with two (multiprocess mode: the series are summed over the workers' files)."""
    root = tmp_path_factory.mktemp("metrics-lint")
    keys = root / "keys"
    champion = signed_model_dir(onnx_models["a"], root / "a", keys)
    challenger = signed_model_dir(onnx_models["b"], root / "b", keys)
    work = root / "work"
    split = {"mode": "split", "challenger": str(challenger / "model.onnx"), "weights": {"champion": 0.5, "challenger": 0.5}}
    params = serve_params(champion, keys, work / "logs", cache={"enabled": True}, auth={"keys_file": str(work / "keys.yaml")},
                          rollout=split if request.param == 1 else {"mode": "off"})     # a rollout needs one worker
    params["registry"]["audit_log"] = str(work / "audit.jsonl")
    params["monitor"] = {"output_dir": str(work / "monitoring")}
    (work / "monitoring").mkdir(parents=True)
    (work / "monitoring" / "latest.json").write_text(json.dumps(RESULT))
    (work / "params.yaml").write_text(json.dumps(params))
    key = create_key(work, "scraper", "operate")
    s = Server(work, params, ("--workers", str(request.param)), api_key=key).wait_ready()
    try:
        for i in range(20):
            assert s.client.post("/invocations", json={"dataframe_records": [records[i % 5]]}, headers={"x-routing-key": str(i)}).status_code == 200
        s.client.post("/invocations", json={"dataframe_records": [{"tenure": "x"}]})
        s.new_client("not-a-key").post("/invocations", json={"dataframe_records": records[:1]})
        s.client.post("/feedback", json={"prediction_id": "nope", "label": "Yes"})
        text = ""
        for _ in range(50):       # the log writer flushes every 0.2 s
            text = s.client.get("/metrics").text
            if "mlnb_prediction_log_rows_written_total{" in text and "mlnb_monitor_drift_score" in text: break
            time.sleep(0.2)
        return text
    finally:
        s.stop()


def test_the_scrape_has_every_feature_s_series(exposition):
    names = {f.name for f in text_string_to_metric_families(exposition)}
    for name in ("mlnb_requests", "mlnb_cache_hits", "mlnb_prediction_log_rows_written", "mlnb_rollout_canary_ratio", "mlnb_auth_failures",
                 "mlnb_monitor_drift_score", "mlnb_monitor_drifted_ratio", "mlnb_model_load_seconds", "mlnb_model_info"):
        assert name in names, f"{name} not in the scrape: {sorted(names)}"


def test_promtool_check_metrics_has_no_lint_warnings(exposition, tmp_path):
    p = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), f"promtool check metrics exited {p.returncode}:\n{p.stdout}{p.stderr}"


def test_promtool_check_metrics_does_find_warnings():
    "The check above means something: a counter without `_total`, no help, milliseconds are all reported."
    bad = "# TYPE mlnb_x_milliseconds counter\nmlnb_x_milliseconds 1\n"
    p = subprocess.run([promtool(), "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and '"_total"' in out and "no help text" in out and 'base unit "seconds"' in out, out


# Conventions (https://prometheus.io/docs/practices/naming/) beyond promtool's lint
UNIT_WORDS = {"seconds", "bytes", "ratio", "rows", "info", "total", "timestamp_seconds"}


def test_names_follow_the_prometheus_naming_conventions(exposition):
    families = list(text_string_to_metric_families(exposition))
    for f in families:
        if f.name.endswith("_created"): continue        # the client library's creation timestamps of counters and histograms
        assert f.documentation and f.documentation != "Multiprocess metric", f"{f.name}: no help text"
        assert re.fullmatch(r"mlnb_[a-z][a-z0-9_]*", f.name), f.name
        assert not re.search(r"_(ms|us|sec|secs|milliseconds|microseconds|minutes|hours|kb|mb|percent|share|pct)(_|$)", f.name), \
            f"{f.name}: not a base unit (seconds, bytes, ratio for a 0-1 share)"
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f"{f.name}: a gauge named like a counter"
        if f.type == "gauge" and re.search(r"(duration|time|latency|load)", f.name):
            assert f.name.endswith("_seconds"), f"{f.name}: a time needs its unit, seconds"
        if f.type == "histogram" and "duration" in f.name:
            assert f.name.endswith("_seconds"), f.name
        if f.name.endswith("_info"):
            assert all(s.value == 1 for s in f.samples), f"{f.name}: an info metric has value 1"
    # the durations are durations (not a bare "<noun>_seconds" gauge that could be a timestamp), ratios are in 0..1
    by_name = {f.name: f for f in families}
    for name in ("mlnb_rollout_canary_ratio", "mlnb_monitor_drifted_ratio"):
        assert all(0 <= s.value <= 1 for s in by_name[name].samples), name
