"""Load: exactly N requests (default 100,000) at concurrency 64 against one `mlnb serve`, with the errors, throughput, latency
percentiles and the server's resident memory before and after; the same load against the bare floor (benchmarks/floor_app.py)
in the same run, so the ratios show what mlnb costs above any server of this model.

mlnb runs with its defaults on (validation, prediction cache, micro-batching, prediction log, metrics, access log). Requests are
MLflow `/invocations` bodies of test-split rows: 4 in 5 are single rows, the rest batches of 2 to 8 rows. Two traffic patterns:
- fresh: every row made unique (monthly and total charges nudged per request), so the cache never answers: the server's full
  cost, and the cache and the recent-prediction-id set grow towards their bounds (their sizes are printed with the memory);
- no cache: fresh rows with the cache off, so the memory growth left is not the cache filling towards its bound (100,000 rows
  by default, about 200 bytes each);
- repeated: the test rows as they are, cycled, so the cache answers almost everything, as it would for clients that retry.
The server is pinned to core 0 and wrk (one thread) to core 1. wrk's Lua script counts responses and stops at exactly N; the
count, the non-200 answers and the server's own request counter are printed, so a short or over-long run shows.
Memory is VmRSS from /proc/PID/status after a warm-up (not measured) and again after the N requests.

Usage: python benchmarks/load_bench.py [--requests 100000] [--concurrency 64] [--warmup 10000] [--skip-floor] [--skip-repeated]
(after `make run`; needs wrk: apt-get install wrk)
"""
from __future__ import annotations
import argparse, json, os, random, re, shutil, signal, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import free_port, metric_sum, run_server, stop  # noqa: E402 (shared helpers)
from results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUDGED = ("monthly_charges", "total_charges")


def templates(rows: list[dict], count: int = 400, seed: int = 0) -> list[tuple[list[str], list[float]]]:
    "Request bodies split around their nudged numbers: 4 in 5 single rows, the rest 2-8 rows."
    rng, out = random.Random(seed), []
    for _ in range(count):
        batch = rng.sample(rows, 1 if rng.random() < 0.8 else rng.randint(2, 8))
        body = json.dumps({"dataframe_records": [{**r, **{k: f"@{j}.{k}@" for k in NUDGED}} for j, r in enumerate(batch)]})
        parts, bases = re.split(r'"@\d+\.\w+@"', body), [float(r[k] or 0.0) for r in batch for k in NUDGED]
        out.append((parts, bases))
    return out


def lua_script(bodies: list[tuple[list[str], list[float]]], path: Path) -> Path:
    """wrk script: cycle through the bodies (nudging their numbers when args[2] is 1), count responses and non-200s, and stop after
    exactly args[1] responses, touching the file args[4] (wrk's main thread sleeps for -d, so the caller then interrupts it); done() prints a JSON summary."""
    lua = ["local parts, bases = {}, {}"]
    for i, (parts, bases) in enumerate(bodies, 1):
        lua.append(f"parts[{i}] = {{{', '.join(json.dumps(p) for p in parts)}}}; bases[{i}] = {{{', '.join(repr(b) for b in bases)}}}")
    lua += [f"local n = {len(bodies)}",
            "local target, unique, sent, stopped, flag = 0, true, 0, false, nil",
            "responses, non200 = 0, 0        -- globals: done() reads them with thread:get",
            "local threads = {}",
            "setup = function(thread) table.insert(threads, thread) end",
            "init = function(args) target = tonumber(args[1]); unique = args[2] == '1'; sent = tonumber(args[3]) or 0; flag = args[4] end",
            'wrk.method = "POST"; wrk.path = "/invocations"; wrk.headers["Content-Type"] = "application/json"',
            "request = function()",
            "  sent = sent + 1",
            "  local i = (sent % n) + 1",
            "  local p, b, out = parts[i], bases[i], {}",
            "  for j = 1, #b do",
            "    local v = b[j]",
            "    if unique then v = v + ((j % 2 == 1) and (sent % 1000) or (math.floor(sent / 1000) % 100000)) * 0.01 end",
            "    out[#out + 1] = p[j]; out[#out + 1] = string.format('%.2f', v)",
            "  end",
            "  out[#out + 1] = p[#p]",
            "  return wrk.format(nil, nil, nil, table.concat(out))",
            "end",
            "response = function(status, headers, body)",
            "  if stopped then return end",
            "  responses = responses + 1",
            "  if status ~= 200 then non200 = non200 + 1 end",
            "  if responses >= target then",
            "    stopped = true",
            "    wrk.thread:stop()",
            "    local f = io.open(flag, 'w'); f:close()",
            "  end",
            "end",
            "done = function(summary, latency, requests)",
            "  local t = threads[1]",
            "  io.write(string.format('RESULT {\"responses\": %d, \"non200\": %d, \"completed\": %d, \"duration_us\": %d, "
            "\"socket_errors\": %d, \"p50_us\": %d, \"p99_us\": %d, \"max_us\": %d}\\n', t:get('responses'), t:get('non200'), summary.requests, "
            "summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status, "
            "latency:percentile(50), latency:percentile(99), latency.max))",
            "end"]
    path.write_text("\n".join(lua))
    return path


