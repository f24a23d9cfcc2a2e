"""What access control costs a request: single-row `/invocations` requests driven straight into the ASGI app (no network, so the
difference is not lost in the noise of sockets), with `serve.auth` off (the baseline) and on, in alternating rounds in one process;
and `KeyAuth.authorize` alone with 1, 10 and 100 stored keys.

The model is a small logistic regression (two columns), the cache is off, so each request runs the whole path: parse, validate,
micro-batcher, ONNX Runtime, response, prediction log. Access logs are on in both.

Usage: python benchmarks/auth_bench.py [--requests 5000] [--rounds 5]
Goal: auth adds well under 5% to a request.
"""
from __future__ import annotations
import argparse, asyncio, io, sys, tempfile, time, timeit
from contextlib import redirect_stderr
from pathlib import Path

import orjson

from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)


def toy_model(d: Path) -> Path:
    "A signed two-column logistic regression, as in the serving app notebook's example."
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from mlnb.model.signing import ensure_signing_key, sign_model
    df = pd.DataFrame({"tenure": [1.0, 5, 20, 40, 2, 60], "contract": ["Month-to-month", "Month-to-month", "One year", "Two year", "Month-to-month", "Two year"]})
    pipe = make_pipeline(ColumnTransformer([("num", "passthrough", ["tenure"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["contract"])]),
                         LogisticRegression()).fit(df, ["Yes", "Yes", "No", "No", "Yes", "No"])
    proto = convert_sklearn(pipe, initial_types=[("tenure", FloatTensorType([None, 1])), ("contract", StringTensorType([None, 1]))],
                            options={id(pipe.steps[-1][1]): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    (d / "toy.onnx").write_bytes(proto.SerializeToString())
    ensure_signing_key(d / "k.key", d / "k.pub"); sign_model(d / "toy.onnx", d / "k.key")
    return d / "toy.onnx"


async def drive(app, n: int, headers: list) -> float:
    "Seconds per request for `n` sequential requests into the ASGI app."
    body = orjson.dumps({"dataframe_records": [{"tenure": 3, "contract": "Month-to-month"}]})
    scope = {"type": "http", "method": "POST", "path": "/invocations", "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]}
    message = {"type": "http.request", "body": body, "more_body": False}
    async def receive(): return message
    statuses = []
    async def send(m):
        if m["type"] == "http.response.start": statuses.append(m["status"])
    started = time.perf_counter()
    for _ in range(n): await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - started
    assert set(statuses) == {200}, set(statuses)
    return elapsed / n


async def compare(cfg_off, cfg_on, key: str, n: int, rounds: int) -> dict:
    from mlnb.serving.app import build_server, create_app
    servers = {"off": build_server(cfg_off), "on": build_server(cfg_on)}
    apps = {name: create_app(s) for name, s in servers.items()}
    for s in servers.values(): await s.start()
    headers = {"off": [], "on": [(b"authorization", f"Bearer {key}".encode())]}
    times = {"off": [], "on": []}
    try:
        for name in apps: await drive(apps[name], n // 5, headers[name])              # warm up
        for _ in range(rounds):
            for name in ("off", "on"): times[name].append(await drive(apps[name], n, headers[name]))
    finally:
        for s in servers.values(): await s.stop()
    return {name: min(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import os
    if hasattr(os, "sched_setaffinity"): os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from mlnb.core.config import config_from_dict
    from mlnb.serving.auth import KeyAuth, create_key
    d = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    model = toy_model(d)
    keys = [create_key(d / "keys.yaml", f"client-{i}", "predict") for i in range(10)]
    serve = {"model": str(model), "reload_poll_seconds": 0, "cache": {"enabled": False},
             "prediction_log": {"dir": str(d / "p"), "feedback_dir": str(d / "f")}}
    cfg_off = config_from_dict({"registry": {"public_key": str(d / "k.pub")}, "serve": serve})
    cfg_on = config_from_dict({"registry": {"public_key": str(d / "k.pub")}, "serve": {**serve, "auth": {"keys_file": str(d / "keys.yaml")}}})
    with redirect_stderr(io.StringIO()):                # the access log lines
        per_request = asyncio.run(compare(cfg_off, cfg_on, keys[-1], args.requests, args.rounds))
    off, on = per_request["off"], per_request["on"]
    print(f"single-row /invocations, in process, one core, best of {args.rounds} rounds of {args.requests}:")
    print(f"  auth off (baseline) {off * 1e6:8.1f} µs/request")
    print(f"  auth on, 10 keys    {on * 1e6:8.1f} µs/request   ratio {on / off:.3f}  ({(on - off) * 1e6:+.1f} µs)")
    table = [{"measure": "single-row /invocations, auth off (baseline)", "µs": off * 1e6, "vs a request without auth": 1.0},
             {"measure": "single-row /invocations, auth on, 10 keys", "µs": on * 1e6, "vs a request without auth": on / off}]
    print("KeyAuth.authorize alone (header lookup, SHA-256, constant-time comparison with every stored key):")
    for count in (1, 10, 100):
        path = d / f"keys-{count}.yaml"
        made = [create_key(path, f"k{i}", "predict") for i in range(count)]
        auth = KeyAuth(path)
        headers = {"authorization": f"Bearer {made[-1]}"}
        n = 100_000
        best = min(timeit.repeat(lambda: auth.authorize(headers, "POST", "/invocations", "predict"), number=n, repeat=5)) / n
        print(f"  {count:>3} key(s) {best * 1e6:6.2f} µs   ({best / off:.2%} of a request without auth)")
        table.append({"measure": f"KeyAuth.authorize alone, {count} key(s)", "µs": best * 1e6, "vs a request without auth": best / off})
    write_results("auth", table, [f"in process, one core, best of {args.rounds} alternating rounds of {args.requests} requests; "
                                  f"auth on adds {(on - off) * 1e6:+.1f} µs, ratio {on / off:.3f} (goal: well under 5%)",
                                  "KeyAuth.authorize: header lookup, SHA-256, constant-time comparison with every stored key; best of 5 x 100,000 calls"],
                  {"requests": args.requests, "rounds": args.rounds}, libraries=("starlette",), floatfmt=",.3f")


if __name__ == "__main__":
    sys.exit(main())
