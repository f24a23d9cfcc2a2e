"""Monitoring summaries per log file: the window's drift summaries with 2 Dask workers against 1 process (the in-process path).

The prediction log is synthetic Telco-like traffic (`mlnb.data.ingest.synthesize`) in the log's own schema (the columns and
types `mlnb.predlog.log.prediction_table` writes: ids, timestamps, model name and version, variant, protocol, latency,
cached, `input.*`, label, `proba.*`), zstd Parquet files as the server's writer leaves them in `date=YYYY-MM-DD/` folders:
20 million rows in 40 files by default, generated once into .benchmarks/ and reused.

Both paths run the same code, `mlnb.monitoring.check`: the first pass (`window_versions`: which versions served the window)
and the per-file summaries (`summarize_window`: the window filter, the version split, each feature's `CurrentSummary`, the
prediction-drift summary and the labelled rows of a 1% feedback share), merged in file order.

- `1 process, one core`: no client: one file at a time in this process, Arrow's threads limited to one (as each worker
  has; as `benchmarks/batch_bench.py` measures its ceiling). The goal's baseline. `1 process, Arrow's threads`: the same
  with Arrow decoding on all cores, as `mlnb monitor` without a cluster runs: shown beside it.
- `2 workers`: the cluster `monitor.cluster: local` starts (`mlnb.core.cluster.local_cluster`: TLS, one thread a worker,
  here 2 workers; Dask's stack sampler off, and each worker keeps the memory a file needed for the next, `_WORKER_SETTINGS`);
  "summaries" counts from a running cluster, "with start" adds starting it. Each process (this one, each worker) first
  summarises two files untimed (`WARM`), a worker as a task (in the thread its tasks run in): the first calls cost about
  1 s of CPU once (imports, lazy set-up, the memory a file needs while the previous one's is still held), start-up rather
  than throughput; "with start" includes the workers' warm-up.

Printed: rows/s, seconds per pass, the client's peak resident set (this process, which also hosts the local scheduler) and
the workers' (all worker processes together), the CPU seconds all processes spent, and whether the merged summaries are
equal (every counter, bit for bit).
Usage: python benchmarks/monitor_bench.py [--rows 20000000 --files 40] [--quick]   (--quick: 2 million rows in 8 files)
Goal: 2 workers >= 1.7x the throughput of 1 process, in the same run.
"""
from __future__ import annotations
import argparse, shutil, sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from batch_bench import PeakRss   # this process's and its children's peak resident set, sampled every 50 ms
from results import write_results

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 11, 1, tzinfo=timezone.utc)
LABELLED = 0.01


def log_dir(rows: int, files: int) -> Path:
    "rows of logged traffic in `files` files, made once."
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlnb.data.ingest import synthesize
    d = ROOT / ".benchmarks" / f"monitor-{rows}-{files}" / "predictions"
    per_file = rows // files
    day = d / f"date={START:%Y-%m-%d}"
    if len(list(day.glob("predictions-*.parquet"))) == files: return d
    shutil.rmtree(d, ignore_errors=True); day.mkdir(parents=True)
    print(f"generating {rows:,} logged rows in {files} files into {d} ...", flush=True)
    rng = np.random.default_rng(0)
    for n in range(files):
        traffic = synthesize(per_file, seed=2000 + n, shift={"tenure": 0.3} if n % 2 else None).drop(columns="churn")
        proba = rng.random(per_file)
        stamp = START + timedelta(seconds=60 * n)
        micros = np.int64(stamp.timestamp() * 1e6) + np.arange(per_file, dtype=np.int64)
        cols = {"prediction_id": pa.array(np.char.add(f"f{n:03d}-", np.arange(per_file).astype(str)).astype(object), pa.string()),
                "timestamp": pa.array(micros, pa.timestamp("us", tz="UTC")),
                "request_id": pa.array([None] * per_file, pa.string()),
                "model_name": pa.array(["churn"] * per_file, pa.string()),
                "model_version": pa.array(["1"] * per_file, pa.string()),
                "variant": pa.array(["champion"] * per_file, pa.string()),
                "protocol": pa.array(["mlflow"] * per_file, pa.string()),
                "latency_ms": pa.array(rng.random(per_file), pa.float64()),
                "cached": pa.array(np.zeros(per_file, bool), pa.bool_())}
        for c in traffic.columns:
            values = traffic[c]
            cols[f"input.{c}"] = (pa.array(values.to_numpy(float), pa.float64(), from_pandas=True) if values.dtype.kind in "fiub"
                                  else pa.array(values.astype(object).where(values.notna(), None), pa.string()))
        cols["label"] = pa.array(np.where(proba > 0.5, "Yes", "No").astype(object), pa.string())
        cols["proba.No"], cols["proba.Yes"] = pa.array(1 - proba), pa.array(proba)
        name = f"predictions-{stamp:%Y%m%dT%H%M%S%f}-1-{n:06d}.parquet"
        pq.write_table(pa.table(cols), day / name, compression="zstd")
    return d


