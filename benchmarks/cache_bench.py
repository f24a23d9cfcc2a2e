"""Prediction cache and recent prediction ids: memory per entry and cost per row, against the previous design in the same run.

Baseline: a `cachetools.TTLCache` keyed by (version, row tuple) holding per-row tuples of NumPy views, and the recent ids as an
`OrderedDict` of the id strings. Now: `mlnb.serving.runtime.PredictionCache` (a `cachetools.TTLCache` too, of 16-byte BLAKE2b
keys and outputs packed in one bytes object) and `mlnb.predlog.log.PredictionIds` (ids that carry a MAC: nothing is kept per id).
Rows are the test split's, validated as the server validates them (`parse_mlflow`), each made unique (monthly and total charges
nudged), and scored by the real ONNX model in micro-batches of 64 rows, as the server does under load (the old cache's views
kept such whole batch arrays alive). Memory is what tracemalloc counts as still held once a full cache of N rows stands
(keys, values, the row values they keep, the dict); cost is per row: a miss (lookup then store, on a full cache) and a hit
(lookup then `stack_rows`), for requests of 1 and 8 rows.

Usage: python benchmarks/cache_bench.py [--entries 100000]   (after `make run`)
"""
from __future__ import annotations
import argparse, gc, json, sys, time, tracemalloc
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
from cachetools import TTLCache

from mlnb.data.schema import load_schema
from mlnb.model.onnx import OnnxModel
from mlnb.predlog.log import PredictionIds
from mlnb.serving.protocol import columns_from_rows, contract_from, parse_mlflow
from mlnb.serving.runtime import PredictionCache, stack_rows
from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


class _KeepsNothing:
    "The server's ids now: issued with a MAC that proves them later, so nothing is remembered per id."
    def __init__(self): self.ids = PredictionIds(bytes(32))
    def issue(self, n: int) -> list[str]: return self.ids.issue(n)
    def add(self, ids) -> None: pass


class TupleCache:
    "The previous prediction cache, as it was."
    def __init__(self, max_entries: int, ttl_seconds: float):
        self.entries = TTLCache(maxsize=max_entries, ttl=ttl_seconds)
        self.hits = self.misses = 0

    def lookup(self, version: str, keys: list[tuple]) -> list:
        found = [self.entries.get((version, k)) for k in keys]
        hits = sum(f is not None for f in found)
        self.hits += hits; self.misses += len(found) - hits
        return found

    def store(self, version: str, keys: list[tuple], outputs: dict[str, np.ndarray]) -> None:
        arrays = list(outputs.values())
        for i, k in enumerate(keys): self.entries[(version, k)] = tuple(a[i] for a in arrays)


class IdSet:
    "The previous recent ids: the last `capacity` ids in an OrderedDict."
    def __init__(self, capacity: int): self.capacity, self._ids = capacity, OrderedDict()
    def add(self, ids: list[str]) -> None:
        for i in ids: self._ids[i] = None
        while len(self._ids) > self.capacity: self._ids.popitem(last=False)
    def __contains__(self, i: str) -> bool: return i in self._ids


