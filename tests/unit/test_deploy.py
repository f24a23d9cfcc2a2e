"""The monitoring deployment in deploy/: Prometheus config and alert rules (checked and unit-tested with promtool),
the Grafana dashboard's PromQL and metric names, and the provisioning files against docker-compose.yml."""
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import ROOT

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mlnb.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "mlnb.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DATASOURCE_UID = "mlnb-prometheus"

def monitor_gauge_names() -> set[str]:
    "The gauges `mlnb monitor` produces for a result with every part present (served on /metrics, pushable)."
    from mlnb.monitoring.check import gauge_families
    result = {"window_end": "2026-11-01T00:00:00+00:00", "rows": 500, "verdict": True, "alerts": ["x"],
              "drift": {"columns": [{"column": "tenure", "test": "ks", "statistic": 0.01, "threshold": 0.05, "drifted": True}],
                        "drifted_columns": ["tenure"], "dataset_drift": True},
              "prediction_drift": {"test": "ks", "statistic": 0.2, "threshold": 0.05, "drifted": False},
              "performance": {"labelled": 300, "accuracy": 0.7, "reference_accuracy": 0.8, "decayed": True},
              "estimation": {"headline": "roc_auc", "reference": 0.84, "dropped": True,
                             "metrics": {"roc_auc": {"value": 0.75, "lower": 0.73, "upper": 0.77, "realized": 0.74}},
                             "drift_impact": [{"column": "tenure", "contribution": 0.05}]},
              "multivariate": {"value": 2.1, "lower": 1.2, "upper": 1.4, "drifted": True}}
    return {f.name for f in gauge_families(result)}


MONITOR_GAUGES = monitor_gauge_names()
assert len(MONITOR_GAUGES) == 26, sorted(MONITOR_GAUGES)


EXPECTED_ALERTS = {
    "MlnbDatasetDrift", "MlnbFeatureDrift", "MlnbPredictionDrift", "MlnbAccuracyDecayed", "MlnbOnlineAccuracyBelowReference",
    "MlnbMonitorStale", "MlnbServerDown", "MlnbHighLatencyP99", "MlnbHighErrorRate", "MlnbPredictionLogDropping",
    "MlnbCanaryFallbacks", "MlnbRolloutRolledBack", "MlnbRegistryUnreachable", "MlnbAuthFailures",
    "MlnbEstimatedPerformanceDrop", "MlnbEstimatedBelowReference", "MlnbMultivariateDrift",
}

# Grafana's variables, replaced by durations so promtool can parse the expressions.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (apt-get install prometheus; `make test` installs it)")
    return path


def run_promtool(*args: str, cwd: Path = PROM) -> str:
    p = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"promtool {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout + p.stderr


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict]:
    return [r for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r]


def all_panels(panels: list[dict]):
    "Every panel, including those nested in (collapsed) rows."
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    "(panel title, expr) for every query in the dashboard."
    return [(p.get("title", ""), t["expr"]) for p in all_panels(dashboard()["panels"]) for t in p.get("targets", []) if t.get("expr")]