WARM = 2    # files a process summarises untimed first: its steady state holds one file's memory while it reads the next


def _warm(paths, plan) -> None:
    """The first WARM files' summaries, so that a process's first-call costs (imports, lazy set-up, acquiring the memory
    its files need: about 1 s of CPU) are start-up, not throughput."""
    from mlnb.monitoring.check import summarize_file
    for path in paths[:WARM]: summarize_file(path, plan, threads=False)


def _warm_workers(client, paths, plan) -> None:
    """`_warm` on each worker as a task: in the thread its tasks run in, whose allocator (Arrow's mimalloc) keeps the memory
    a file needs for the next one (`client.run` would warm the worker's event-loop thread instead)."""
    workers = list(client.scheduler_info()["workers"])
    client.gather([client.submit(_warm, paths, plan, workers=[w], allow_other_workers=False, pure=False) for w in workers])


def cpu_seconds() -> float:
    "CPU time (user + system) of this process and its live descendants (the local cluster's workers and nannies)."
    import psutil
    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try: t = p.cpu_times(); total += t.user + t.system
        except psutil.Error: pass
    return total


def run(files, plan, ids, client):
    "Both passes; their seconds, the merged parts, and the CPU seconds they took (all processes)."
    from mlnb.monitoring.check import summarize_window, window_versions
    cpu, t0 = cpu_seconds(), time.perf_counter()
    _, seen = window_versions(files, None, plan.since, plan.until, client)
    t1 = time.perf_counter()
    parts = summarize_window(files, plan, None, ids, client)
    return t1 - t0, time.perf_counter() - t1, seen, parts, cpu_seconds() - cpu


