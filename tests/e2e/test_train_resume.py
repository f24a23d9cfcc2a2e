"""A training run killed with SIGKILL (the train stage's kernel, at a known checkpoint) resumes from its checkpoints and ends
with the model an uninterrupted run produces."""
import json

import joblib
import numpy as np
import pandas as pd
import pytest

from conftest import copy_project, run, set_params, tool_env
from mlnb.features.spec import FeatureSpec, model_frame
from mlnb.training.train import pipeline_of


def train_stage(project, failpoint: str | None = None):
    env = {**tool_env(), **({"MLNB_FAILPOINT": failpoint} if failpoint else {})}
    return run(["mlnb", "stage", "03_train"], project, check=failpoint is None, env=env)


def checkpoint_dir(project):
    (d,) = (project / "models/.checkpoints").iterdir()
    return d


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_checkpoints_to_the_identical_model(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, {"data": {"sample_rows": 1500},
                         "train": {"candidates": ["hgb", "rf"], "n_iter": 1, "cv_folds": 2, "n_jobs": 1, "checkpoint_every": 10}})
    run(["dvc", "repro", "featurize"], project)

    killed = train_stage(project, "train:family:rf")                 # both searches done, then SIGKILL
    assert killed.returncode != 0 and not (project / "models/model.joblib").exists()
    ck = checkpoint_dir(project)
    assert sorted(p.name for p in ck.iterdir()) == ["family-hgb.joblib", "family-rf.joblib"]
    searched = {f: joblib.load(ck / f"family-{f}.joblib").fit_seconds for f in ("hgb", "rf")}

    killed = train_stage(project, "train:final:20")                  # 20 trees / iterations into the final fit
    assert killed.returncode != 0 and not (project / "models/model.joblib").exists()
    assert joblib.load(ck / "final.joblib")["done"] == 20

    train_stage(project)                                              # resumes
    facts = json.loads((project / "runs/train.json").read_text())    # the run facts (fit seconds are not in the DVC-tracked leaderboard)
    assert {c["family"]: c["fit_seconds"] for c in facts["candidates"]} == {f: round(s, 2) for f, s in searched.items()}   # not searched again
    assert not ck.exists()                                            # cleared once training finished
    spec = FeatureSpec.load(project / "features/feature_spec.json")
    test = model_frame(pd.read_parquet(project / "data/processed/test.parquet"), spec)
    resumed = joblib.load(project / "models/model.joblib")
    resumed_scores = resumed.predict_proba(test)

    (project / "models/model.joblib").unlink()
    train_stage(project)                                              # the same run, never interrupted
    uninterrupted = joblib.load(project / "models/model.joblib")
    assert np.array_equal(resumed_scores, uninterrupted.predict_proba(test))
    assert np.array_equal(resumed.predict(test), uninterrupted.predict(test)) and resumed.threshold == uninterrupted.threshold
    assert pipeline_of(resumed).named_steps["model"].get_params() == pipeline_of(uninterrupted).named_steps["model"].get_params()
