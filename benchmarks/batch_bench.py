"""Batch inference throughput: `mlnb batch-predict` on Dask with 1 and 2 workers against one in-process ONNX Runtime session.

The data is synthetic Telco-like customers (`mlnb.data.ingest.synthesize`), 10 million rows by default, in 20 Parquet files of
500,000 rows (row groups of 250,000), generated once into .benchmarks/ and reused. The model is the project's champion
(`churn@champion`, registered and signed by `make run`), with one ONNX Runtime thread per session everywhere.

- `ceiling`: one session in a process of its own, file by file: read the model's columns (strings dictionary-encoded, as
  the workers read them), build its inputs the same way, `session.run` in chunks of 65,536 rows, on one core (Arrow's
  threads limited to one). No validation, no ids, nothing written. `session.run alone` is that run's inference time.
- `dask N`: `mlnb.pipeline.batch.batch_predict` on a LocalCluster of N single-threaded worker processes: row checks, prediction
  ids, Parquet output included. "end to end" counts from starting the cluster to the last part file written; "scoring
  only" from the moment every worker holds its ONNX Runtime session (starting the cluster, importing, creating the
  sessions: about 2 s, a fixed cost, not throughput).

Peak memory, sampled every 50 ms: for the ceiling, its process; for Dask, the worker processes together (nannies
included) and, separately, the client (this process, with the scheduler of the local cluster).
Usage: python benchmarks/batch_bench.py [--rows 10000000] [--workers 1 2]
Goal: 2 workers reach >= 80% of twice the single-session ceiling.
"""
from __future__ import annotations
import argparse, shutil, sys, tempfile, threading, time
from pathlib import Path

import psutil

from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 500_000


class PeakRss:
    "The highest resident set (MB) of this process, and of its descendants together, while the block runs."
    def __enter__(self):
        self.own = self.children = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True); self._thread.start()
        return self

    def _watch(self):
        me = psutil.Process()
        while not self._stop.is_set():
            kids = 0
            for p in me.children(recursive=True):
                try: kids += p.memory_info().rss
                except psutil.Error: pass
            self.own, self.children = max(self.own, me.memory_info().rss / 1e6), max(self.children, kids / 1e6)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set(); self._thread.join()


def dataset(rows: int) -> Path:
    "rows synthetic customers in files of FILE_ROWS, made once."
    from mlnb.data.ingest import synthesize
    d = ROOT / ".benchmarks" / f"batch-{rows}"
    files = rows // FILE_ROWS
    if len(list(d.glob("*.parquet"))) == files: return d
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    print(f"generating {rows:,} rows into {d} ...", flush=True)
    for i in range(files):
        synthesize(FILE_ROWS, seed=1000 + i).drop(columns="churn").to_parquet(d / f"part-{i:03d}.parquet", row_group_size=250_000, index=False)
    return d


def ceiling(model_path: Path, data: Path) -> tuple[float, float, int]:
    "One in-process session over every file: (rows/s including reading and input building, rows/s of session.run alone, rows)."
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlnb.model.onnx import OnnxModel
    pa.set_cpu_count(1)                   # one core, as each Dask worker has: Arrow's decoding threads included
    model = OnnxModel(model_path, threads=1)
    rows, run_seconds = 0, 0.0
    start = time.perf_counter()
    strings = [name for name, typ in model.inputs.items() if typ == "tensor(string)"]
    for f in sorted(data.glob("*.parquet")):
        table = pq.read_table(f, columns=list(model.inputs), read_dictionary=strings).unify_dictionaries()
        feed = {}
        for name, typ in model.inputs.items():
            col = table.column(name).combine_chunks()
            if typ == "tensor(string)":            # one Python string per distinct value, as the workers build them
                uniques = np.append(col.dictionary.to_numpy(zero_copy_only=False).astype(object), "")
                feed[name] = uniques[col.indices.fill_null(len(uniques) - 1).to_numpy(zero_copy_only=False)].reshape(-1, 1)
            else: feed[name] = col.to_numpy(zero_copy_only=False).astype(np.float32 if typ == "tensor(float)" else np.float64).reshape(-1, 1)
        n = table.num_rows
        for lo in range(0, n, 65536):
            t = time.perf_counter()
            model.session.run(None, {k: v[lo:lo + 65536] for k, v in feed.items()})
            run_seconds += time.perf_counter() - t
        rows += n
    return rows / (time.perf_counter() - start), rows / run_seconds, rows