def same(a, b) -> bool:
    "Two merged windows' parts: every counter equal, bit for bit, and the same labelled rows."
    if a.keys() != b.keys(): return False
    for v in a:
        p, q = a[v], b[v]
        if p.rows != q.rows or not p.frame("labelled").equals(q.frame("labelled")): return False
        for s, t in [*((p.columns[c], q.columns[c]) for c in p.columns), (p.prediction, q.prediction)]:
            for attr in ("rows", "missing", "categories", "counts", "at_or_below", "below", "psi_counts", "low_n", "high_n",
                         "low_sum", "high_sum", "sum", "sumsq"):
                if not hasattr(s, attr): continue
                x, y = getattr(s, attr), getattr(t, attr)
                if not (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y): return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="2 million rows in 8 files, for development")
    args = ap.parse_args()
    rows, nfiles = (2_000_000, 8) if args.quick else (args.rows, args.files)
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    from mlnb.core.config import MonitorConfig
    from mlnb.data.ingest import synthesize
    from mlnb.features.spec import Profile
    from mlnb.monitoring.check import WindowPlan, _feedback_ids, _monitor_client, version_plan
    from mlnb.predlog.log import log_files

    files = log_files(log_dir(rows, nfiles))
    reference = Profile.from_frame(synthesize(5000, seed=1).drop(columns="churn"))
    columns = ["prediction_id", "timestamp", "model_version", *reference.columns, "label", "proba.No", "proba.Yes"]
    plan = WindowPlan(START, START + timedelta(days=1),
                      {"1": version_plan(reference, columns, MonitorConfig(), np.random.default_rng(1).random(1500), "Yes")})
    per_file = rows // nfiles
    ids = _feedback_ids(pd.DataFrame({"prediction_id": [f"f{n:03d}-{i}" for n in range(nfiles) for i in range(0, per_file, int(1 / LABELLED))]}))

    import pyarrow as pa
    _warm(files, plan)                                   # this process's first-call costs, likewise
    single = {}
    for name, cores in (("one core", 1), ("threads", pa.cpu_count())):
        default = pa.cpu_count()
        pa.set_cpu_count(cores)                          # one core: Arrow's decoding threads limited, as each worker has
        try:
            with PeakRss() as alone:
                first, second, seen, here, cpu = run(files, plan, ids, None)
        finally: pa.set_cpu_count(default)
        assert seen["1"][0] == rows, seen
        single[name] = {"first": first, "second": second, "total": first + second, "client": alone.own, "cores": cores, "cpu": cpu}
    t = time.perf_counter()
    with PeakRss() as mem:
        with _monitor_client("local", 2) as client:       # the cluster `monitor.cluster: local` starts
            _warm_workers(client, [str(f) for f in files], plan)   # each worker's first-call costs: start-up, as the batch benchmark counts them
            started = time.perf_counter() - t
            first, second, _, there, cpu = run(files, plan, ids, client)
    dask = {"first": first, "second": second, "total": first + second, "client": mem.own, "workers": mem.children, "start": started, "cpu": cpu}
    equal = same(here, there)

    base = single["one core"]["total"]
    ratio, with_start = base / dask["total"], base / (dask["total"] + dask["start"])
    threaded = single["threads"]["total"] / dask["total"]
    row = lambda run, r, seconds, workers=None: {
        "run": run, "rows/s": rows / seconds, "seconds": seconds, "versions pass s": r.get("first"), "summaries pass s": r.get("second"),
        "client MB": r.get("client"), "workers MB": workers, "CPU s": r.get("cpu"), "vs 1 process": base / seconds}
    table = [row("1 process, one core (in-process path)", single["one core"], base),
             row(f"1 process, Arrow's {single['threads']['cores']} threads", single["threads"], single["threads"]["total"]),
             row("2 workers, summaries", dask, dask["total"], dask["workers"]),
             row(f"2 workers, with start ({dask['start']:.1f} s)", {}, dask["total"] + dask["start"])]
    print(f"\n{rows:,} logged rows in {nfiles} files of {per_file:,}; {len(reference.columns)} features, prediction drift, "
          f"{LABELLED:.0%} labelled")
    print(f"{'run':<40}{'rows/s':>12}{'seconds':>9}{'pass 1':>8}{'pass 2':>8}{'client MB':>11}{'workers MB':>12}{'CPU s':>8}  vs 1 process")
    for r in table:
        cell = lambda k, f: "" if r[k] is None else format(r[k], f)
        print(f"{r['run']:<40}{r['rows/s']:>12,.0f}{r['seconds']:>9.1f}{cell('versions pass s', '.1f'):>8}"
              f"{cell('summaries pass s', '.1f'):>8}{cell('client MB', '.0f'):>11}{cell('workers MB', '.0f'):>12}{cell('CPU s', '.1f'):>8}  {r['vs 1 process']:.2f}")
    notes = [f"{rows:,} logged rows in {nfiles} files of {per_file:,} (zstd Parquet in the log's schema), {len(reference.columns)} "
             f"features against a 5,000-row reference, prediction drift, {LABELLED:.0%} of rows labelled; both passes of "
             "`mlnb.monitoring.check` (versions, then summaries), merged in file order",
             f"2 workers / 1 process on one core: throughput {ratio:.2f}x (goal >= 1.7x); {with_start:.2f}x counting the cluster's "
             f"start; {threaded:.2f}x against the in-process path with Arrow's threads (`mlnb monitor` without a cluster)",
             f"CPU seconds (all processes): {single['one core']['cpu']:.1f} in one process, {dask['cpu']:.1f} on the cluster "
             f"({dask['cpu'] / single['one core']['cpu']:.2f}x: the per-file work, plus Dask's overhead); on a busy machine the "
             "wall-clock ratio says more about the neighbours than about this code",
             f"merged summaries equal, every counter bit for bit: {'yes' if equal else 'NO'}"]
    for n in notes[1:]: print(n)
    write_results("monitor", table, notes, {"rows": rows, "files": nfiles, "equal": equal, "ratio": ratio, "ratio_with_start": with_start, "ratio_vs_arrow_threads": threaded},
                  libraries=("dask", "distributed", "pyarrow"))
    if not equal: sys.exit("the merged summaries differ between the two paths")


if __name__ == "__main__":
    main()
