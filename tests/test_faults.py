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

from mlnb.serve.log import read_log
from serving import Server, serve_params
from test_registry import onnx_models, telco_split  # noqa: F401 (fixtures)
from test_serve import metric, model_dir, records  # noqa: F401 (fixtures)

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
    others = [p for p in directory.rglob("*") if p.is_file() and p.suffix != ".parquet"]
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
