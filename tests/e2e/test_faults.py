"""Faults, each a test: the server killed mid-burst, `dvc repro` killed mid-stage, a full or read-only log disk, and a registry
that cannot be reached when the server starts."""
import errno
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from mlnb.predlog.log import read_log
from serving import Server, metric, serve_params

FLUSH_SECONDS = 0.5       # the prediction log's flush interval in these tests
WRITE_MARGIN = 0.5        # time allowed for the writer's own Parquet write (twice: the one in progress, then ours) on a loaded machine


class Burst:
    "Client threads sending single-row predictions until stopped; each answered prediction id with the time it was answered."
    def __init__(self, url: str, records: list, threads: int = 4):
        self.url, self.records, self.stop_event = url, records, threading.Event()
        self.answered: list[tuple[str, float]] = []
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._send, args=(k,), daemon=True) for k in range(threads)]

    def _send(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = k
            while not self.stop_event.is_set():
                try: r = c.post("/invocations", json={"dataframe_records": [self.records[i % len(self.records)]]})
                except httpx.TransportError: return                     # the server is gone
                self.statuses.append(r.status_code)
                if r.status_code == 200: self.answered.append((r.json()["predictions"][0]["prediction_id"], time.time()))
                i += len(self.threads)

    def __enter__(self) -> "Burst":
        for t in self.threads: t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads: t.join(60)


def parquet_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("date=*/*.parquet"))


def assert_log_is_clean(directory: Path) -> None:
    "Every file a reader sees opens whole; anything else is a hidden temporary file readers skip."
    for f in parquet_files(directory): pq.read_table(f)
    others = [p for p in directory.rglob("*") if p.is_file() and p.suffix != ".parquet" and p.name != ".id-key"]   # the id key: 0600
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in others), others


# ---------------------------------------------------------------------------------------------------------------- SIGKILL / SIGTERM

def test_sigkill_mid_burst_loses_at_most_the_last_flush_interval(model_dir, records, tmp_path):
    directory, keys = model_dir
    logs = tmp_path / "logs/predictions"
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs", prediction_log={"flush_seconds": FLUSH_SECONDS})).wait_ready()
    with Burst(s.url, records) as burst:
        time.sleep(3.0)                                                # several flush intervals of sustained load
        killed_at = time.time()
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(30)
    s.client.close()
    assert s.proc.returncode == -signal.SIGKILL and len(burst.answered) > 100
    assert_log_is_clean(logs)
    logged = set(read_log(logs, columns=["prediction_id"])["prediction_id"])
    bound = killed_at - FLUSH_SECONDS - WRITE_MARGIN
    old = [i for i, at in burst.answered if at < bound]
    assert old and [i for i in old if i not in logged] == []            # all but the last flush interval is on disk
    lost = [at for i, at in burst.answered if i not in logged]
    print(f"SIGKILL: {len(burst.answered)} answered, {len(logged)} logged, {len(lost)} lost "
          f"(oldest lost answered {killed_at - min(lost, default=killed_at):.3f} s before the kill; bound {FLUSH_SECONDS + WRITE_MARGIN} s)")

    whole = parquet_files(logs)[-1]                                      # a file torn by a kill mid-write, as the killed server would leave it
    torn = whole.parent / f".predictions-20990101T000000000000-{s.proc.pid}-999999.parquet.tmp"
    torn.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert len(read_log(logs)) == len(logged)                            # invisible to readers
    again = Server(tmp_path / "again", serve_params(directory, keys, tmp_path / "logs", prediction_log={"flush_seconds": FLUSH_SECONDS})).wait_ready()
    try: wait_for(lambda: not torn.exists(), what="the restarted writer to remove the dead writer's temporary file")
    finally: again.stop()


def test_sigterm_mid_burst_loses_nothing(model_dir, records, tmp_path):
    directory, keys = model_dir
    logs = tmp_path / "logs/predictions"
    s = Server(tmp_path, serve_params(directory, keys, tmp_path / "logs", prediction_log={"flush_seconds": 30})).wait_ready()
    with Burst(s.url, records) as burst:
        time.sleep(2.0)
        code = s.stop()                                                 # SIGTERM while the clients keep sending
    assert code in (0, -signal.SIGTERM), s.stderr()[-2000:]
    assert len(burst.answered) > 50
    assert_log_is_clean(logs)
    log = read_log(logs, columns=["prediction_id"])
    assert set(i for i, _ in burst.answered) <= set(log["prediction_id"]) and log["prediction_id"].is_unique


