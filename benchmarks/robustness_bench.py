"""What robustness adds to the evaluate stage: `mlnb.evaluation.evaluate.evaluate` on the bundled outputs with `evaluate.robustness`
off (the baseline: metrics, curves, fairness, permutation importance) and on (the same plus `mlnb.evaluation.robustness`), alternating,
in one process. Wall and CPU seconds, median of the repeats; the difference is what the stage pays.

Needs the pipeline's outputs (`make run`). Usage: python benchmarks/robustness_bench.py [--repeats 3]
Goal: robustness adds at most ~10 s to the evaluate stage on 2 cores.
"""
from __future__ import annotations
import argparse, statistics, time

import joblib
import pandas as pd

from mlnb.core.config import load_config
from mlnb.data.schema import load_schema
from mlnb.evaluation.evaluate import evaluate
from mlnb.features.spec import FeatureSpec, Profile
from results import write_results  # the shared writer of benchmarks/results/ (this script's folder is on sys.path)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(repeats: int) -> None:
    cfg = load_config("params.yaml")
    paths = cfg.paths
    model, spec = joblib.load(paths.model), FeatureSpec.load(paths.feature_spec)
    test = pd.read_parquet(paths.split("test"))
    reference, schema = Profile.load(paths.reference_profile), load_schema(cfg.data.schema_path)
    settings = {"off": cfg.evaluate.model_copy(update={"robustness": cfg.evaluate.robustness.model_copy(update={"enabled": False})}),
                "on": cfg.evaluate}
    runs = {name: [] for name in settings}
    for _ in range(repeats):
        for name, ev in settings.items():
            runs[name].append(timed(lambda: evaluate(model, test, spec, ev, cfg.data.sensitive, cfg.project.seed, cfg.train.metric,
                                                     cfg.data.positive_class, reference, schema)))
    median = {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for name, r in runs.items()}
    (off_wall, off_cpu), (on_wall, on_cpu) = median["off"], median["on"]
    pipeline = getattr(model, "estimator", model)        # a FixedThresholdClassifier wraps the pipeline when a threshold was chosen
    print(f"test rows {len(test)}, model {type(pipeline[-1]).__name__}, robustness {cfg.evaluate.robustness.model_dump()}")
    print(f"{'':22}{'wall s':>8}{'cpu s':>8}")
    print(f"{'robustness off':22}{off_wall:8.2f}{off_cpu:8.2f}")
    print(f"{'robustness on':22}{on_wall:8.2f}{on_cpu:8.2f}")
    print(f"{'added':22}{on_wall - off_wall:8.2f}{on_cpu - off_cpu:8.2f}   (ratio on/off: wall {on_wall / off_wall:.2f}x, cpu {on_cpu / off_cpu:.2f}x)")
    write_results("robustness", [{"evaluate": "robustness off (baseline)", "wall s": off_wall, "cpu s": off_cpu},
                                 {"evaluate": "robustness on", "wall s": on_wall, "cpu s": on_cpu},
                                 {"evaluate": "added", "wall s": on_wall - off_wall, "cpu s": on_cpu - off_cpu}],
                  [f"ratio on/off (same run): wall {on_wall / off_wall:.2f}x, cpu {on_cpu / off_cpu:.2f}x",
                   f"test rows {len(test)}, model {type(pipeline[-1]).__name__}, median of {repeats} alternating repeats",
                   f"robustness settings: {cfg.evaluate.robustness.model_dump()}"],
                  {"repeats": repeats, "runs": runs, "robustness": cfg.evaluate.robustness.model_dump()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args().repeats)