def without_grafana_variables(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unreplaced Grafana variable in {expr!r}"
    return expr


IDENT = re.compile(r"(?<![a-zA-Z0-9_:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def metric_names(expr: str) -> set[str]:
    "Metric names in a PromQL expression: identifiers starting with mlnb_, and `up` (string literals removed first)."
    return {n for n in IDENT.findall(STRING.sub('""', expr)) if n.startswith("mlnb_") or n == "up"}


def exposed_names() -> set[str]:
    "Series names the server exposes (ServeMetrics), the monitor gauges and `up`."
    from mlnb.serving.telemetry import ServeMetrics
    names = {"up"} | MONITOR_GAUGES
    for fam in ServeMetrics().registry.collect():
        names |= {s.name for s in fam.samples}
        # labelled metrics without children have no samples yet: add the names their samples get
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}.get(fam.type, ("", "_total", "_bucket", "_sum", "_count", "_created"))
        names |= {fam.name + s for s in suffixes}
    return names


# promtool

def test_promtool_installed():
    assert Path(promtool()).exists()


def test_prometheus_config_is_valid():
    out = run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_alert_rules_are_valid():
    out = run_promtool("check", "rules", "alerts.yml")
    assert f"{len(alert_rules())} rules found" in out


def test_alert_rules_unit_tests_pass():
    out = run_promtool("test", "rules", "alerts.test.yml")
    assert "SUCCESS" in out


def test_promtool_rejects_a_broken_expression(tmp_path):
    "The rules check below means something: promtool fails on invalid PromQL."
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(mlnb_requests_total[5m])"}]}]}))
    p = subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0


# Prometheus config and alert rules

def test_scrape_config():
    cfg = load_yaml(PROM / "prometheus.yml")
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    mlnb = jobs["mlnb"]
    assert mlnb.get("metrics_path", "/metrics") == "/metrics"
    assert mlnb.get("scrape_interval", cfg["global"]["scrape_interval"]) == "15s"
    assert [t for sc in mlnb["static_configs"] for t in sc["targets"]] == ["127.0.0.1:8080"]
    push = jobs["pushgateway"]
    assert push["honor_labels"] is True
    assert [t for sc in push["static_configs"] for t in sc["targets"]] == ["127.0.0.1:9091"]


def test_alerts_cover_the_expected_conditions():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert EXPECTED_ALERTS <= set(names), f"missing alerts: {EXPECTED_ALERTS - set(names)}"
    for r in rules:
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert "{{" in r["annotations"]["summary"] + r["annotations"]["description"], f"{r['alert']}: no templating in annotations"
    by_name = {r["alert"]: r for r in rules}
    assert by_name["MlnbAccuracyDecayed"]["labels"]["severity"] == "critical"
    assert 'outcome="server_error"' in by_name["MlnbHighErrorRate"]["expr"]


def test_server_error_outcome_is_one_the_server_reports():
    "The error-rate alert selects outcome=\"server_error\": the value the server gives 5xx responses."
    from mlnb.serving.app import _outcome
    assert _outcome(500) == _outcome(503) == "server_error"
    assert _outcome(200) == "ok" and _outcome(422) == "client_error"


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = load_yaml(PROM / "alerts.test.yml")["tests"]
    fires, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names <= fires, f"alerts never tested firing: {names - fires}"
    assert names <= silent, f"alerts never tested silent: {names - silent}"


def test_alert_metrics_are_exposed():
    exposed = exposed_names()
    used = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    assert {"mlnb_requests_total", "mlnb_request_duration_seconds_bucket", "mlnb_monitor_dataset_drift", "up"} <= used
    assert used <= exposed, f"alerts use metrics nobody exposes: {sorted(used - exposed)}"


# Metric names

def test_exposed_names_are_the_real_series_names():
    exposed = exposed_names()
    assert {"mlnb_requests_total", "mlnb_request_duration_seconds_bucket", "mlnb_request_duration_seconds_count",
            "mlnb_cache_hits_total", "mlnb_rollout_canary_ratio", "mlnb_prediction_log_dropped_total"} <= exposed
    assert "mlnb_requests" not in exposed and "mlnb_request_duration_seconds" not in exposed


def test_metric_name_extraction():
    expr = 'sum by (outcome) (rate(mlnb_requests_total{job="mlnb_x", outcome="server_error"}[5m])) / on() up{job="mlnb"}'
    assert metric_names(expr) == {"mlnb_requests_total", "up"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(mlnb_request_duration_seconds_bucket[5m])))") == {
        "mlnb_request_duration_seconds_bucket"}


# Grafana dashboard

def test_dashboard_exprs_are_valid_promql(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = [{"record": f"dashboard:expr_{i}", "expr": without_grafana_variables(e)} for i, (_, e) in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    index = "\n".join(f"dashboard:expr_{i} [{title}] {e}" for i, (title, e) in enumerate(exprs))
    p = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"invalid PromQL in the dashboard:\n{p.stdout}\n{p.stderr}\n{index}"
    assert f"{len(rules)} rules found" in p.stdout + p.stderr


def test_dashboard_metrics_are_exposed():
    exposed = exposed_names()
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs()))
    assert used <= exposed, f"dashboard uses metrics nobody exposes: {sorted(used - exposed)}"
    assert MONITOR_GAUGES <= used, f"monitor gauges missing from the dashboard: {sorted(MONITOR_GAUGES - used)}"
    assert {"mlnb_request_duration_seconds_bucket", "mlnb_inference_batch_rows_bucket", "mlnb_cache_hits_total", "mlnb_model_info",
            "mlnb_rollout_canary_ratio", "mlnb_rollout_step", "mlnb_rollout_state", "mlnb_rollout_decisions_total",
            "mlnb_canary_fallbacks_total", "mlnb_shadow_requests_total", "mlnb_prediction_log_queue_depth",
            "mlnb_prediction_log_dropped_total"} <= used