# ---------------------------------------------------------------------------------------------------------------- a full or read-only log disk

@pytest.fixture
def small_disk(tmp_path):
    "A 256 KiB tmpfs mounted for the test (we run as root), unmounted afterwards."
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)], check=True)
    try: yield mountpoint
    finally: subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(disk: Path) -> Path:
    "Fill `disk` to the last byte; the file that did it."
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True: f.write(b"\0" * 4096)
        except OSError as e: assert e.errno == errno.ENOSPC, e
    return filler


def wait_for(condition, timeout: float = 30, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition(): return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def serve_some(s: Server, records: list, n: int) -> list[str]:
    "n single-row predictions, every one answered 200; their ids."
    ids = []
    for i in range(n):
        r = s.client.post("/invocations", json={"dataframe_records": [records[i % len(records)]]})
        assert r.status_code == 200, r.text
        ids.append(r.json()["predictions"][0]["prediction_id"])
    return ids


def test_a_full_or_read_only_log_disk_is_counted_and_logged_and_serving_continues(model_dir, records, small_disk, tmp_path):
    directory, keys = model_dir
    logs = small_disk / "predictions"
    params = serve_params(directory, keys, tmp_path / "logs", prediction_log={"dir": str(logs), "flush_seconds": 0.2})
    s = Server(tmp_path / "work", params).wait_ready()
    errors = lambda: metric(s, "mlnb_prediction_log_write_errors_total", log="predictions")
    try:
        written = serve_some(s, records, 20)
        wait_for(lambda: set(written) <= set(read_log(logs)["prediction_id"]), what="the first file")
        assert errors() == 0

        filler = fill(small_disk)                                          # disk full: ENOSPC
        serve_some(s, records, 50)
        wait_for(lambda: errors() >= 1, what="a counted write error")
        assert "No space left on device" in s.stderr() and "prediction log: could not write" in s.stderr()
        assert_log_is_clean(logs)
        assert not [p for p in logs.rglob(".*.tmp")]                       # the failed write's temporary file is gone

        filler.unlink()                                                    # space returns: the writer writes again
        after_full = serve_some(s, records, 20)
        wait_for(lambda: set(after_full) <= set(read_log(logs)["prediction_id"]), what="writes after space returned")
        full_errors = errors()

        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)   # unwritable: EROFS
        serve_some(s, records, 50)
        wait_for(lambda: errors() > full_errors, what="a counted write error on the read-only disk")
        assert "Read-only file system" in s.stderr()
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        after_ro = serve_some(s, records, 20)
        wait_for(lambda: set(after_ro) <= set(read_log(logs)["prediction_id"]), what="writes after the disk became writable")
        assert_log_is_clean(logs)
        assert not [p for p in logs.rglob(".*.tmp")]
        assert metric(s, "mlnb_requests_total", outcome="ok") == 160 and metric(s, "mlnb_requests_total", outcome="server_error") == 0
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------------------- a registry that cannot be reached

def ready_body(s: Server) -> dict:
    r = s.client.get("/v2/health/ready")
    assert r.status_code == 200, r.text                                    # serving, whatever the registry's state
    return r.json()


def registry_params(env: dict, url: str, cache: Path, work: Path) -> dict:
    return {**env, "train": {**env["train"], "tracking_uri": url},
            "serve": {**env.get("serve", {}), "model": "churn@champion", "reload_poll_seconds": 0.5, "model_cache_dir": str(cache),
                      "prediction_log": {"dir": str(work / "logs/p"), "feedback_dir": str(work / "logs/f")}}}


