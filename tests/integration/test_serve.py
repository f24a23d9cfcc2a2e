"""`mlnb serve` as a real process on 127.0.0.1: both protocols (tritonclient included), input validation, cache,
prediction log and feedback, metrics, access logs, and a tampered model refused at start."""
import http.client
import json
import math
import signal
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from mlnb.model.onnx import OnnxModel
from mlnb.predlog.log import join_feedback, log_files, read_log
from serving import Server, metric, metrics, serve_params


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    directory, keys = model_dir
    work = tmp_path_factory.mktemp("server")
    s = Server(work, serve_params(directory, keys, work / "logs")).wait_ready()
    yield s
    s.stop()


def expected(model_dir, records):
    out = OnnxModel(model_dir[0] / "model.onnx").run(pd.DataFrame(records))
    return out["label"], out["probabilities"]


def v2_inputs(records, binary=False):
    import tritonclient.http as triton
    inputs = []
    for name in records[0]:
        values = [r[name] for r in records]
        if isinstance(values[0], str):
            arr, datatype = np.array(values, dtype=object).reshape(-1, 1), "BYTES"
        else:
            arr, datatype = np.array(values, dtype=np.float32).reshape(-1, 1), "FP32"
        tensor = triton.InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_health_server_and_model_metadata(server):
    c = server.client
    assert c.get("/v2/health/live").json() == {"live": True} and c.get("/v2/health/ready").status_code == 200
    assert c.get("/ping").status_code == 200 and "binary_tensor_data" in c.get("/v2").json()["extensions"]
    meta = c.get("/v2/models/churn").json()
    assert meta["name"] == "churn" and meta["platform"] == "onnxruntime_onnx" and len(meta["inputs"]) == 19
    assert all(i["shape"] == [-1, 1] for i in meta["inputs"])
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["contract"] == "BYTES"
    version = meta["versions"][0]
    assert c.get(f"/v2/models/churn/versions/{version}/ready").json()["ready"] is True
    assert c.get("/v2/models/other").status_code == 404 and "is not served here" in c.get("/v2/models/other").json()["error"]
    assert c.get("/v2/models/churn/versions/999").status_code == 404


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_gets_the_models_answers(server, model_dir, records, binary):
    import tritonclient.http as triton
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("churn")
    outputs = None if binary else [triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("churn", v2_inputs(records[:10], binary), outputs=outputs, request_id="triton-1")
    labels, proba = expected(model_dir, records[:10])
    got_labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").ravel()]
    assert got_labels == list(labels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "triton-1" and response["model_name"] == "churn" and len(set(response["parameters"]["prediction_ids"])) == 10


def test_v2_json_body_nested_and_flat(server, model_dir, records):
    rows = records[:3]
    def body(nested):
        return {"id": "r-7", "inputs": [{"name": n, "shape": [3, 1] if nested else [3], "datatype": "BYTES" if isinstance(rows[0][n], str) else "FP64",
                                        "data": [[r[n]] for r in rows] if nested else [r[n] for r in rows]} for n in rows[0]]}
    answers = [server.client.post("/v2/models/churn/infer", json=body(nested)) for nested in (True, False)]
    labels, proba = expected(model_dir, rows)
    for r in answers:
        assert r.status_code == 200 and r.json()["id"] == "r-7" and r.headers["x-request-id"] == "r-7"
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["label"]["data"] == list(labels) and out["probabilities"]["shape"] == [3, 2]
        np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(3, 2), proba, atol=1e-6)


def test_mlflow_formats_give_the_same_answers(server, model_dir, records):
    rows = records[:4]
    bodies = [{"dataframe_split": {"columns": list(rows[0]), "data": [list(r.values()) for r in rows]}}, {"dataframe_records": rows},
              {"instances": rows}, {"inputs": {k: [r[k] for r in rows] for k in rows[0]}}]
    labels, proba = expected(model_dir, rows)
    for body in bodies:
        r = server.client.post("/invocations", json=body)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["label"] for p in preds] == list(labels) and r.json()["model_name"] == "churn"
        np.testing.assert_allclose([[p["probabilities"]["No"], p["probabilities"]["Yes"]] for p in preds], proba, atol=1e-6)
        assert len({p["prediction_id"] for p in preds}) == 4