_OFFSETS = iter(range(1, 10**6))

def wrk(url: str, script: Path, requests: int, concurrency: int, unique: bool) -> dict:
    "Exactly `requests` responses; each call starts its counter elsewhere, so no body repeats across calls."
    flag = script.with_suffix(".done")
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", f"-c{concurrency}", "-d3600s", "--timeout", "10s", "-s", str(script), url,
                             "--", str(requests), "1" if unique else "0", str(next(_OFFSETS) * 10_000_000), str(flag)], stdout=subprocess.PIPE, text=True)
    while not flag.exists() and proc.poll() is None: time.sleep(0.05)
    if proc.poll() is None: proc.send_signal(signal.SIGINT)      # the script stopped its thread after the last response; end the run now
    out = proc.communicate()[0]
    r = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
    if r["responses"] != requests: raise SystemExit(f"wrk counted {r['responses']} responses, not {requests}:\n{out}")
    return {"requests": r["responses"], "errors": r["non200"] + r["socket_errors"], "rps": r["responses"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000}


def rss_mb(pid: int) -> float:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)) / 1024


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r: return json.loads(r.read())


def measure(name: str, proc: subprocess.Popen, base: str, script: Path, args, unique: bool, stats=None) -> dict:
    wrk(f"{base}/invocations", script, args.warmup, args.concurrency, unique)         # warm-up, not measured
    time.sleep(1)
    before, state_before = rss_mb(proc.pid), stats() if stats else {}
    r = wrk(f"{base}/invocations", script, args.requests, args.concurrency, unique)
    time.sleep(1)
    after, state_after = rss_mb(proc.pid), stats() if stats else {}
    r.update(server=name, rss_before_mb=before, rss_after_mb=after, rss_growth_pct=100 * (after - before) / before, state_before=state_before, state_after=state_after)
    print(f"  {name:14s} {r['requests']} requests, errors {r['errors']}, {r['rps']:7.0f} req/s, p50 {r['p50_ms']:7.2f} ms, p99 {r['p99_ms']:7.2f} ms, "
          f"max {r['max_ms']:8.2f} ms; RSS {before:.0f} -> {after:.0f} MB ({r['rss_growth_pct']:+.1f}%)", flush=True)
    if stats:
        served = state_after["requests_served"] - state_before["requests_served"]
        print(f"  {'':14s} the server answered {served} requests meanwhile: the {r['requests']} counted and {served - r['requests']} in flight when wrk stopped", flush=True)
        if state_before["cache_entries"] is not None:
            print(f"  {'':14s} prediction cache entries: {state_before['cache_entries']} before, {state_after['cache_entries']} after", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=10_000, help="requests sent before the memory is first read (not measured)")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-repeated", action="store_true", help="measure only fresh (cache-missing) traffic, with and without the cache")
    args = ap.parse_args()
    if not shutil.which("wrk"): raise SystemExit("wrk not found: apt-get install wrk")
    from mlnb.core.config import load_paths
    catalog = load_paths(ROOT / "params.yaml")
    onnx_path = ROOT / catalog.onnx
    if not onnx_path.exists():
        raise SystemExit(f"{catalog.onnx} not found: run `make run` first")
    from mlnb.model.signing import ensure_signing_key, sign_model
    rows = json.loads(pd.read_parquet(ROOT / catalog.test).drop(columns=["churn"]).to_json(orient="records"))
    results = []
    print(f"{args.requests} requests at concurrency {args.concurrency} (warm-up {args.warmup}); 4 in 5 single rows, the rest 2-8 rows", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlnb-load-") as tmp:
        tmp = Path(tmp)
        script = lua_script(templates(rows), tmp / "load.lua")
        shutil.copy(onnx_path, tmp / "model.onnx"); shutil.copy(ROOT / "schema/telco_churn.yaml", tmp / "schema.yaml")
        ensure_signing_key(tmp / "k.key", tmp / "k.pub"); sign_model(tmp / "model.onnx", tmp / "k.key")
        params = {"registry": {"public_key": str(tmp / "k.pub")},
                  "serve": {"model": str(tmp / "model.onnx"), "reload_poll_seconds": 0,
                            "prediction_log": {"dir": str(tmp / "predictions"), "feedback_dir": str(tmp / "feedback")}}}
        (tmp / "params.yaml").write_text(json.dumps(params))
        params["serve"]["cache"] = {"enabled": False}
        (tmp / "params-no-cache.yaml").write_text(json.dumps(params))

        if not args.skip_floor:
            print("floor: bare Starlette + ONNX Runtime", flush=True)
            port = free_port()
            proc = run_server("floor", [str(BIN / "uvicorn"), "benchmarks.floor_app:app", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                                        "--no-access-log", "--log-level", "warning"], f"http://127.0.0.1:{port}/ping", {"MODEL": str(tmp / "model.onnx")}, tmp / "floor.log")
            try: results.append(measure("floor", proc, f"http://127.0.0.1:{port}", script, args, unique=True))
            finally: stop(proc)

        runs = [("mlnb fresh", True, "params.yaml", "defaults on (cache, prediction log, access log)"),
                ("mlnb no cache", True, "params-no-cache.yaml", "the same with the cache off: what memory does without the cache filling"),
                ("mlnb repeated", False, "params.yaml", "defaults on; rows repeated, so the cache answers")]
        for name, unique, params_file, what in runs[: 2 if args.skip_repeated else 3]:
            print(f"{name}: mlnb serve, {what}", flush=True)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = run_server("mlnb", [str(BIN / "mlnb"), "serve", "--params", str(tmp / params_file), "--port", str(port)], f"{base}/v2/health/ready", {}, tmp / f"{name}.log")
            def stats():
                metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
                return {"cache_entries": (get_json(f"{base}/admin/model")["cache"] or {}).get("entries"), "requests_served": int(metric_sum(metrics, "mlnb_requests_total"))}
            try: results.append(measure(name, proc, base, script, args, unique, stats))
            finally: stop(proc)

    floor = next((r for r in results if r["server"] == "floor"), None)
    print("\nsummary")
    notes = [f"{args.requests} requests per run at concurrency {args.concurrency} after a warm-up of {args.warmup}; 4 in 5 single rows, the rest 2-8 rows"]
    for r in results:
        ratio = f"  {r['rps'] / floor['rps']:.2f}x floor throughput, p99 {r['p99_ms'] / floor['p99_ms']:.2f}x floor" if floor and r is not floor else ""
        goal = "ok" if r["errors"] == 0 and r["rss_growth_pct"] < 10 else "MISSED"
        line = f"{r['server']:14s} errors {r['errors']} (goal 0), RSS growth {r['rss_growth_pct']:+.1f}% (goal < 10%): {goal}{ratio}"
        print("  " + line); notes.append(" ".join(line.split()))
    table = [{"run": r["server"], "requests": r["requests"], "errors": r["errors"], "req/s": round(r["rps"]), "p50 ms": r["p50_ms"],
              "p99 ms": r["p99_ms"], "max ms": r["max_ms"], "RSS before MB": r["rss_before_mb"], "RSS after MB": r["rss_after_mb"],
              "growth %": r["rss_growth_pct"], "cache entries after": r["state_after"].get("cache_entries")} for r in results]
    write_results("load", table, notes, {"requests": args.requests, "concurrency": args.concurrency, "warmup": args.warmup, "results": results},
                  libraries=("uvicorn", "starlette"))


if __name__ == "__main__":
    main()
