"""Real tracking servers for the registry tests: a fresh database on the local PostgreSQL, and `mlflow server` on 127.0.0.1."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POSTGRES = os.environ.get("MLNB_TEST_POSTGRES", "postgresql://mlnb:mlnb@127.0.0.1:5432/mlnb")


@contextlib.contextmanager
def postgres_database():
    "A fresh, empty database on the local PostgreSQL (deploy/team/postgres.sh; `make test` starts it), dropped afterwards."
    import psycopg
    from psycopg import sql
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"no PostgreSQL at {POSTGRES} ({e}); run `bash deploy/team/postgres.sh` (make test does)")
    name = f"mlnb_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as c: c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.close()


@contextlib.contextmanager
def running_mlflow(backend: str, artifacts: Path, port: int | None = None):
    "`mlflow server` on 127.0.0.1 (a free port, or `port` to bring one back) with this backend store; its URL while the block runs."
    port = port or free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = artifacts.parent / f"mlflow-{port}.log"                    # a file, not a pipe nobody drains while tests run
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                             "--backend-store-uri", backend,
                             "--artifacts-destination", str(artifacts)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy in 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