def ceiling_in_child(model_path: Path, data: Path) -> tuple[float, float, int, float]:
    "The ceiling measured in a fresh process (its memory its own); also its peak resident set (MB)."
    import json, subprocess
    code = ("import json, resource, sys; sys.path.insert(0, %r); from pathlib import Path; import batch_bench as b; "
            "r = b.ceiling(Path(sys.argv[1]), Path(sys.argv[2])); "
            "print(json.dumps([*r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3]))") % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, str(model_path), str(data)], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import os
    os.chdir(ROOT)
    from mlnb.pipeline.batch import batch_predict, load_model
    from mlnb.core.config import load_config
    cfg = load_config("params.yaml")
    if not cfg.paths.registration.exists():
        sys.exit("no registered model: run `make run` first")
    model = load_model(cfg)
    model_path = model.path.resolve()
    data = dataset(args.rows)

    ceil, ort_only, rows, ceil_mb = ceiling_in_child(model_path, data)
    print(f"\n{rows:,} rows x {len(model.contract.names)} inputs, model {model.name} v{model.version} ({model_path.stat().st_size / 1024:.0f} KiB)")
    print(f"{'run':<22}{'rows/s':>10}{'seconds':>9}{'workers MB':>12}{'client MB':>11}  vs ceiling")
    print(f"{'ceiling (1 session)':<22}{ceil:>10,.0f}{rows / ceil:>9.1f}{ceil_mb:>12.0f}{'':>11}  1.00")
    print(f"{'  session.run alone':<22}{ort_only:>10,.0f}{rows / ort_only:>9.1f}{'':>12}{'':>11}  {ort_only / ceil:.2f}")
    table = [{"run": "ceiling (1 session)", "rows/s": ceil, "seconds": rows / ceil, "workers MB": ceil_mb, "client MB": None, "vs ceiling": 1.0},
             {"run": "session.run alone", "rows/s": ort_only, "seconds": rows / ort_only, "workers MB": None, "client MB": None, "vs ceiling": ort_only / ceil}]
    ratios = {}
    results = {}
    for n in args.workers:
        out = Path(tempfile.mkdtemp(prefix=f"batch-bench-{n}-"))
        try:
            with PeakRss() as mem:
                t = time.perf_counter()
                r = batch_predict(model, data, out / "out", workers=n, progress=False)
                seconds = time.perf_counter() - t
        finally: shutil.rmtree(out, ignore_errors=True)
        assert r.scored == rows and r.bad == 0, r
        results[n] = (rows / seconds, r.rows_per_second)
        name = f"dask {n} worker" + ("s" if n > 1 else "")
        print(f"{name:<22}{rows / seconds:>10,.0f}{seconds:>9.1f}{mem.children:>12.0f}{mem.own:>11.0f}  {rows / seconds / ceil:.2f} end to end")
        print(f"{'  scoring only':<22}{r.rows_per_second:>10,.0f}{seconds - r.startup_seconds:>9.1f}{'':>12}{'':>11}  "
              f"{r.rows_per_second / ceil:.2f} (goal >= {0.8 * n:.1f}; start-up {r.startup_seconds:.1f} s)")
        table += [{"run": f"{name}, end to end", "rows/s": rows / seconds, "seconds": seconds, "workers MB": mem.children, "client MB": mem.own,
                   "vs ceiling": rows / seconds / ceil},
                  {"run": f"{name}, scoring only (start-up {r.startup_seconds:.1f} s)", "rows/s": r.rows_per_second, "seconds": seconds - r.startup_seconds,
                   "workers MB": None, "client MB": None, "vs ceiling": r.rows_per_second / ceil}]
    notes = [f"{rows:,} rows x {len(model.contract.names)} inputs in files of {FILE_ROWS:,} rows, model {model.name} v{model.version}; "
             "one ONNX Runtime thread per session; goal for N workers, scoring only: >= 0.8 x N of the ceiling"]
    if 2 in results:
        whole, scoring = results[2]
        line = (f"2 workers / (2 x ceiling): scoring throughput {scoring / (2 * ceil):.2f} (goal >= 0.80), "
                f"end to end with the cluster's start {whole / (2 * ceil):.2f}; vs 2 x session.run alone {scoring / (2 * ort_only):.2f}")
        print("\n" + line); notes.append(line)
    write_results("batch", table, notes, {"rows": rows, "workers": args.workers}, libraries=("dask", "distributed", "pyarrow"))


if __name__ == "__main__":
    main()
