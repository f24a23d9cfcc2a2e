"""Drift check speed and memory: `mlnb.stats.drift` against SciPy on the raw columns, at 10k, 100k and 1M rows x 20 columns.

Reference and current are synthetic Telco-like data of equal size (`mlnb.data.ingest.synthesize`), the current with a 0.5 SD shift in tenure.
Each measurement runs in a fresh process. Memory is the process's resident set (sampled every 2 ms from /proc), so
Arrow's and NumPy's allocations both count:
- `mlnb`: `drift_report` on a DataFrame already in memory (the reference profile built beforehand, as it is saved with a model);
  "extra" is the peak above the resident size before the check.
- `mlnb-parquet`: `drift_report` reading the current window from 10 Parquet files batch by batch; the data is never in
  memory whole, so the process's whole peak is reported.
- `scipy`: the same tests computed the usual way on the raw columns (`wasserstein_distance`, `ks_2samp`,
  `jensenshannon`/`chi2_contingency` on value counts), the baseline.

Usage: python benchmarks/drift_bench.py [--sizes 10000 100000 1000000]
Goal: 1M rows in <= 2 s with peak memory <= 500 MB.
"""
from __future__ import annotations
import argparse, json, subprocess, sys, tempfile, time
from pathlib import Path

from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)
from memory import PeakRss, rss_mb  # the shared memory figures (this script's folder is on sys.path)





def scipy_check(ref, cur) -> list[str]:
    "The same per-column decisions computed directly on the raw columns."
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency, ks_2samp, wasserstein_distance
    from mlnb.features.spec import column_kind
    drifted = []
    for c in ref.columns:
        r, k = ref[c].dropna(), cur[c].dropna()
        kind = column_kind(ref[c])
        if kind == "numeric":
            if len(r) <= 1000: hit = ks_2samp(r, k).pvalue < 0.05
            else: hit = wasserstein_distance(r, k) / np.std(r) >= 0.1
        else:
            a, b = r.astype(str).value_counts(), k.astype(str).value_counts()
            keys = sorted(set(a.index) | set(b.index))
            a, b = a.reindex(keys, fill_value=0).to_numpy(float), b.reindex(keys, fill_value=0).to_numpy(float)
            hit = chi2_contingency(np.vstack([a, b]))[1] < 0.05 if len(r) <= 1000 else jensenshannon(a / a.sum(), b / b.sum()) >= 0.1
        if hit: drifted.append(c)
    return drifted


def prepare(rows: int, where: Path) -> None:
    "In its own process: the reference profile (saved, as with a model) and the current window as 10 Parquet files."
    from mlnb.features.spec import Profile
    from mlnb.data.ingest import synthesize
    ref = synthesize(rows, seed=1)
    started = time.perf_counter(); Profile.from_frame(ref).save(where / "profile.json")
    (where / "profile_seconds").write_text(str(time.perf_counter() - started))
    cur, step = synthesize(rows, seed=2, shift={"tenure": 0.5}), -(-rows // 10)
    for i in range(10): cur.iloc[i * step:(i + 1) * step].to_parquet(where / f"part-{i:02d}.parquet", index=False)


def one(rows: int, method: str, where: Path) -> dict:
    import scipy.spatial.distance, scipy.stats, statsmodels.stats.proportion  # noqa: F401 (imported before the clock starts, for both)
    from mlnb.features.spec import Profile
    from mlnb.stats.drift import drift_report
    from mlnb.data.ingest import synthesize
    profile, profile_s = Profile.load(where / "profile.json"), float((where / "profile_seconds").read_text())
    if method == "mlnb-parquet": current = sorted(where.glob("part-*.parquet"))
    else:
        import pandas as pd
        current = pd.concat([pd.read_parquet(p) for p in sorted(where.glob("part-*.parquet"))], ignore_index=True)
        if method == "scipy": ref = synthesize(rows, seed=1)
    before = rss_mb()
    with PeakRss() as peak:
        started = time.perf_counter()
        drifted = scipy_check(ref, current) if method == "scipy" else drift_report(profile, current).drifted_columns
        seconds = time.perf_counter() - started
    return {"rows": rows, "method": method, "seconds": seconds, "profile_seconds": profile_s, "rss_before_mb": before,
            "peak_mb": peak.peak, "extra_mb": peak.peak - before, "drifted": drifted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare: return prepare(int(args.prepare[0]), Path(args.prepare[1]))
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], Path(args.one[2])))); return
    results = []
    for rows in args.sizes:
        with tempfile.TemporaryDirectory(prefix="mlnb-drift-") as where:
            subprocess.run([sys.executable, __file__, "--prepare", str(rows), where], check=True)
            for method in ("mlnb", "mlnb-parquet", "scipy"):
                out = subprocess.run([sys.executable, __file__, "--one", str(rows), method, where], capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1]); results.append(r)
                print(f"{rows:>9,d} rows  {method:13s} {r['seconds']:7.3f} s  peak {r['peak_mb']:7.1f} MB (+{r['extra_mb']:6.1f} MB during the check)"
                      f"  drifted {r['drifted']}  [profile built in {r['profile_seconds']:.2f} s]", flush=True)
    by = {(r["rows"], r["method"]): r for r in results}
    print("\nratios (same run): scipy seconds / mlnb seconds")
    notes = []
    for rows in args.sizes:
        line = (f"{rows:>9,d} rows: in memory {by[rows, 'scipy']['seconds'] / by[rows, 'mlnb']['seconds']:6.1f}x   "
                f"from Parquet {by[rows, 'scipy']['seconds'] / by[rows, 'mlnb-parquet']['seconds']:6.1f}x")
        print("  " + line); notes.append("scipy seconds / mlnb seconds (same run), " + " ".join(line.split()))
    top = max(args.sizes)
    if top >= 1_000_000:
        m, p = by[top, "mlnb"], by[top, "mlnb-parquet"]
        goals = [f"{'met ' if m['seconds'] <= 2 else 'MISSED'}  check in <= 2 s (in memory: {m['seconds']:.2f} s; from Parquet: {p['seconds']:.2f} s)",
                 f"{'met ' if p['peak_mb'] <= 500 else 'MISSED'}  peak memory <= 500 MB (from Parquet, whole process: {p['peak_mb']:.0f} MB; "
                 f"in memory, above the data: +{m['extra_mb']:.0f} MB)"]
        print("\ngoals (1M rows x 20 columns):")
        for g in goals: print("  " + g)
        notes += [f"goal (1M rows x 20 columns) {' '.join(g.split())}" for g in goals]
    table = [{"rows": r["rows"], "method": r["method"], "seconds": r["seconds"], "peak MB": r["peak_mb"], "extra MB during the check": r["extra_mb"],
              "profile built s": r["profile_seconds"], "drifted": ", ".join(r["drifted"])} for r in results]
    write_results("drift", table, notes, {"sizes": args.sizes, "results": results}, libraries=("scipy", "pyarrow"), floatfmt=",.3f")


if __name__ == "__main__":
    main()