def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "mlnb" and d["schemaVersion"] == 39
    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    types = {p["type"] for p in panels}
    assert types <= {"row", "timeseries", "stat", "table"} and {"row", "timeseries", "stat", "table"} <= types
    for p in panels:
        g = p.get("gridPos")
        assert g and all(isinstance(g.get(k), int) for k in "hwxy"), f"{p.get('title')}: gridPos"
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{p.get('title')}: gridPos {g}"
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p.get("targets"), f"{p['title']}: no queries"
        ds = p.get("datasource")
        if ds is not None:
            assert ds == {"type": "prometheus", "uid": DATASOURCE_UID}, f"{p['title']}: datasource {ds}"
        for t in p["targets"]:
            tds = t.get("datasource", ds)          # a target without one inherits the panel's
            assert tds is not None and tds.get("uid") == DATASOURCE_UID, f"{p['title']}: target datasource {tds}"
            assert t.get("expr"), f"{p['title']}: empty query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refIds"


def test_dashboard_panels_do_not_overlap():
    "Panels of the dashboard (nested ones are laid out as if their row were expanded) do not overlap."
    def cells(p):
        g = p["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
    for group in [dashboard()["panels"]] + [p["panels"] for p in dashboard()["panels"] if p.get("panels")]:
        taken = set()
        for p in group:
            c = cells(p)
            assert not (taken & c), f"{p['title']} overlaps another panel"
            taken |= c


# Provisioning and docker-compose

def compose_mounts(service: dict) -> dict[str, str]:
    "Container path -> host path (resolved from deploy/) of a service's bind mounts."
    mounts = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            mounts[dst] = (DEPLOY / src).resolve()
    return mounts


def test_datasource_provisioning():
    ds = load_yaml(DATASOURCE)
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"          # Prometheus on the host's loopback (both on the host network)


def test_dashboard_provisioning_matches_compose():
    provider = load_yaml(PROVIDER)
    assert provider["apiVersion"] == 1
    [p] = provider["providers"]
    assert p["type"] == "file"
    path = p["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    mounts = compose_mounts(load_yaml(COMPOSE)["services"]["grafana"])
    assert mounts[path] == DASHBOARD.parent.resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    assert (mounts["/etc/grafana/provisioning"] / "datasources" / DATASOURCE.name).exists()


def test_compose_wires_prometheus():
    services = load_yaml(COMPOSE)["services"]
    assert {"prometheus", "pushgateway", "grafana"} <= set(services)
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    prom = services["prometheus"]
    mounts = compose_mounts(prom)
    config = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    config_dir = str(Path(config).parent)
    assert mounts[config_dir] == PROM.resolve() and (PROM / Path(config).name).exists()
    # scrape targets are 127.0.0.1: Prometheus must share the host's network
    assert prom.get("network_mode") == "host"
    # the pushgateway is reachable from the host at the scraped port
    assert any(str(p).endswith("9091:9091") for p in services["pushgateway"]["ports"])
    # Grafana reaches Prometheus where it listens: both on the host network, on loopback
    url = urlparse(load_yaml(DATASOURCE)["datasources"][0]["url"])
    assert services["grafana"].get("network_mode") == "host" and url.hostname == "127.0.0.1"
    listen = next((a.split("=", 1)[1] for a in prom["command"] if a.startswith("--web.listen-address=")), ":9090")
    assert listen == f"{url.hostname}:{url.port}"


def test_compose_listens_on_loopback_only_with_no_default_password_and_no_lifecycle_api():
    "Nothing in deploy/ answers on another interface, Grafana has no admin/admin, Prometheus no POST /-/reload or /-/quit."
    services = load_yaml(COMPOSE)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    prom = services["prometheus"]
    assert not any(a.startswith("--web.enable-lifecycle") or a.startswith("--web.enable-admin-api") for a in prom["command"]), prom["command"]
    listen = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--web.listen-address="))
    assert listen.startswith("127.0.0.1:"), listen
    grafana = services["grafana"]
    env = grafana["environment"]
    assert grafana.get("network_mode") != "host" or env.get("GF_SERVER_HTTP_ADDR") == "127.0.0.1"
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), f"a default admin password: {password}"
    assert "GF_SECURITY_ADMIN_USER" not in env or env["GF_SECURITY_ADMIN_USER"] != "admin" or password.startswith("${")
    assert str(env.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"


def test_the_scrape_config_shows_how_to_send_a_key():
    "With access control on, /metrics needs an operate key: prometheus.yml says how, and the key file stays out of git."
    text = (PROM / "prometheus.yml").read_text()
    assert "credentials_file: /etc/prometheus/mlnb-metrics.key" in text and "--role operate" in text
    assert "/deploy/prometheus/*.key" in (ROOT / ".gitignore").read_text().splitlines()
