"""The export stage writes the same bytes from every process: the ONNX graph of one fitted pipeline, exported in
processes with different string-hash seeds (as two `dvc repro` runs are), is byte-identical and holds no run fact (no
git commit); the export's files carry no latency, which goes to `runs/export.json`. The whole pipeline, twice in two
fresh clones, is tests/e2e/test_clean_clone.py (slow)."""
import json
import subprocess
import sys

from conftest import tool_env

EXPORT = """
import hashlib, json, sys
from pathlib import Path
import onnx
from mlnb.core.config import ExportConfig, Paths
from mlnb.examples import TOY_SPEC, toy_frame
from mlnb.features.spec import model_frame
from mlnb.training.export import export
from mlnb.training.train import candidate_pipeline
df = toy_frame(400)
model = candidate_pipeline("rf", TOY_SPEC, 0).fit(model_frame(df, TOY_SPEC), df.churn)
result = export(model, df, TOY_SPEC, ExportConfig(), {"model_name": "toy"})
result.save(Paths())
print(json.dumps({"onnx": hashlib.sha256(Path("models/onnx/model.onnx").read_bytes()).hexdigest(),
                  "opsets": [o.domain for o in onnx.load("models/onnx/model.onnx").opset_import],
                  "metadata": {p.key: p.value for p in onnx.load("models/onnx/model.onnx").metadata_props}}))
"""


def export_in_a_process(cwd, hash_seed: int) -> dict:
    env = {**tool_env(), "PYTHONHASHSEED": str(hash_seed)}          # PYTHONPATH as given: the code under test
    p = subprocess.run([sys.executable, "-c", EXPORT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_onnx_graph_is_the_same_bytes_from_every_process(tmp_path):
    runs = []
    for seed in range(1, 9):
        (tmp_path / str(seed)).mkdir()
        runs.append(export_in_a_process(tmp_path / str(seed), seed))
    assert len({r["onnx"] for r in runs}) == 1, [r["opsets"] for r in runs]
    meta = runs[0]["metadata"]
    assert meta["model_name"] == "toy" and "git_commit" not in meta
    for seed in range(1, 9):
        files = sorted(str(p.relative_to(tmp_path / str(seed))) for p in (tmp_path / str(seed)).rglob("*") if p.is_file())
        assert "runs/export.json" in files
        report = json.loads((tmp_path / str(seed) / "models/onnx/export_report.json").read_text())
        assert all("single_row_us" not in v for v in report["variants"].values())      # a latency is a run fact
        facts = json.loads((tmp_path / str(seed) / "runs/export.json").read_text())
        assert set(facts["single_row_us"]) >= {"sklearn", "onnx"}
    exported = {(tmp_path / str(s) / "models/onnx/export_report.json").read_bytes() for s in range(1, 9)}
    assert len(exported) == 1                                                           # the report, byte for byte
