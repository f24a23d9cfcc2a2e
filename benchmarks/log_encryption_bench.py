"""Prediction log write and read throughput with encryption at rest against plain Parquet, measured in the same run.

Each request is one `PredictionEntry` of Telco-like inputs (`mlnb.data.ingest.synthesize`, 19 columns) with a label and two
class probabilities, as `mlnb serve` logs it. For each mode (plain, encrypted):
- `put`: the request path's cost, microseconds per `ParquetLog.put` (the same code in both modes: sealing happens on the
  writer thread, so this should not move);
- `writer CPU`: rows per CPU second of the writer thread (it builds the Arrow table, writes Parquet and, encrypted,
  seals it): the cost that logging takes from a server's cores, whatever else the machine is doing;
- `read all`: `read_log` of the whole directory; `read ids`: `read_log(columns=["prediction_id"])`; `logged_ids`: 100 ids
  looked up (the server's feedback check), each the best of `--repeat` runs, the two modes taking turns.

Usage: python benchmarks/log_encryption_bench.py [--rows 1000000] [--rows-per-request 1] [--rows-per-file 100000]
Goal: no change on the request path; the writer's CPU and whole-log reads within 1.2x of plain. Reading one column
(`logged_ids`) costs more, about 2x: plain Parquet reads only that column's pages, a sealed file is decrypted whole.
"""
from __future__ import annotations
import argparse, json, tempfile, time
from pathlib import Path

import numpy as np

from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)


def entries(n_rows: int, per_request: int, seed: int = 0):
    "Prediction entries as the server makes them, `per_request` rows each (inputs drawn from 10,000 synthetic rows)."
    from mlnb.data.ingest import synthesize
    from mlnb.predlog.log import PredictionEntry
    pool = synthesize(10_000, seed=seed).drop(columns=["churn"])
    names = tuple(pool.columns)
    kinds = tuple("number" if pool[c].dtype.kind in "if" else "string" for c in names)
    rows = list(pool.itertuples(index=False, name=None))
    rng = np.random.default_rng(seed)
    proba = rng.random((10_000, 1)).astype(np.float32)
    proba = np.hstack([1 - proba, proba])
    labels = np.where(proba[:, 1] > 0.5, "Yes", "No").astype(object)
    start = time.time()
    for i in range(0, n_rows, per_request):
        k = min(per_request, n_rows - i)
        j = i % (10_000 - k)
        yield PredictionEntry([f"bench-{r:x}" for r in range(i, i + k)], start + i * 1e-4, "churn", "3", "champion", "v2", 0.0004,
                              names, kinds, rows[j:j + k], {"label": labels[j:j + k], "probabilities": proba[j:j + k]},
                              classes=["No", "Yes"]), k


def seconds(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def write(directory: Path, keys, args) -> dict:
    from mlnb.predlog.log import ParquetLog, log_files, logged_ids, prediction_table, read_log
    writer_cpu = []
    log = ParquetLog(directory, prediction_table, "predictions", flush_seconds=0.2, max_rows_per_file=args.rows_per_file,
                     queue_size=args.rows + 1, keys=keys, on_write=lambda _: writer_cpu.append(time.thread_time()))   # runs on the writer thread
    put_seconds, requests = 0.0, 0
    for entry, k in entries(args.rows, args.rows_per_request):      # made as the requests come: memory stays small
        t = time.perf_counter(); log.put(entry, k); put_seconds += time.perf_counter() - t; requests += 1
    log.close(timeout=3600)
    assert log.stats.rows_written == args.rows and not log.stats.dropped and not log.stats.write_errors, log.stats
    assert len(read_log(directory, ["prediction_id"], keys=keys)) == args.rows
    files = log_files(directory)
    return {"put_us": put_seconds / requests * 1e6, "writer_cpu_rows_s": args.rows / writer_cpu[-1],
            "files": len(files), "mb_on_disk": sum(f.stat().st_size for f in files) / 1e6}


def read(directory: Path, keys, args, some_ids: list[str]) -> dict:
    "One timing of each read (seconds)."
    from mlnb.predlog.log import logged_ids, read_log
    return {"read_all_rows_s": seconds(lambda: read_log(directory, keys=keys)),
            "read_ids_rows_s": seconds(lambda: read_log(directory, ["prediction_id"], keys=keys)),
            "logged_ids_s": seconds(lambda: logged_ids(directory, some_ids, keys=keys))}


def main():
    from mlnb.predlog.log import LogKeys
    import os
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-per-request", type=int, default=1)
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    modes = {"plain": None, "encrypted": LogKeys((os.urandom(32),), "benchmark")}
    some_ids = [f"bench-{i:x}" for i in np.random.default_rng(1).integers(0, args.rows, 100)]
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: write(Path(tmp) / mode, keys, args) for mode, keys in modes.items()}
        reads = {mode: [] for mode in modes}
        for _ in range(args.repeat):                                    # alternating, so a busy moment hits both modes alike
            for mode, keys in modes.items(): reads[mode].append(read(Path(tmp) / mode, keys, args, some_ids))
    for mode, runs in reads.items():
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        results[mode].update(read_all_rows_s=args.rows / best["read_all_rows_s"], read_ids_rows_s=args.rows / best["read_ids_rows_s"],
                             logged_ids_s=best["logged_ids_s"])
    plain, enc = results["plain"], results["encrypted"]
    print(f"{args.rows:,} rows, {args.rows_per_request} per request, {args.rows_per_file:,} rows per file")
    print(f"{'':22}{'plain':>14}{'encrypted':>14}{'ratio':>8}")
    rows = [("put (us/request)", "put_us", "{:.2f}", False), ("writer CPU (rows/s)", "writer_cpu_rows_s", "{:,.0f}", True),
            ("read all (rows/s)", "read_all_rows_s", "{:,.0f}", True), ("read ids (rows/s)", "read_ids_rows_s", "{:,.0f}", True),
            ("logged_ids 100 (s)", "logged_ids_s", "{:.3f}", False), ("files", "files", "{}", False), ("MB on disk", "mb_on_disk", "{:.1f}", False)]
    table = []
    for label, key, fmt, rate in rows:
        ratio = plain[key] / enc[key] if rate else enc[key] / plain[key]      # > 1: encrypted is slower (or bigger)
        print(f"{label:22}{fmt.format(plain[key]):>14}{fmt.format(enc[key]):>14}{ratio:>7.2f}x")
        table.append({"": label, "plain": fmt.format(plain[key]), "encrypted": fmt.format(enc[key]), "ratio": f"{ratio:.2f}x"})
    print("ratio: encrypted cost relative to plain (time per row, or size); 1.00x is no cost")
    print(json.dumps(results))
    write_results("log_encryption", table, [f"{args.rows:,} rows, {args.rows_per_request} per request, {args.rows_per_file:,} rows per file; "
                                            f"reads the best of {args.repeat}, the two modes taking turns",
                                            "ratio: encrypted cost relative to plain (time per row, or size); 1.00x is no cost"],
                  {"rows": args.rows, "rows_per_request": args.rows_per_request, "rows_per_file": args.rows_per_file, "repeat": args.repeat,
                   "results": results}, libraries=("pyarrow", "cryptography"),
                  disable_numparse=True, colalign=("left", "right", "right", "right"))      # the cells are formatted per row, as printed


if __name__ == "__main__":
    main()
