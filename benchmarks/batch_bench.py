"""Batch inference throughput: `mlnb batch-predict` on Dask with 1 and 2 workers against one in-process ONNX Runtime session.

The data is synthetic Telco-like customers (`mlnb.data.ingest.synthesize`), 2 million rows by default (the size of the goals),
in Parquet files of 500,000 rows (row groups of 250,000), generated once into .benchmarks/ and reused. The model is the project's champion
(`churn@champion`, registered and signed by `make run`), with one ONNX Runtime thread per session everywhere.

- `ceiling`: one session in a process of its own, file by file: read the model's columns (strings dictionary-encoded, as
  the workers read them), build its inputs the same way, `session.run` in chunks of 65,536 rows, on one core (Arrow's
  threads limited to one). No validation, no ids, nothing written. `session.run alone` is that run's inference time.
- `dask N`: `mlnb.pipeline.batch.batch_predict` on a LocalCluster of N single-threaded worker processes that the call starts
  (and closes): row checks, prediction ids, Parquet output included, default piece size. "end to end" is the whole call:
  planning, starting the cluster, the workers' imports and sessions, scoring, closing the cluster, the summary; "scoring
  only" counts from the moment every worker holds its ONNX Runtime session to the last part file written.
- `dask N, existing scheduler`: the same call given the address of a `dask scheduler` with `dask worker --nworkers N
  --nthreads 1` started (and waited for) before the timed region: fresh worker processes that have not imported mlnb, so
  their imports and sessions are inside it.

Where the time goes: for each Dask run, the client's wall seconds per phase (plan, start, setup, scoring, close, summary)
and, summed over the workers, the wall and CPU seconds (`time.process_time` inside the workers) of their imports and
sessions and of each piece's read, check, score (`session.run`), build and write, against the ceiling's CPU seconds for
the same rows (read, building the inputs, `session.run`). "idle" is N x the scoring wall time minus the pieces' wall
time: the tail, and the dispatch between pieces. CPU seconds are the figures to reason with on a shared machine.

Peak memory, sampled every 50 ms: for the ceiling, its process; for Dask, the worker processes together (nannies
included) and, separately, the client (this process, with the scheduler of the local cluster).
Usage: python benchmarks/batch_bench.py [--rows 2000000] [--workers 1 2] [--model REF]
Goals (2 workers, 2 million rows): scoring >= 0.80 of twice the single-session ceiling; end to end >= 0.70 when the call
starts the cluster, >= 0.80 with an existing scheduler.
"""
from __future__ import annotations
import argparse, os, shutil, signal, subprocess, sys, tempfile, threading, time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import free_port  # noqa: E402 (one helper for a free loopback port)


ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 500_000


class PeakRss:
    """The highest resident set (MB) of this process, and of its descendants together, while the block runs (sampled every 0.2 s,
    the list of descendants refreshed every second: listing them reads every process in /proc)."""
    def __enter__(self):
        self.own = self.children = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True); self._thread.start()
        return self

    def _watch(self):
        me, kids_at, children = psutil.Process(), 0.0, []
        while not self._stop.is_set():
            if time.monotonic() - kids_at > 1.0: children, kids_at = me.children(recursive=True), time.monotonic()
            kids = 0
            for p in children:
                try: kids += p.memory_info().rss
                except psutil.Error: pass
            self.own, self.children = max(self.own, me.memory_info().rss / 1e6), max(self.children, kids / 1e6)
            self._stop.wait(0.2)

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


class Clock:
    "Wall and CPU seconds per phase."
    def __init__(self): self.wall, self.cpu = {}, {}
    def add(self, name, w, c):
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
    def to_dict(self): return {k: {"wall": self.wall[k], "cpu": self.cpu[k]} for k in self.wall}