def unique_keys(records: list[dict], contract, n: int, offset: int = 0) -> list[tuple]:
    "n distinct validated rows (the server's row keys), as fresh objects per row like parsed JSON."
    out, i = [], offset
    while len(out) < n:
        r = dict(records[i % len(records)])
        r["monthly_charges"] = float(r["monthly_charges"]) + (i // len(records)) * 0.01
        r["total_charges"] = float(r["total_charges"] or 0.0) + i * 0.01
        out.append(r); i += 1
    body = json.loads(json.dumps({"dataframe_records": out}))          # fresh str objects, as each request's JSON gives
    keys = []
    for s in range(0, n, 1000): keys += parse_mlflow({"dataframe_records": body["dataframe_records"][s:s + 1000]}, contract).row_keys()
    return keys


def fill(cache, model: OnnxModel, contract, keys: list[tuple], batch: int = 64) -> None:
    "Score and store the rows in micro-batches, per request slice views of the batch output as the server hands them out."
    for s in range(0, len(keys), batch):
        rows = keys[s:s + batch]
        out = dict(zip(model.outputs, model.session.run(None, columns_from_rows(contract, rows))))
        for r in range(0, len(rows), 4):      # requests of 4 rows on average
            cache.store("1", rows[r:r + 4], {k: v[r:r + 4] for k, v in out.items()})


def held_bytes(build) -> tuple[object, int]:
    gc.collect(); tracemalloc.start(); start = tracemalloc.get_traced_memory()[0]
    obj = build(); gc.collect()
    held = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    return obj, held


def per_row_us(fn, rows: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter(); calls = fn()
        best = min(best, (time.perf_counter() - t) / (calls * rows))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    args = ap.parse_args()
    n = args.entries
    model = OnnxModel(ROOT / "models/onnx/model.onnx")
    contract = contract_from(model.inputs, load_schema(ROOT / "schema/telco_churn.yaml"), "churn", 1000)
    records = json.loads(pd.read_parquet(ROOT / "data/processed/test.parquet").drop(columns=["churn"]).to_json(orient="records"))
    print(f"{n} distinct rows of the test split, {len(contract.names)} inputs; outputs {model.outputs}", flush=True)

    print("\nmemory per entry (tracemalloc, a full cache of the rows; rows scored in batches of 64)")
    caches, per = {}, {}
    for name, make in (("before (TTLCache, tuples)", TupleCache), ("now (digests, packed)", PredictionCache)):
        def build(make=make):
            c = make(n, 3600); fill(c, model, contract, unique_keys(records, contract, n)); return c
        caches[name], held = held_bytes(build)
        per[name] = held / len(caches[name].entries)
        print(f"  {name:28s} {len(caches[name].entries)} entries, {held / 2**20:6.1f} MiB, {per[name]:6.0f} bytes per entry", flush=True)
    (b, before), (a, now) = per.items()
    print(f"  ratio: {before / now:.1f}x less memory per entry")
    table = [{"measure": "prediction cache, bytes per entry", "before": before, "now": now, "now / before": now / before}]

    print("\ncost per row, on the full caches (best of 5)")
    fresh = unique_keys(records, contract, 4000, offset=10 * n)
    out = dict(zip(model.outputs, model.session.run(None, columns_from_rows(contract, fresh))))
    cached = unique_keys(records, contract, 4000, offset=n - 4000)            # the last rows stored: all present in both caches
    for size in (1, 8):
        figures = {}
        for name, cache in caches.items():
            parts = [(fresh[s:s + size], {k: v[s:s + size] for k, v in out.items()}) for s in range(0, len(fresh), size)]
            def miss(cache=cache, parts=parts):
                for keys, outputs in parts: cache.lookup("1", keys); cache.store("1", keys, outputs)
                return len(parts)
            hits = [cached[s:s + size] for s in range(0, len(cached), size)]
            def hit(cache=cache, hits=hits):
                for keys in hits:
                    found = cache.lookup("1", keys); assert found[0] is not None
                    stack_rows(found, model.outputs)
                return len(hits)
            figures[name] = (per_row_us(miss, size), per_row_us(hit, size))
            print(f"  {size}-row requests  {name:28s} miss (lookup + store) {figures[name][0]:5.2f} µs/row, hit (lookup + stack) {figures[name][1]:5.2f} µs/row", flush=True)
        (mb, hb), (mn, hn) = figures.values()
        print(f"  {size}-row requests  ratio now/before: miss {mn / mb:.2f}x, hit {hn / hb:.2f}x")
        table += [{"measure": f"{size}-row requests, miss (lookup + store) µs/row", "before": mb, "now": mn, "now / before": mn / mb},
                  {"measure": f"{size}-row requests, hit (lookup + stack) µs/row", "before": hb, "now": hn, "now / before": hn / hb}]

    check = caches["now (digests, packed)"].lookup("1", cached[:64])
    exact = dict(zip(model.outputs, model.session.run(None, columns_from_rows(contract, cached[:64]))))
    stacked = stack_rows(check, model.outputs)
    assert all(np.array_equal(stacked[k].astype(exact[k].dtype), exact[k]) for k in model.outputs), "cached outputs differ from the model's"
    print("  cached outputs equal the model's, bit for bit")

    print(f"\nrecent prediction ids: {n} recorded (requests of 1-8 ids)")
    sizes, id_bytes = [1 + (i * 7) % 8 for i in range(n)], []
    for name, make in (("before (OrderedDict of ids)", lambda: IdSet(1_000_000)), ("now (MAC'd ids, none kept)", lambda: _KeepsNothing())):
        def build(make=make):
            r, issued, new = make(), 0, None
            new = r.issue if hasattr(r, "issue") else (lambda k, c=[0]: [f"abcdef0123-{(c.__setitem__(0, c[0] + k) or c[0]) - k + j:x}" for j in range(k)])
            while issued < n:
                ids = new(sizes[issued]); r.add(ids); issued += len(ids)
            return r
        _, held = held_bytes(build)
        print(f"  {name:28s} {held / 2**20:7.2f} MiB, {held / n:6.1f} bytes per id", flush=True)
        id_bytes.append(held / n)
    table.append({"measure": "recent prediction ids, bytes per id", "before": id_bytes[0], "now": id_bytes[1], "now / before": id_bytes[1] / id_bytes[0]})
    write_results("cache", table, [f"{n} distinct test-split rows (--entries), scored by the ONNX model in micro-batches of 64; memory by tracemalloc, "
                                   "cost per row the best of 5", "before: TTLCache of (version, row tuple) keys and tuples of NumPy views, "
                                   "recent ids in an OrderedDict; now: PredictionCache (BLAKE2b digests, packed outputs) and PredictionIds (MAC'd ids, none kept)",
                                   f"memory per entry, ratio (same run): {before / now:.1f}x less", "cached outputs equal the model's, bit for bit"],
                  {"entries": n}, libraries=("cachetools",), floatfmt=",.4g")


if __name__ == "__main__":
    main()
