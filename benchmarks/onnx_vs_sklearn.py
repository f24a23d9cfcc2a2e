"""ONNX Runtime against the scikit-learn pipeline it was exported from, per candidate family.

Both are measured in this run, on this machine, on the bundled Telco data:
- single row: one request-shaped record (a dict) per call, median of many calls after warm-up;
  scikit-learn gets it as a one-row DataFrame (its native input), ONNX Runtime as one array per input;
- batch: the whole test split, and 100,000 rows resampled from it, one call each.
Goal: single-row ONNX at least 50x faster than scikit-learn.

Usage: python benchmarks/onnx_vs_sklearn.py [--repeats N]
"""
import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mlnb.core.config import load_config
from mlnb.data.ingest import clean, read_source, split_data, validate
from mlnb.data.schema import load_schema
from mlnb.model.onnx import OnnxModel
from mlnb.training.export import quantizable, quantize, single_row_latency, to_onnx
from mlnb.features.spec import feature_spec, model_frame
from mlnb.training.train import candidate_pipeline
from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
GOAL = 50


def best_of(fn, arg, runs=3):
    "Fastest of a few timed calls (seconds): batch timings are long enough that noise only adds."
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(arg); times.append(time.perf_counter() - t)
    return min(times)


def main(repeats: int):
    warnings.filterwarnings("ignore")
    cfg = load_config(ROOT / "params.yaml")
    schema = load_schema(ROOT / cfg.data.schema_path)
    df, _ = clean(validate(read_source(str(ROOT / cfg.data.source)), schema), schema)
    splits = split_data(df, cfg.data.target, cfg.data.task, cfg.data.split.valid, cfg.data.split.test, cfg.project.seed)
    spec = feature_spec(schema, cfg.features, cfg.data.target, cfg.data.task)
    train, test = splits["train"], splits["test"]
    X_test = model_frame(test, spec)
    X_big = X_test.sample(100_000, replace=True, random_state=0).reset_index(drop=True)
    record = X_test.iloc[:1].to_dict("records")
    print(f"data: {len(train)} training rows, {len(X_test)} test rows, {len(spec.inputs)} raw inputs; "
          f"ONNX Runtime on 1 intra-op thread, scikit-learn n_jobs=1\n")

    rows = []
    for family in cfg.train.candidates:
        model = candidate_pipeline(family, spec, cfg.project.seed).fit(model_frame(train, spec), train[spec.target])
        proto = to_onnx(model, spec)
        sources = {family: proto.SerializeToString()}
        variants = {family: OnnxModel(sources[family])}
        if quantizable(proto):
            tmp = ROOT / f".bench-{family}.onnx"
            tmp.write_bytes(proto.SerializeToString())
            quantize(tmp, tmp.with_suffix(".int8.onnx"))
            sources[f"{family} int8"] = tmp.with_suffix(".int8.onnx").read_bytes()
            variants[f"{family} int8"] = OnnxModel(sources[f"{family} int8"])
            tmp.unlink(); tmp.with_suffix(".int8.onnx").unlink()
        sk_row = single_row_latency(lambda r: model.predict_proba(pd.DataFrame(r)), record, repeats=max(repeats // 4, 25))
        sk_test, sk_big = best_of(model.predict_proba, X_test), best_of(model.predict_proba, X_big, runs=1)
        for name, onnx_model in variants.items():
            feed = onnx_model.feed_records(record)
            on_row = single_row_latency(onnx_model.run_records, record, repeats=repeats)
            on_runtime = single_row_latency(lambda f: onnx_model.session.run(None, f), feed, repeats=repeats)
            on_test, on_big = best_of(onnx_model.run, X_test), best_of(onnx_model.run, X_big, runs=1)
            on_big2 = best_of(OnnxModel(sources[name], threads=2).run, X_big, runs=1)
            rows.append({"model": name, "sklearn 1-row µs": sk_row * 1e6, "onnx 1-row µs": on_row * 1e6,
                         "onnx run() only µs": on_runtime * 1e6, "1-row speed-up": sk_row / on_row,
                         f"sklearn {len(X_test)} rows ms": sk_test * 1e3, f"onnx {len(X_test)} rows ms": on_test * 1e3,
                         "batch speed-up": sk_test / on_test,
                         "sklearn 100k rows/s": len(X_big) / sk_big, "onnx 100k rows/s": len(X_big) / on_big,
                         "onnx 2 threads 100k rows/s": len(X_big) / on_big2})
    table = pd.DataFrame(rows).set_index("model")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:,.1f}".format):
        print(table)
    worst = table["1-row speed-up"].min()
    summary = (f"single-row speed-up: min {worst:.0f}x, median {table['1-row speed-up'].median():.0f}x "
               f"(goal >= {GOAL}x: {'met' if worst >= GOAL else 'NOT met'})")
    print("\n" + summary)
    write_results("onnx_vs_sklearn", table.reset_index(),
                  [f"{len(train)} training rows, {len(X_test)} test rows, {len(spec.inputs)} raw inputs; ONNX Runtime on 1 intra-op thread "
                   f"(and 2 where stated), scikit-learn n_jobs=1; {repeats} single-row calls per ONNX measurement", summary],
                  {"repeats": repeats, "goal_speed_up": GOAL}, libraries=("skl2onnx",), floatfmt=",.1f")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=500, help="single-row calls per measurement")
    main(parser.parse_args().repeats)