def _v2_binary_nan(records, column, value):
    "A V2 request whose `column` is sent as binary FP32 holding `value` (JSON cannot carry NaN or inf)."
    row = records[0]
    inputs = [{"name": n, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [v]} for n, v in row.items() if n != column]
    inputs.append({"name": column, "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}})
    header = json.dumps({"inputs": inputs}).encode()
    return header + np.array([value], dtype="<f4").tobytes(), {"Inference-Header-Content-Length": str(len(header))}


BAD_MLFLOW = [
    ("missing column", lambda r: {"dataframe_records": [{k: v for k, v in r[0].items() if k != "tenure"}]}, 400, "missing input(s) ['tenure']"),
    ("extra column", lambda r: {"dataframe_records": [{**r[0], "customer_id": "x"}]}, 400, "unknown input(s) ['customer_id']"),
    ("wrong type", lambda r: {"dataframe_records": [{**r[0], "tenure": "ten"}]}, 400, "'tenure': row 0 value 'ten' is not a number"),
    ("category as number", lambda r: {"dataframe_records": [{**r[0], "contract": 2}]}, 400, "'contract': row 0 value 2 is not a string"),
    ("null not allowed", lambda r: {"dataframe_records": [{**r[0], "monthly_charges": None}]}, 400, "may not be missing"),
    ("empty batch", lambda r: {"dataframe_records": []}, 400, "empty batch"),
    ("over row limit", lambda r: {"dataframe_records": r[:1] * 51}, 413, "batch of 51 rows is over the limit of 50"),
    ("no format key", lambda r: {"rows": r[:1]}, 400, "exactly one of"),
]


@pytest.mark.parametrize("name, make, status, message", BAD_MLFLOW, ids=[b[0] for b in BAD_MLFLOW])
def test_bad_mlflow_input_gets_a_4xx_naming_the_problem(server, records, name, make, status, message):
    r = server.client.post("/invocations", json=make(records))
    assert r.status_code == status and message in r.json()["error"], r.text
    assert server.client.post("/invocations", json={"dataframe_records": records[:1]}).status_code == 200      # still serving


@pytest.mark.parametrize("column, value, message", [("monthly_charges", math.nan, "must be a finite number"),
                                                    ("tenure", math.inf, "must be a finite number")], ids=["nan", "inf"])
def test_nan_and_inf_are_refused_where_the_schema_forbids_them(server, records, column, value, message):
    body, headers = _v2_binary_nan(records, column, value)
    r = server.client.post("/v2/models/churn/infer", content=body, headers=headers)
    assert r.status_code == 400 and column in r.json()["error"] and message in r.json()["error"], r.text


def test_malformed_oversized_and_mistyped_bodies(server, records):
    c = server.client
    r = c.post("/invocations", content=b'{"dataframe_records": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = c.post("/invocations", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 65536 bytes" in r.json()["error"]
    r = c.post("/invocations", content=b"a,b\n1,2", headers={"content-type": "text/csv"})
    assert r.status_code == 415
    r = c.post("/v2/models/churn/infer", json={"inputs": [{"name": "tenure", "shape": [2], "datatype": "FP32", "data": [1]}]})
    assert r.status_code == 400 and "shape [2] needs 2 value(s)" in r.json()["error"]
    r = c.post("/v2/models/churn/infer", json={"inputs": [{"name": "contract", "shape": [1], "datatype": "FP32", "data": [1]}]})
    assert r.status_code == 400 and "send BYTES" in r.json()["error"]
    assert c.get("/v2/health/ready").status_code == 200
    assert metric(server, "mlnb_requests_total", outcome="server_error") == 0


@pytest.mark.parametrize("path, body, message", [
    ("/v2/models/churn/infer", {"inputs": [{"name": [1], "shape": [1, 1], "datatype": "FP32", "data": [1]}]}, "inputs[0]: 'name' must be a string"),
    ("/v2/models/churn/infer", {"inputs": [{"name": "tenure", "shape": [1], "datatype": ["FP32"], "data": [1]}]}, "'datatype' must be a string"),
    ("/invocations", {"dataframe_split": {"columns": [[1]], "data": [[1]]}}, "'columns' must be a list of column names"),
    ("/invocations", {"dataframe_split": {"columns": ["tenure", "tenure"], "data": [[1, 2]]}}, "a column is named twice"),
], ids=["v2-name-not-a-string", "v2-datatype-not-a-string", "split-column-not-a-string", "split-column-twice"])
def test_fields_of_the_wrong_json_type_are_a_400_not_a_500(server, path, body, message):
    r = server.client.post(path, json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert metric(server, "mlnb_requests_total", outcome="server_error") == 0


POST_ROUTES = ["/invocations", "/v2/models/churn/infer", "/feedback", "/admin/rollout/start"]


def raw_post(server, path: str, headers: dict[str, str], body: bytes = b"{}") -> tuple[int, str, dict]:
    "A POST sent as is over a socket (httpx refuses to send a malformed header): the status, content type and JSON body."
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("POST", path)
        for name, value in headers.items(): conn.putheader(name, value.encode("latin-1"))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.getheader("content-type"), json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "+2", "\xb2", "99999999999999999999999"], ids=["word", "negative", "float", "plus", "superscript", "overflow"])
def test_a_bad_content_length_is_a_json_400_naming_the_header(server, path, length):
    status, content_type, body = raw_post(server, path, {"Content-Type": "application/json", "Content-Length": length})
    assert (status, content_type) == (400, "application/json") and "Content-Length" in body["error"], body
    assert server.client.get("/v2/health/ready").status_code == 200
    assert metric(server, "mlnb_requests_total", outcome="server_error") == 0

@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_rollout_body_has_the_inference_body_limit(server, chunked):
    body = b'{"reason": "' + b"x" * 70000 + b'"}'
    r = server.client.post("/admin/rollout/start", content=iter([body]) if chunked else body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 65536 bytes" in r.json()["error"], r.text
    assert server.client.get("/admin/rollout").status_code == 200

@pytest.mark.parametrize("path", [*POST_ROUTES, "/admin/rollout/abort", "/admin/reload"])
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "application/octet-stream"])
def test_post_routes_refuse_a_body_that_is_not_json(server, records, path, content_type):
    "What a web page may POST cross-origin without asking (a CORS simple request) is refused before it does anything."
    r = server.client.post(path, content=json.dumps({"dataframe_records": records[:1]}), headers={"content-type": content_type})
    assert r.status_code == 415 and "send application/json" in r.json()["error"], r.text


@pytest.mark.parametrize("path", ["/feedback", "/admin/rollout/start"])
def test_a_state_changing_body_without_a_content_type_is_refused(server, path):
    r = server.client.post(path, content=b'{"feedback": [{"prediction_id": "x", "actual": "Yes"}]}')
    assert "content-type" not in r.request.headers and r.status_code == 415 and "send application/json" in r.json()["error"], r.text


def test_json_with_a_charset_and_v2_binary_as_octet_stream_are_served(server, records):
    c = server.client
    r = c.post("/invocations", content=json.dumps({"dataframe_records": records[:1]}), headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    ids = [p["prediction_id"] for p in r.json()["predictions"]]
    r = c.post("/feedback", content=json.dumps({"feedback": [{"prediction_id": ids[0], "actual": "Yes"}]}), headers={"content-type": "Application/JSON;charset=utf-8"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    body, headers = _v2_binary_nan(records, "tenure", 3.0)
    r = c.post("/v2/models/churn/infer", content=body, headers={**headers, "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text


def test_the_openapi_document_lists_the_415_of_every_post_route(server):
    paths = server.client.get("/openapi.json").json()["paths"]
    posts = [p for p, ops in paths.items() if "post" in ops]
    assert "/feedback" in posts and "/admin/rollout/{action}" in posts
    assert [p for p in posts if "415" not in paths[p]["post"]["responses"]] == []

def test_unknown_category_is_served_and_counted(server, records):
    before = metric(server, "mlnb_unknown_categories_total", column="payment_method")
    r = server.client.post("/invocations", json={"dataframe_records": [{**records[0], "payment_method": "Crypto"}]})
    assert r.status_code == 200
    assert metric(server, "mlnb_unknown_categories_total", column="payment_method") == before + 1


def test_cache_hit_and_miss(server, records):
    row = {**records[5], "monthly_charges": 77.77}
    hits, misses = metric(server, "mlnb_cache_hits_total"), metric(server, "mlnb_cache_misses_total")
    first = server.client.post("/invocations", json={"dataframe_records": [row]}).json()["predictions"][0]
    assert metric(server, "mlnb_cache_misses_total") == misses + 1 and metric(server, "mlnb_cache_hits_total") == hits
    reordered = dict(reversed(list(row.items())))                    # same row, other key order: same cache entry
    second = server.client.post("/invocations", json={"dataframe_records": [reordered]}).json()["predictions"][0]
    assert metric(server, "mlnb_cache_hits_total") == hits + 1
    assert second["probabilities"] == first["probabilities"] and second["prediction_id"] != first["prediction_id"]
    assert metric(server, "mlnb_predictions_total", outcome="cache") >= 1
    assert server.client.get("/admin/model").json()["cache"]["hits"] >= 1


def test_metrics_have_conventional_names(server, records):
    server.client.post("/invocations", json={"dataframe_records": records[:2]})
    server.client.post("/invocations", json={"dataframe_records": []})
    m = metrics(server)
    names = {n for n, _ in m}
    for name in ["mlnb_requests_total", "mlnb_predictions_total", "mlnb_request_duration_seconds_bucket", "mlnb_inference_duration_seconds_sum",
                 "mlnb_inference_batch_rows_bucket", "mlnb_cache_hits_total", "mlnb_cache_misses_total", "mlnb_prediction_log_queue_depth",
                 "mlnb_model_load_seconds", "mlnb_model_info"]:
        assert name in names, name
    assert metric(server, "mlnb_requests_total", protocol="mlflow", outcome="ok") >= 1
    assert metric(server, "mlnb_requests_total", protocol="mlflow", outcome="client_error") >= 1
    assert 0 < metric(server, "mlnb_model_load_seconds") < 60 and metric(server, "mlnb_model_info") == 1


def test_access_log_lines_are_json_with_the_request_id(server, records):
    server.client.post("/invocations", json={"dataframe_records": records[:1]}, headers={"X-Request-ID": "trace-me-42"})
    deadline = time.time() + 5
    while time.time() < deadline:
        lines = [json.loads(l) for l in server.stderr().splitlines() if l.startswith("{")]
        mine = [l for l in lines if l.get("request_id") == "trace-me-42"]
        if mine: break
        time.sleep(0.1)
    assert mine and mine[0]["status"] == 200 and mine[0]["path"] == "/invocations" and mine[0]["model"] == "churn"
    assert any(l.get("logger") == "mlnb.serve" and "serving churn" in l.get("message", "") for l in lines)


def _burst(url, records, n, threads=8):
    "n single-row requests from `threads` threads; the prediction ids and the inputs they were for."
    out, errors = [], []
    def worker(k):
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(k, n, threads):
                row = {**records[i % len(records)], "tenure": float(i % 70)}
                r = c.post("/invocations", json={"dataframe_records": [row]})
                if r.status_code != 200: errors.append(r.text)
                else: out.append((r.json()["predictions"][0]["prediction_id"], row["tenure"]))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors, errors[:3]
    return dict(out)


def test_prediction_log_after_a_burst_and_after_sigterm(model_dir, records, tmp_path):
    directory, keys = model_dir
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs", prediction_log={"flush_seconds": 0.3})).wait_ready()
    try:
        first = _burst(s.url, records, 300)
        time.sleep(1.0)                                               # a few flush intervals
        log = read_log(tmp_path / "logs/predictions")
        assert set(first) <= set(log["prediction_id"])
        row = log.set_index("prediction_id").loc[next(iter(first))]
        assert row["model_name"] == "churn" and row["variant"] == "champion" and row["latency_ms"] > 0 and row["input.tenure"] == first[next(iter(first))]
        assert {"input.contract", "label", "proba.Yes", "timestamp", "model_version"} <= set(log.columns)
        second = _burst(s.url, records, 200)
    finally:
        code = s.stop()                                               # SIGTERM straight after the burst
    assert code in (0, -signal.SIGTERM), s.stderr()[-2000:]      # uvicorn re-raises SIGTERM after its graceful shutdown
    log = read_log(tmp_path / "logs/predictions")
    assert set(first) | set(second) <= set(log["prediction_id"]) and log["prediction_id"].is_unique
    assert len(log) == 500


def test_sigterm_flushes_what_the_writer_has_not_written_yet(model_dir, records, tmp_path):
    directory, keys = model_dir
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs", prediction_log={"flush_seconds": 60})).wait_ready()
    try:
        ids = _burst(s.url, records, 100, threads=4)
        assert not list((tmp_path / "logs/predictions").glob("date=*/*.parquet"))   # nothing written yet: the next flush is a minute away
    finally:
        assert s.stop() in (0, -signal.SIGTERM)
    assert set(read_log(tmp_path / "logs/predictions")["prediction_id"]) == set(ids)


def test_feedback_is_joined_to_predictions_and_unknown_ids_are_reported(model_dir, records, tmp_path):
    directory, keys = model_dir
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs")).wait_ready()
    try:
        preds = s.client.post("/invocations", json={"dataframe_records": records[:6]}).json()["predictions"]
        ids = [p["prediction_id"] for p in preds]
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": ids[0], "actual": "Yes"}, {"prediction_id": ids[1], "actual": "No"},
                                                          {"prediction_id": "no-such-id", "actual": "Yes"}]})
        assert r.status_code == 200 and r.json() == {"accepted": 2, "unknown_ids": ["no-such-id"]}
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": "nope", "actual": "Yes"}]})
        assert r.status_code == 404 and r.json()["unknown_ids"] == ["nope"]
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": ids[2], "actual": "Maybe"}]})
        assert r.status_code == 400 and "is not one of the model's classes ['No', 'Yes']" in r.json()["error"]
        assert s.client.post("/feedback", json={"feedback": [{"prediction_id": ids[2]}]}).status_code == 400
    finally:
        s.stop()
    s2 = Server(tmp_path / "again", serve_params(directory, keys, tmp_path / "logs")).wait_ready()   # after a restart: ids found on disk
    try:
        r = s2.client.post("/feedback", json={"feedback": [{"prediction_id": ids[3], "actual": "No"}]})
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert metric(s2, "mlnb_feedback_total", outcome="accepted") == 1
    finally:
        s2.stop()
    joined = join_feedback(read_log(tmp_path / "logs/predictions"), read_log(tmp_path / "logs/feedback")).set_index("prediction_id")
    assert joined.loc[ids[0], "actual"] == "Yes" and joined.loc[ids[1], "actual"] == "No" and joined.loc[ids[3], "actual"] == "No"
    assert joined.loc[[ids[2], ids[4], ids[5]], "actual"].isna().all()


def test_tampered_model_is_refused_at_start(model_dir, tmp_path):
    directory, keys = model_dir
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in directory.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    s = Server(tmp_path / "work", serve_params(tampered, keys, tmp_path / "logs"))
    assert s.proc.wait(120) == 1
    assert "signature verification failed: the file was modified after signing" in s.stderr()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{s.url}/v2/health/live", timeout=2)


def test_unsigned_model_is_refused(model_dir, tmp_path):
    directory, keys = model_dir
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    (unsigned / "model.onnx").write_bytes((directory / "model.onnx").read_bytes())
    s = Server(tmp_path / "work", serve_params(unsigned, keys, tmp_path / "logs"))
    assert s.proc.wait(120) == 1 and "no signature" in s.stderr()


def test_two_workers_share_the_port_and_sum_their_metrics(model_dir, records, tmp_path):
    directory, keys = model_dir
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs"), ("--workers", "2")).wait_ready()
    try:
        ids = []
        for i in range(40):
            with httpx.Client(base_url=s.url, timeout=30) as c:          # a new connection each time: the kernel spreads them
                ids += [p["prediction_id"] for p in c.post("/invocations", json={"dataframe_records": [records[i]]}).json()["predictions"]]
        assert metric(s, "mlnb_requests_total", outcome="ok") == 40        # counted across the workers
        assert sum(1 for l in s.stderr().splitlines() if "serving churn" in l) >= 2
    finally:
        s.stop()
    assert set(read_log(tmp_path / "logs/predictions")["prediction_id"]) == set(ids)
    writers = {f.name.split("-")[2] for f in log_files(tmp_path / "logs/predictions")}
    assert len(writers) == 2                                               # both worker processes answered (a file name holds its pid)


def test_tracing_emits_a_span_per_request(model_dir, records, tmp_path):
    directory, keys = model_dir
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs", tracing=True)).wait_ready()
    try:
        assert s.client.post("/invocations", json={"dataframe_records": records[:1]}, headers={"X-Request-ID": "traced-1"}).status_code == 200
    finally:
        s.stop()
    err = s.stderr()
    assert '"trace_id"' in err and '"http.method": "POST"' in err and "/invocations" in err
