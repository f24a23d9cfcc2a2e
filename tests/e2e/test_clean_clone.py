"""A fresh clone's run leaves the repository clean: two `git clone`s of this repository at HEAD, each running the whole
pipeline (`dvc repro --force`, the bundled data, this venv, each clone's own mlnb on PYTHONPATH), write identical dvc.lock
files, byte-identical outputs file by file, and leave `git status` clean, so the committed dvc.lock is the one a clean
run produces. Run facts (timings, MLflow run ids) are written to `runs/`, git-ignored and hashed by nobody. Slow: two
full pipeline runs (about 3 min each on the shared 2-core machine)."""
import difflib
import subprocess

import pytest
import yaml

from conftest import ROOT, run, tool_env
from mlnb.pipeline.ci import ESCAPING_ENV, clone_committed, compare_outputs


def clone_and_run(dest) -> dict:
    "Clone HEAD into `dest`, run the pipeline there with the clone's own code; the lock it wrote."
    clone_committed(ROOT, dest)
    env = {k: v for k, v in tool_env().items() if k not in ESCAPING_ENV}
    env["PYTHONPATH"] = str(dest)
    run(["dvc", "repro", "--force"], dest, timeout=2400, env=env)
    return yaml.safe_load((dest / "dvc.lock").read_text())


def files_of(root, path) -> dict:
    p = root / path
    return {str(f.relative_to(root)): f.read_bytes() for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()))}


def differences(a, b, lock) -> list[str]:
    "Each output file whose bytes differ between the clones `a` and `b`, with the first lines of a text diff."
    out = []
    for row in compare_outputs(lock, lock):
        fa, fb = files_of(a, row["path"]), files_of(b, row["path"])
        for name in sorted(set(fa) | set(fb)):
            if fa.get(name) == fb.get(name): continue
            try:
                diff = difflib.unified_diff(fa.get(name, b"").decode().splitlines(), fb.get(name, b"").decode().splitlines(), lineterm="", n=0)
                out.append(f"{name}:\n" + "\n".join(list(diff)[2:12]))
            except UnicodeDecodeError:
                out.append(f"{name}: binary, {len(fa.get(name, b''))} vs {len(fb.get(name, b''))} bytes")
    return out


@pytest.mark.slow
def test_two_fresh_clones_write_the_same_lock_and_leave_git_status_clean(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    lock_a, lock_b = clone_and_run(a), clone_and_run(b)
    changed = [f"{r['stage']}: {r['path']}" for r in compare_outputs(lock_a, lock_b) if not r["equal"]]
    assert not changed and lock_a == lock_b, f"outputs differ between two clean runs: {changed}\n" + "\n".join(differences(a, b, lock_a))
    for clone in (a, b):
        status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True).stdout
        assert status == "", (f"git status after a fresh clone's run:\n{status}\n(the committed dvc.lock is not the one a clean run writes: "
                              f"re-run the pipeline from a fresh clone and commit it: `mlnb repro-check --update-lock`)\n"
                              + subprocess.run(["git", "diff", "--stat"], cwd=clone, capture_output=True, text=True).stdout)
    assert (a / "runs/train.json").exists() and (a / "runs/export.json").exists()      # the run facts went somewhere
    for f in ("runs/train.json", "runs/export.json"):
        assert subprocess.run(["git", "check-ignore", "-q", f], cwd=a).returncode == 0, f"{f} is not git-ignored"
