"""NannyML's side of benchmarks/estimation_bench.py, run with `.venv-nannyml/bin/python` (make bench-nannyml-env); it imports
nothing from mlnb.

A small server on pipes: one JSON request a line on standard input, one JSON answer a line on the original standard output
(whatever NannyML prints goes to standard error). Data comes as Parquet files that the benchmark writes in a temporary folder.
  {"cmd": "fit", "task": "binary" | "multiclass" | "regression", "reference": PATH, "classes": [...], "features": [...]}
      CBPE (binary, multiclass: ROC-AUC and accuracy) or DLE (regression: MAE and RMSE; LightGBM without tuning), one
      chunk = the whole data set (chunk_number=1), fitted on the reference.
  {"cmd": "estimate", "window": PATH, "repeats": N}   -> the estimates, their bounds, the fastest of N calls' seconds and
      the resident memory above the start
  {"cmd": "quit"}
Columns: binary `p` (positive probability), multiclass `p_<class>`, `y_pred` (the model's decision), `y` (reference only),
regression `y_pred` and the feature columns.
"""
from __future__ import annotations
import json, os, sys, time
from memory import PeakRss, rss_mb  # the shared memory figures (this script's folder is on sys.path)

os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"       # no usage analytics (there is no network here anyway)




def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1); sys.stdout = sys.stderr             # NannyML's banners and warnings to stderr, answers to `out`
    import warnings; warnings.filterwarnings("ignore")
    import nannyml as nml, pandas as pd, numpy as np
    est, metrics = None, []
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit": break
        try:
            if req["cmd"] == "fit":
                task = req["task"]
                ref = pd.read_parquet(req["reference"])
                chunker = nml.chunk.CountBasedChunker(chunk_number=1)
                if task == "regression":
                    metrics = ["mae", "rmse"]
                    est = nml.DLE(feature_column_names=req["features"], y_pred="y_pred", y_true="y", metrics=metrics,
                                  chunker=chunker, tune_hyperparameters=False)
                else:
                    metrics = ["roc_auc", "accuracy"]
                    proba = "p" if task == "binary" else {c: f"p_{c}" for c in req["classes"]}
                    est = nml.CBPE(problem_type=f"classification_{task}", y_pred_proba=proba, y_pred="y_pred", y_true="y",
                                   metrics=metrics, chunker=chunker)
                before = rss_mb()
                with PeakRss() as peak:
                    started = time.perf_counter(); est.fit(ref); seconds = time.perf_counter() - started
                answer = {"seconds": seconds, "extra_mb": peak.peak - before, "version": nml.__version__}
            elif req["cmd"] == "estimate":
                window = pd.read_parquet(req["window"])
                before, seconds = rss_mb(), []
                with PeakRss() as peak:
                    for _ in range(int(req.get("repeats", 1))):          # the fastest of a few calls: the least disturbed
                        started = time.perf_counter()
                        result = est.estimate(window)
                        seconds.append(time.perf_counter() - started)
                        if sum(seconds) > 20: break                         # ... unless they are slow anyway
                seconds = min(seconds)
                frame = result.filter(period="analysis").to_df()
                answer = {"seconds": seconds, "extra_mb": peak.peak - before, "rss_mb": peak.peak, "rows": len(window)}
                for m in metrics:
                    row = frame[m].iloc[0]
                    answer[m] = {"value": float(row["value"]), "sampling_error": float(row["sampling_error"]),
                                 "lower": _num(row.get("lower_confidence_boundary")), "upper": _num(row.get("upper_confidence_boundary"))}
                del window, result, frame
            else: raise ValueError(f"unknown command {req['cmd']!r}")
        except Exception as e:                        # the benchmark reports it and goes on without NannyML's figure
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")


def _num(v):
    try: return None if v is None or v != v else float(v)
    except (TypeError, ValueError): return None


if __name__ == "__main__":
    main()