def ceiling(model_path: Path, data: Path) -> tuple[float, float, int, dict]:
    """One in-process session over every file: (rows/s including reading and input building, rows/s of session.run alone, rows,
    the wall and CPU seconds of reading, building the inputs and session.run)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlnb.model.onnx import OnnxModel
    pa.set_cpu_count(1)                   # one core, as each Dask worker has: Arrow's decoding threads included
    model = OnnxModel(model_path, threads=1)
    rows, run_seconds, clock = 0, 0.0, Clock()
    start = time.perf_counter()
    strings = [name for name, typ in model.inputs.items() if typ == "tensor(string)"]
    for f in sorted(data.glob("*.parquet")):
        w, c = time.perf_counter(), time.process_time()
        table = pq.read_table(f, columns=list(model.inputs), read_dictionary=strings).unify_dictionaries()
        clock.add("read", w, c); w, c = time.perf_counter(), time.process_time()
        feed = {}
        for name, typ in model.inputs.items():
            col = table.column(name).combine_chunks()
            if typ == "tensor(string)":            # one Python string per distinct value, as the workers build them
                uniques = np.append(col.dictionary.to_numpy(zero_copy_only=False).astype(object), "")
                feed[name] = uniques[col.indices.fill_null(len(uniques) - 1).to_numpy(zero_copy_only=False)].reshape(-1, 1)
            else: feed[name] = col.to_numpy(zero_copy_only=False).astype(np.float32 if typ == "tensor(float)" else np.float64).reshape(-1, 1)
        clock.add("build", w, c)
        n = table.num_rows
        for lo in range(0, n, 65536):
            t, c = time.perf_counter(), time.process_time()
            model.session.run(None, {k: v[lo:lo + 65536] for k, v in feed.items()})
            run_seconds += time.perf_counter() - t
            clock.add("score", t, c)
        rows += n
    return rows / (time.perf_counter() - start), rows / run_seconds, rows, clock.to_dict()


def ceiling_in_child(model_path: Path, data: Path) -> tuple[float, float, int, dict, float]:
    "The ceiling measured in a fresh process (its memory its own); also its peak resident set (MB)."
    import json, subprocess
    code = ("import json, resource, sys; sys.path.insert(0, %r); from pathlib import Path; import batch_bench as b; "
            "r = b.ceiling(Path(sys.argv[1]), Path(sys.argv[2])); "
            "print(json.dumps([*r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3]))") % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, str(model_path), str(data)], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


class ExistingCluster:
    "A `dask scheduler` and `dask worker --nworkers N --nthreads 1` on loopback, started and waited for here, stopped on exit."
    def __init__(self, n: int): self.n = n
    def __enter__(self):
        port, bin_dir = free_port(), Path(sys.executable).parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.address, quiet = f"tcp://127.0.0.1:{port}", dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet)]
        self.procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", self.address, "--nworkers", str(self.n), "--nthreads", "1",
                                            "--no-dashboard", "--host", "127.0.0.1"], cwd=tempfile.gettempdir(), **quiet))
        from dask.distributed import Client
        with Client(self.address, timeout=60) as c: c.wait_for_workers(self.n, timeout=120)
        time.sleep(1.0)                                   # let the workers' start-up settle before the clock starts
        return self
    def __exit__(self, *exc):
        for p in reversed(self.procs):
            try: os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError: pass
            try: p.wait(30)
            except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait()


WORKER_PHASES = ("imports", "session", "read", "check", "score", "build", "write")
CLIENT_PHASES = ("plan", "start", "setup", "scoring", "close", "summary")


def phase_rows(name: str, n: int, r, ceil_phases: dict, rows: int, ceil_rows: int) -> list[dict]:
    "The phases of one run: the client's wall seconds, the workers' summed wall and CPU seconds, the ceiling's CPU for these rows."
    scale = rows / ceil_rows
    busy = sum(r.worker_phases.get(k, {}).get("wall", 0.0) for k in WORKER_PHASES[2:])
    out = [{"run": name, "phase": k, "client wall s": r.phases.get(k)} for k in CLIENT_PHASES]
    for k in WORKER_PHASES:
        v = r.worker_phases.get(k, {"wall": 0.0, "cpu": 0.0})
        ceil = ceil_phases.get({"check": "build"}.get(k, k), {}).get("cpu") if k in ("read", "check", "score") else None
        out.append({"run": name, "phase": f"workers: {k}", "workers wall s": v["wall"], "workers CPU s": v["cpu"],
                    "ceiling CPU s": None if ceil is None else ceil * scale})
    out.append({"run": name, "phase": "workers: idle while scoring", "workers wall s": max(0.0, n * r.phases.get("scoring", 0.0) - busy)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default=None, help="a model reference (default: serve.model or the champion)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    # imported here, not at the top: a local cluster's fork server imports this script (its main module), as `mlnb`'s
    # would be, and results.py imports pandas, which the command does not
    from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)
    from mlnb.pipeline.batch import batch_predict, load_model
    from mlnb.core.config import load_config
    cfg = load_config("params.yaml")
    if args.model is None and not cfg.paths.registration.exists():
        sys.exit("no registered model: run `make run` first")
    model = load_model(cfg, args.model)
    model_path = model.path.resolve()
    data = dataset(args.rows)

    ceil, ort_only, rows, ceil_phases, ceil_mb = ceiling_in_child(model_path, data)
    print(f"\n{rows:,} rows x {len(model.contract.names)} inputs, model {model.name} v{model.version} ({model_path.stat().st_size / 1024:.0f} KiB)")
    print(f"{'run':<22}{'rows/s':>10}{'seconds':>9}{'workers MB':>12}{'client MB':>11}  vs ceiling")
    print(f"{'ceiling (1 session)':<22}{ceil:>10,.0f}{rows / ceil:>9.1f}{ceil_mb:>12.0f}{'':>11}  1.00")
    print(f"{'  session.run alone':<22}{ort_only:>10,.0f}{rows / ort_only:>9.1f}{'':>12}{'':>11}  {ort_only / ceil:.2f}")
    table = [{"run": "ceiling (1 session)", "rows/s": ceil, "seconds": rows / ceil, "workers MB": ceil_mb, "client MB": None, "vs ceiling": 1.0},
             {"run": "session.run alone", "rows/s": ort_only, "seconds": rows / ort_only, "workers MB": None, "client MB": None, "vs ceiling": ort_only / ceil}]
    results, phases = {}, []
    runs = [(n, False) for n in args.workers] + [(n, True) for n in args.workers]
    for n, existing in runs:
        out = Path(tempfile.mkdtemp(prefix=f"batch-bench-{n}-"))
        name = f"dask {n} worker" + ("s" if n > 1 else "") + (", existing scheduler" if existing else "")
        try:
            with (ExistingCluster(n) if existing else _nothing()) as cluster, PeakRss() as mem:
                t = time.perf_counter()
                r = batch_predict(model, data, out / "out", scheduler=cluster.address if existing else None, workers=n, progress=False)
                seconds = time.perf_counter() - t
        finally: shutil.rmtree(out, ignore_errors=True)
        assert r.scored == rows and r.bad == 0 and r.workers == n, r
        scoring_s = r.phases["scoring"]
        results[(n, existing)] = (rows / seconds, rows / scoring_s)
        print(f"{name:<22}{rows / seconds:>10,.0f}{seconds:>9.1f}{mem.children:>12.0f}{mem.own:>11.0f}  {rows / seconds / ceil:.2f} end to end "
              f"({r.pieces} pieces; start {r.phases.get('start', 0):.1f} s, setup {r.phases.get('setup', 0):.1f} s, close {r.phases.get('close', 0):.1f} s)")
        print(f"{'  scoring only':<22}{rows / scoring_s:>10,.0f}{scoring_s:>9.1f}{'':>12}{'':>11}  {rows / scoring_s / ceil:.2f} (goal >= {0.8 * n:.1f})")
        table += [{"run": f"{name}, end to end", "rows/s": rows / seconds, "seconds": seconds, "workers MB": mem.children, "client MB": mem.own,
                   "vs ceiling": rows / seconds / ceil},
                  {"run": f"{name}, scoring only", "rows/s": rows / scoring_s, "seconds": scoring_s, "workers MB": None, "client MB": None,
                   "vs ceiling": rows / scoring_s / ceil}]
        phases += phase_rows(name, n, r, ceil_phases, rows, rows)
    import pandas as pd
    ph = pd.DataFrame(phases)
    print("\nwhere the time goes (seconds; workers: summed over workers and pieces)")
    print(ph.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.2f}"))
    notes = [f"{rows:,} rows x {len(model.contract.names)} inputs in files of {FILE_ROWS:,} rows (row groups of 250,000), model {model.name} "
             f"v{model.version}; one ONNX Runtime thread per session; goal for N workers, scoring only: >= 0.8 x N of the ceiling",
             "ceiling CPU seconds: read = Parquet decoding, check = building the ONNX inputs (the ceiling checks nothing), score = session.run"]
    if (2, False) in results:
        whole, scoring = results[(2, False)]
        line = (f"2 workers / (2 x ceiling): scoring throughput {scoring / (2 * ceil):.2f} (goal >= 0.80), "
                f"end to end with the cluster's start {whole / (2 * ceil):.2f} (goal >= 0.70)")
        if (2, True) in results: line += f", end to end on an existing scheduler {results[(2, True)][0] / (2 * ceil):.2f} (goal >= 0.80)"
        line += f"; scoring vs 2 x session.run alone {scoring / (2 * ort_only):.2f}"
        print("\n" + line); notes.append(line)
    frame = pd.DataFrame(table)
    markdown = (frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=",.2f", missingval="")
                + "\n\nWhere the time goes (seconds; workers: summed over the workers and the pieces):\n\n"
                + ph.astype(object).where(ph.notna(), None).to_markdown(index=False, floatfmt=",.2f", missingval=""))
    write_results("batch", markdown, notes, {"rows": rows, "workers": args.workers, "table": frame.to_dict("records"),
                                              "phases": ph.to_dict("records"), "ceiling_phases": ceil_phases},
                  libraries=("dask", "distributed", "pyarrow"))


class _nothing:
    def __enter__(self): return None
    def __exit__(self, *exc): return False


if __name__ == "__main__":
    main()
