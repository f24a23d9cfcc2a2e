"""What one request costs the server in CPU, measured in-process: this tree against an earlier revision, access control off and on.

`serve_bench.py` measures through sockets, wrk and the kernel, and on a shared machine its throughput pairs move by ten
percent and more from one run to the next, as the host's other work comes and goes. This benchmark asks only what the code
costs: the ASGI app `mlnb serve` builds (`build_server` + `create_app`, everything on: validation, cache, micro-batching,
prediction log, metrics, access log) is called directly, one request after another, each a unique single row of the test
split as serve_bench sends them (with a bearer predict key when access control is on), and the CPU time is read from the
process (every thread: the event loop's and the log writer's). Each code runs in fresh processes in alternating rounds, and
the medians count. No socket, no HTTP parser: the figures are the application's share of a request, not the whole of it.

Figures go to benchmarks/results/request_cost.{json,md}, which the docs include.
Usage: python benchmarks/request_cost_bench.py [--baseline 4972a6c] [--rounds 5] [--requests 6000]   (after `make run`)
"""
from __future__ import annotations
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_results  # noqa: E402


def child(workdir: Path, auth: bool, n: int) -> dict:
    "In a process whose PYTHONPATH picks the code: `n` requests through the app; CPU per request."
    import asyncio, time
    import uvloop
    from serve_bench import bodies, keys_file
    run = Path(tempfile.mkdtemp(dir=workdir))
    key = keys_file(run / "keys.yaml")
    serve = {"model": str(workdir / "model.onnx"), "reload_poll_seconds": 0,
             "prediction_log": {"dir": str(run / "predictions"), "feedback_dir": str(run / "feedback")}}
    if auth: serve["auth"] = {"keys_file": str(run / "keys.yaml")}
    (run / "params.yaml").write_text(json.dumps({"registry": {"public_key": str(workdir / "k.pub")}, "serve": serve}))
    os.chdir(run)
    from mlnb.core.config import load_config
    from mlnb.serving.app import build_server, create_app
    server = build_server(load_config(run / "params.yaml"))
    app = create_app(server)
    rows = pd.read_parquet(ROOT / "data/processed/test.parquet").drop(columns=["churn"]).to_dict("records")
    warm = 2000
    payloads = bodies(rows, warm + n, 0)
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               *([(b"authorization", f"Bearer {key}".encode())] if auth else [])]
    statuses: list[int] = []

    async def one(body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
                 "headers": [*headers, (b"content-length", str(len(body)).encode())], "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000)}
        sent = False
        async def receive():
            nonlocal sent
            if sent: await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        async def send(message):
            if message["type"] == "http.response.start": statuses.append(message["status"])
        await app(scope, receive, send)
        await asyncio.sleep(0)                  # a turn of the loop between requests, as one client at a time gives

    async def main() -> dict:
        await server.start()
        for body in payloads[:warm]: await one(body)
        cpu, wall = time.process_time(), time.perf_counter()
        for body in payloads[warm:]: await one(body)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await server.stop()
        return {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}

    out = uvloop.run(main())
    assert set(statuses) == {200}, f"statuses {set(statuses)}"
    shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="4972a6c", metavar="REV")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--child", nargs=3, metavar=("WORKDIR", "AUTH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1] == "auth", int(args.child[2])))); return
    onnx_path = ROOT / "models/onnx/model.onnx"
    if not onnx_path.exists(): raise SystemExit("models/onnx/model.onnx not found: run `make run` first")
    from mlnb.model.signing import ensure_signing_key, sign_model
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mlnb-cost-") as tmp:
        tmp = Path(tmp)
        shutil.copy(onnx_path, tmp / "model.onnx")
        ensure_signing_key(tmp / "k.key", tmp / "k.pub"); sign_model(tmp / "model.onnx", tmp / "k.key")
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base), args.baseline], check=True)
        try:
            codes = {"baseline": str(base), "current": str(ROOT)}
            for r in range(args.rounds):
                for auth in ("off", "on"):
                    for name in (list(codes) if (r + (auth == "on")) % 2 == 0 else list(codes)[::-1]):
                        env = {**os.environ, "PYTHONPATH": codes[name]}
                        out = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", str(tmp), "auth" if auth == "on" else "off",
                                              str(args.requests)], env=env, capture_output=True, text=True, check=True).stdout
                        result = json.loads(out.strip().splitlines()[-1])
                        runs.setdefault((name, auth), []).append(result)
                        print(f"  round {r + 1} {name:8s} access control {auth:3s}  {result['cpu_us']:6.1f} CPU us/request  "
                              f"{result['wall_us']:6.1f} us wall", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    table = [{"code": name if name == "current" else f"{name} ({args.baseline})", "access control": auth, "rounds": len(rs),
              "CPU us/request": float(pd.Series([x["cpu_us"] for x in rs]).median()),
              "wall us/request": float(pd.Series([x["wall_us"] for x in rs]).median())}
             for (name, auth), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    by = {(r["code"].split(" ")[0], r["access control"]): r for r in table}
    notes = []
    for auth in ("off", "on"):
        ratio = by["current", auth]["CPU us/request"] / by["baseline", auth]["CPU us/request"]
        notes.append(f"access control {auth}: this tree / {args.baseline} CPU per request {ratio:.3f} "
                     f"(goal <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'}; medians of {args.rounds} alternating rounds, {args.requests} requests each)")
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    for n in notes: print(n)
    write_results("request_cost", table, notes, {"runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, libraries=("uvicorn", "starlette"))


if __name__ == "__main__":
    main()
