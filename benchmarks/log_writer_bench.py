"""How long the prediction-log writer thread holds the GIL at a stretch: the longest stretch is what a request arriving
meanwhile waits (the event loop cannot run while another thread holds it, and CPython only forces a switch after 5 ms).

One writer tick's entries, made like the server makes them (single rows of the test split, validated values, one label and
two class probabilities each; and batches of 8 rows), turned into the log's table three ways in the same run:

- `whole table`: `prediction_table(entries)` in one go, the GIL held throughout (the baseline);
- `64-entry tables`: a table per 64 entries, joined, the GIL handed back between them (the writer before this change);
- `pieces`: `prediction_table(entries, pause)`, the writer now: the Python work `PIECE_ENTRIES` entries at a time and one
  Arrow call per column, the GIL handed back between pieces;

with the garbage collector set as `mlnb serve` sets it, and the entries freed afterwards, at once (the list dropped: one cascade of deallocations) and a piece at a time
(`ParquetLog._release`). A stretch is timed from one hand-back to the next. Every build must give the same table.

Figures go to benchmarks/results/log_writer.{json,md}, which the docs include.
Usage: python benchmarks/log_writer_bench.py [--repeat 5]   (after `make run`: it reads data/processed/test.parquet)
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results import write_results  # noqa: E402  (benchmarks/ is on the path when run as a script)
from mlnb.predlog.log import ParquetLog, PredictionEntry, PredictionIds, prediction_table  # noqa: E402


def entries(n: int, rows_per_entry: int) -> list[PredictionEntry]:
    "n entries of `rows_per_entry` rows of the test split, as the request path hands them to the log."
    path = ROOT / "data/processed/test.parquet"
    if not path.exists(): raise SystemExit(f"{path} not found: run `make run` first")
    frame = pd.read_parquet(path).drop(columns=["churn"])
    names = tuple(frame.columns)
    kinds = tuple("number" if frame[c].dtype.kind in "fiub" else "string" for c in names)
    rows = [tuple(None if pd.isna(v) else (float(v) if k == "number" else str(v)) for v, k in zip(r, kinds))
            for r in frame.itertuples(index=False)]
    ids, rng, out = PredictionIds(bytes(32)), np.random.default_rng(0), []
    for i in range(n):
        batch = [rows[(i * rows_per_entry + j) % len(rows)] for j in range(rows_per_entry)]
        p = rng.random((rows_per_entry, 1)).astype(np.float32)
        out.append(PredictionEntry(ids.issue(rows_per_entry), time.time(), "churn", "1", "champion", "mlflow", 3e-4, names, kinds, batch,
                                   {"label": np.where(p[:, 0] > 0.5, "Yes", "No").astype(object), "probabilities": np.hstack([1 - p, p])},
                                   ["No", "Yes"], 0, None))
    return out


class Stretches:
    "Times between calls: each call is a hand-back of the GIL, each interval a stretch it was held."
    def __init__(self): self.times = [time.perf_counter()]
    def __call__(self) -> None: self.times.append(time.perf_counter())
    def close(self) -> np.ndarray: self(); return np.diff(self.times) * 1000


def build(kind: str, batch: list) -> tuple[pa.Table, np.ndarray]:
    s = Stretches()
    if kind == "whole table": table = prediction_table(batch)
    elif kind == "64-entry tables":
        parts = []
        for i in range(0, len(batch), 64): parts.append(prediction_table(batch[i:i + 64])); s()
        table = pa.concat_tables(parts, promote_options="default")
    else: table = prediction_table(batch, s)
    return table, s.close()


def free(kind: str, batch: list) -> np.ndarray:
    "The writer's own `ParquetLog._release`, its hand-backs timed; or the list dropped at once."
    import mlnb.predlog.log as predlog
    s = Stretches()
    if kind == "at once": del batch[:]
    else:
        hand_back, predlog.hand_back = predlog.hand_back, s
        try: ParquetLog._release(batch)
        finally: predlog.hand_back = hand_back
    return s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="measurements of each; the median of each figure counts")
    args = ap.parse_args()
    import gc
    gc.collect(); gc.freeze(); gc.set_threshold(10_000, 50, 100)     # as `mlnb serve` runs (ModelServer.start)
    table = []
    for n, per, what in ((3000, 1, "3,000 single-row requests (1 s at concurrency 1)"),
                         (7000, 1, "7,000 single-row requests (1 s at concurrency 64)"),
                         (1000, 8, "1,000 requests of 8 rows")):
        made = entries(n, per)
        prediction_table(made[:100], lambda: None)                      # first-call costs, not measured
        whole = None
        for kind in ("whole table", "64-entry tables", "pieces"):
            longest, total, pieces = [], [], 0
            for _ in range(args.repeat):
                t, gaps = build(kind, made)
                whole = whole if whole is not None else t
                assert t.equals(whole), f"{kind}: not the same table"
                longest.append(gaps.max()); total.append(gaps.sum()); pieces = len(gaps)
            table.append({"entries": what, "step": f"build: {kind}", "stretches": pieces,
                          "longest stretch ms": float(np.median(longest)), "total ms": float(np.median(total))})
        for kind in ("at once", "in pieces"):
            longest, total, pieces = [], [], 0
            for _ in range(args.repeat):
                gaps = free(kind, made_copy(made))
                longest.append(gaps.max()); total.append(gaps.sum()); pieces = len(gaps)
            table.append({"entries": what, "step": f"free: {kind}", "stretches": pieces,
                          "longest stretch ms": float(np.median(longest)), "total ms": float(np.median(total))})
    frame = pd.DataFrame(table)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    by = {(r["entries"], r["step"]): r for r in table}
    notes = []
    for what in dict.fromkeys(r["entries"] for r in table):
        w, old, new = (by[what, f"build: {k}"] for k in ("whole table", "64-entry tables", "pieces"))
        fa, fp = by[what, "free: at once"], by[what, "free: in pieces"]
        notes.append(f"{what}: longest GIL stretch {new['longest stretch ms']:.2f} ms in pieces, against {old['longest stretch ms']:.2f} ms "
                     f"in 64-entry tables and {w['longest stretch ms']:.2f} ms for the whole table; GIL held {new['total ms']:.1f} ms in all, "
                     f"against {old['total ms']:.1f} and {w['total ms']:.1f} ms; freeing {fp['longest stretch ms']:.2f} ms at a stretch in pieces, "
                     f"{fa['longest stretch ms']:.2f} ms at once")
    notes.append("every build gave the same table: yes")
    for n in notes: print(n)
    write_results("log_writer", table, notes, libraries=("pyarrow",))


def made_copy(made: list) -> list:
    "Fresh entries like `made`, down to each value (as the server's are: parsed from each request), so freeing frees them."
    fresh = lambda v: v + 0.0 if isinstance(v, float) else (v + ".")[:-1] if isinstance(v, str) else v
    return [PredictionEntry([(i + ".")[:-1] for i in e.ids], e.timestamp, e.model_name, e.model_version, e.variant, e.protocol, e.latency_s, e.input_names,
                            e.input_kinds, [tuple(fresh(v) for v in r) for r in e.rows], {k: v.copy() for k, v in e.outputs.items()}, e.classes, e.cached,
                            e.request_id) for e in made]


if __name__ == "__main__":
    main()