@pytest.mark.slow
def test_a_registry_unreachable_at_start_serves_the_last_verified_version_until_it_answers(onnx_models, telco_split, records, tmp_path):
    from registration import make_env, register, registry_as
    from tracking import free_port, running_mlflow
    from mlnb.core.config import config_from_dict
    _, split = telco_split
    env, cache, port = make_env(tmp_path / "registry"), tmp_path / "cache", free_port()
    backend, artifacts = f"sqlite:///{tmp_path / 'tracking.db'}", tmp_path / "artifacts"
    predict = lambda s: s.client.post("/invocations", json={"dataframe_records": records[:2]})

    with running_mlflow(backend, artifacts, port) as url:                 # the registry up: fetched, verified, recorded
        env["train"]["tracking_uri"] = url
        v1, _ = register(env, onnx_models["a"], split["test"])
        registry_as(env, "ann").approve(v1.version, "reviewed")
        registry_as(env, "adam").promote(v1.version, reason="first champion")
        s = Server(tmp_path / "first", registry_params(env, url, cache, tmp_path / "first")).wait_ready()
        try:
            assert ready_body(s) == {"ready": True, "reload": {"ready": True}}
            assert predict(s).json()["model_version"] == v1.version and metric(s, "mlnb_registry_reachable", model="churn") == 1
        finally: s.stop()
    record = json.loads((cache / "churn/verified-champion.json").read_text())
    assert record["version"] == v1.version and (cache / record["file"]).exists()

    started = time.time()
    s = Server(tmp_path / "down", registry_params(env, url, cache, tmp_path / "down")).wait_ready()   # the registry down
    try:
        start_seconds = time.time() - started
        body = ready_body(s)
        assert body["ready"] is True and body["reload"]["ready"] is False
        assert body["reload"]["reason"] == "registry unreachable"          # generic words: the health routes are open
        r = predict(s)
        assert r.status_code == 200 and r.json()["model_version"] == v1.version
        assert s.client.get("/admin/model").json()["registry_error"].startswith(f"registry {url} unreachable: ")
        assert metric(s, "mlnb_registry_reachable", model="churn") == 0
        assert f"serving version {v1.version} of churn@champion, last verified in" in s.stderr()
        wait_for(lambda: metric(s, "mlnb_model_reloads_total", outcome="failed") >= 1, what="a failed poll")
        assert ready_body(s)["reload"]["ready"] is False

        with running_mlflow(backend, artifacts, port):                      # back: the next poll succeeds and readiness returns
            wait_for(lambda: ready_body(s)["reload"] == {"ready": True}, what="readiness for reload")
            assert metric(s, "mlnb_registry_reachable", model="churn") == 1
            v2, _ = register(env, onnx_models["b"], split["test"])
            registry_as(env, "ann").approve(v2.version, "reviewed")
            registry_as(env, "adam").promote(v2.version, reason="better")
            wait_for(lambda: predict(s).json()["model_version"] == v2.version, what="the poller's reload to the new champion")
            assert metric(s, "mlnb_model_reloads_total", outcome="ok") == 1
    finally: s.stop()
    print(f"registry down: the server started in {start_seconds:.1f} s on its last verified version")
    assert json.loads((cache / "churn/verified-champion.json").read_text())["version"] == v2.version


@pytest.mark.slow
def test_a_registry_unreachable_at_start_never_serves_an_unverified_file(onnx_models, telco_split, tmp_path):
    from tracking import free_port
    env, cache = make_env_for_faults(tmp_path), tmp_path / "cache"
    url = f"http://127.0.0.1:{free_port()}"                                    # nothing listens here
    params = registry_params(env, url, cache, tmp_path)

    s = Server(tmp_path / "empty", params)                                   # nothing verified here yet: a clear refusal
    assert s.proc.wait(120) != 0
    assert f"registry {url} unreachable" in s.stderr() and f"no verified copy of churn@champion in the model cache {cache.resolve()}" in s.stderr()

    model = cache / "churn/1/model.onnx"                                    # a recorded copy that was changed since it was verified
    from serving import signed_model_dir
    signed_model_dir(onnx_models["a"], model.parent, Path(env["registry"]["public_key"]).parent)
    record = {"reference": "churn@champion", "name": "churn", "version": "1", "sha256": "0" * 64, "file": "churn/1/model.onnx",
              "verified_at": "2026-01-01T00:00:00Z"}
    (cache / "churn/verified-champion.json").write_text(json.dumps(record))   # a record written without the cache key
    s = Server(tmp_path / "forged", params)
    assert s.proc.wait(120) != 0 and "does not verify under the cache key" in s.stderr()
    from mlnb.model.signing import attest_approval, ensure_signing_key
    from mlnb.serving.runtime import _record_key, _record_mac, file_sha256
    keyed = lambda r: json.dumps(r | {"hmac": _record_mac(r, _record_key(env["serve"]["model_cache_key"]))})
    (cache / "churn/verified-champion.json").write_text(keyed(record))      # keyed, but the copy was never approved
    s = Server(tmp_path / "unapproved", params)
    assert s.proc.wait(120) != 0 and "approv" in s.stderr().lower(), s.stderr()
    approval_key, approval_pub = Path(env["registry"]["approval_key"]), Path(env["registry"]["approval_public_key"])
    ensure_signing_key(approval_key, approval_pub)
    attest_approval(model.parent, approval_key, name="churn", version="1", run_id=None, onnx_sha256=file_sha256(model),
                    approver="ann", reason="reviewed")
    s = Server(tmp_path / "swapped", params)                                 # approved, but not the bytes the record names
    assert s.proc.wait(120) != 0 and "does not cover SHA-256 000000000000" in s.stderr(), s.stderr()
    (cache / "churn/verified-champion.json").write_text(keyed(record | {"sha256": file_sha256(model)}))
    model.write_bytes(model.read_bytes() + b"\0")                            # and a file changed after its approval
    s = Server(tmp_path / "tampered", params)
    assert s.proc.wait(120) != 0 and "changed after approval" in s.stderr(), s.stderr()


