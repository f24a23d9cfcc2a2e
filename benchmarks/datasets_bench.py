"""The whole pipeline on data sets mlnb has never seen, against a default HistGradientBoosting baseline.

For each data set of `mlnb.data.datasets.demo_datasets()` (binary without sensitive attributes, imbalanced binary,
multiclass, regression, wide with a 5,000-level categorical and a date, 100,000 rows) this script

1. makes a fresh project in a temporary directory (the pipeline files of this repository, no data, no schema),
2. runs `mlnb init DATA --target ...` there, then `dvc repro` one stage at a time, timing each stage and
   recording the peak resident memory of its largest process,
3. reads the test score from `metrics/evaluate.json`,
4. fits, in the same run and on the same train + valid rows, scikit-learn's default `HistGradientBoosting*` with
   native categorical support (string columns with at most 255 levels; wider ones and declared ids are left out,
   as the estimator cannot take them) and scores it on the same test rows.

It prints a table and writes it to benchmarks/results/datasets.md (and .json) for the docs.

    python benchmarks/datasets_bench.py [--scale 1.0] [--only NAME ...] [--keep DIR]

Goals (issue 15): every data set completes with an approved champion; test ROC-AUC >= baseline - 0.005 (classification), RMSE <= 1.02 x baseline
(regression); the wide data set's whole `dvc repro` <= 3 min with peak RSS <= 2 GB; 100,000 rows <= 5 min.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mlnb.core.config import load_config  # noqa: E402
from mlnb.data.datasets import demo_datasets  # noqa: E402
from mlnb.data.schema import load_schema  # noqa: E402
from results import write_results  # noqa: E402 (the shared writer of benchmarks/results/)

BIN = Path(sys.executable).parent
STAGES = ["ingest", "featurize", "train", "evaluate", "export", "register"]
TEMPLATE = ["nbs", "mlnb", "data/feedback", "registry/users.yaml", "dvc.yaml", "params.yaml", "pyproject.toml",
            ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"]
GOALS = {"wide_loans": {"seconds": 180, "rss_mb": 2048}, "large_table": {"seconds": 300}}


def env() -> dict:
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def sh(cmd: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    "Run `cmd`; return wall seconds, peak RSS (MiB) of its largest process (itself or a descendant), and the result."
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), "")
    return seconds, usage.ru_maxrss / 1024, result


def new_project(dest: Path) -> Path:
    for rel in TEMPLATE:
        src, target = ROOT / rel, dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir(): shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        elif src.exists(): shutil.copy2(src, target)
    (dest / "data/raw").mkdir(parents=True, exist_ok=True)
    (dest / "schema").mkdir(exist_ok=True)
    return dest


def baseline(project: Path, target: str, task: str) -> dict:
    "Default HistGradientBoosting with native categorical support, fitted on train + valid, scored on test."
    from sklearn import metrics
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    cfg = load_config(project / "params.yaml")
    schema = load_schema(project / cfg.data.schema_path)
    ids = set(schema.columns) - set(schema.feature_columns)
    split = {n: pd.read_parquet(project / cfg.paths.split(n)) for n in ("train", "valid", "test")}
    fit_df, test_df = pd.concat([split["train"], split["valid"]], ignore_index=True), split["test"]
    columns, categorical = [], []
    for c in fit_df.columns:
        if c == target or c in ids: continue
        if fit_df[c].dtype == object or pd.api.types.is_string_dtype(fit_df[c]):
            if fit_df[c].nunique() > 255: continue
            categorical.append(c)
        columns.append(c)
    X, Xt = fit_df[columns].copy(), test_df[columns].copy()
    for c in categorical:
        cats = pd.CategoricalDtype(sorted(fit_df[c].dropna().astype(str).unique()))
        X[c], Xt[c] = X[c].astype(str).where(X[c].notna()).astype(cats), Xt[c].astype(str).where(Xt[c].notna()).astype(cats)
    model = (HistGradientBoostingRegressor if task == "regression" else HistGradientBoostingClassifier)(
        categorical_features="from_dtype", random_state=0)
    start = time.perf_counter()
    model.fit(X, fit_df[target])
    seconds = time.perf_counter() - start
    if task == "regression":
        score = metrics.root_mean_squared_error(test_df[target], model.predict(Xt))
    elif task == "binary":
        positive = model.classes_[1]
        score = metrics.roc_auc_score(test_df[target] == positive, model.predict_proba(Xt)[:, 1])
    else:
        score = metrics.roc_auc_score(test_df[target], model.predict_proba(Xt), multi_class="ovr", labels=model.classes_)
    return {"score": float(score), "fit_seconds": seconds, "left_out": sorted(set(fit_df.columns) - set(columns) - {target})}


def run_one(ds, root: Path) -> dict:
    project = new_project(root / ds.name)
    data = ds.write(project / f"data/raw/{ds.name}.csv")
    row = {"data set": ds.name, "task": ds.task, "rows": len(ds.frame), "columns": ds.frame.shape[1]}
    seconds, rss, r = sh([str(BIN / "mlnb"), "init", str(data.relative_to(project)), *ds.init_args(), "--force"], project)
    if r.returncode != 0: return {**row, "error": f"mlnb init failed:\n{r.stdout[-3000:]}"}
    sh(["git", "init", "-q"], project)
    row["stages"], row["peak_rss_mb"] = {}, 0.0
    for stage in STAGES:
        seconds, rss, r = sh([str(BIN / "dvc"), "repro", "--single-item", stage], project)
        row["stages"][stage] = round(seconds, 1)
        row["peak_rss_mb"] = max(row["peak_rss_mb"], round(rss))
        print(f"  {ds.name:14s} {stage:10s} {seconds:7.1f} s  {rss:7.0f} MiB", flush=True)
        if r.returncode != 0: return {**row, "error": f"stage {stage} failed:\n{r.stdout[-3000:]}"}
    row["total_seconds"] = round(sum(row["stages"].values()), 1)
    paths = load_config(project / "params.yaml").paths
    ev = json.loads((project / paths.evaluate_metrics).read_text())
    board = json.loads((project / paths.leaderboard).read_text())
    metric = "rmse" if ds.task == "regression" else "roc_auc"
    row.update(metric=metric, score=ev[metric], selected=board.get("selected"), threshold=board.get("threshold"),
               registration=json.loads((project / paths.registration).read_text()).get("status"))
    row["baseline"] = baseline(project, ds.target, ds.task)
    return row


def verdict(row: dict) -> list[str]:
    "What misses its goal (empty: every goal met)."
    if "error" in row: return ["did not complete"]
    misses, base = [], row["baseline"]["score"]
    if row["registration"] != "approved": misses.append(f"no champion (version {row['registration']})")
    if row["metric"] == "rmse" and row["score"] > 1.02 * base: misses.append(f"rmse {row['score']:.4f} > 1.02 x {base:.4f}")
    if row["metric"] == "roc_auc" and row["score"] < base - 0.005: misses.append(f"roc_auc {row['score']:.4f} < {base:.4f} - 0.005")
    goal = GOALS.get(row["data set"], {})
    if "seconds" in goal and row["total_seconds"] > goal["seconds"]: misses.append(f"{row['total_seconds']:.0f} s > {goal['seconds']} s")
    if "rss_mb" in goal and row["peak_rss_mb"] > goal["rss_mb"]: misses.append(f"{row['peak_rss_mb']:.0f} MiB > {goal['rss_mb']} MiB")
    return misses


def table(rows: list[dict]) -> str:
    head = ("| data set | task | rows × cols | " + " | ".join(STAGES) + " | total s | peak RSS MiB | selected | metric | mlnb | "
            "baseline | vs baseline | baseline fit s | goals |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data set']} | {r['task']} | {r['rows']:,} × {r['columns']} | failed: " + r["error"].splitlines()[0] + " |")
            continue
        b = r["baseline"]["score"]
        versus = f"× {r['score'] / b:.4f}" if r["metric"] == "rmse" else f"Δ {r['score'] - b:+.4f}"
        lines.append(f"| {r['data set']} | {r['task']} | {r['rows']:,} × {r['columns']} | "
                     + " | ".join(f"{r['stages'][s]:.1f}" for s in STAGES)
                     + f" | {r['total_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['selected']} | {r['metric']} | {r['score']:.4f} | "
                     f"{b:.4f} | {versus}"
                     + f" | {r['baseline']['fit_seconds']:.1f} | {'met' if not verdict(r) else '; '.join(verdict(r))} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="row count factor (1.0: the sizes the goals are stated for)")
    ap.add_argument("--only", nargs="*", help="data set names to run")
    ap.add_argument("--keep", type=Path, help="keep the projects in this directory")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/datasets")
    args = ap.parse_args()
    suite = [d for d in demo_datasets(args.scale) if not args.only or d.name in args.only]
    root = args.keep or Path(tempfile.mkdtemp(prefix="mlnb-datasets-"))
    rows = []
    try:
        for ds in suite:
            print(f"{ds.name}: {ds.note}", flush=True)
            rows.append(run_one(ds, root))
            if "error" in rows[-1]: print(rows[-1]["error"], flush=True)
    finally:
        if not args.keep: shutil.rmtree(root, ignore_errors=True)
    text = table(rows)
    print("\n" + text)
    failed = [r["data set"] for r in rows if verdict(r)]
    write_results(args.out.name, text, [f"scale {args.scale}: {len(rows) - len(failed)} of {len(rows)} data sets meet every goal"],
                  {"scale": args.scale, "rows": rows}, libraries=("dvc", "mlflow"), out_dir=args.out.parent)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} data sets meet every goal" + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