def make_env_for_faults(tmp_path: Path) -> dict:
    from registration import make_env
    env = make_env(tmp_path / "registry")
    from mlnb.model.signing import ensure_signing_key
    ensure_signing_key(Path(env["registry"]["signing_key"]), Path(env["registry"]["public_key"]))
    return env


# ---------------------------------------------------------------------------------------------------------------- SIGKILL during `dvc repro`

def processes_in(directory: Path) -> list:
    "Processes whose working directory is `directory` (a stage's kernel runs there)."
    import psutil
    found = []
    for p in psutil.process_iter(["cwd"]):
        try:
            if p.info["cwd"] and Path(p.info["cwd"]) == directory: found.append(p)
        except psutil.Error: pass
    return found


def alive(process) -> bool:
    import psutil
    try: return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error: return False


@pytest.mark.slow
def test_sigkill_during_dvc_repro_then_repro_completes_with_the_uninterrupted_results(tmp_path):
    from conftest import run, small_project, tool_env
    project = small_project(tmp_path / "project")
    out = (tmp_path / "killed.out").open("w")
    repro = subprocess.Popen(["dvc", "repro"], cwd=project, env={**tool_env(), "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)                                # its own process group: dvc, mlnb stage, papermill
    searched = lambda: list(project.glob("models/.checkpoints/*/family-*.joblib"))   # one candidate family searched, the next one running
    wait_for(lambda: searched() or repro.poll() is not None, timeout=600, what="the train stage's first checkpoint")
    assert repro.poll() is None and not (project / "models/model.joblib").exists(), (tmp_path / "killed.out").read_text()
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    assert (project / "reports/.03_train.running.ipynb").exists()                   # killed mid-stage: papermill's partial output is there
    assert (project / "reports/.03_train.kernel.json").exists()                      # and the record of the kernel's process group
    time.sleep(3.0)                                                                   # the orphaned kernel notices its parent is gone and exits...
    left = processes_in(project)                                                      # ...but not its joblib workers

    started = time.time()
    again = run(["dvc", "repro"], project)
    resumed_seconds = time.time() - started
    assert not [p for p in left if alive(p)]                                          # the next run stopped what the killed one left
    if left: assert "a killed run of 03_train left running" in again.stdout + again.stderr
    ran = [line.split("'")[1] for line in again.stdout.splitlines() if line.startswith("Running stage")]
    assert ran[0] == "train" and "ingest" not in ran and "featurize" not in ran, again.stdout     # finished stages are not run again
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout

    clean = small_project(tmp_path / "clean")                                        # the same run, never interrupted
    run(["dvc", "repro"], clean)
    for name in ("train", "evaluate", "export"):
        assert (project / f"metrics/{name}.json").read_text() == (clean / f"metrics/{name}.json").read_text(), name
    print(f"dvc repro after SIGKILL in train: {len(left)} processes left by the killed run, completed in {resumed_seconds:.0f} s")
