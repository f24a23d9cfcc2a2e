"""Writing a file never changes the process umask: in a threaded server another thread may be creating a file at that
very moment, and a umask of 0 for that instant makes it world-writable."""
import os
import threading

from mlnb.core.config import staged_outputs, write_json


def test_staged_outputs_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))     # a spy: every call still happens
    before = real(0o022); real(before)
    threads = [threading.Thread(target=write_json, args=({"i": i}, tmp_path / f"out-{i}.json")) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    with staged_outputs(tmp_path / "plain.txt") as tmp: tmp.write_text("x")
    assert calls == [], f"os.umask was called {len(calls)} times: {calls}"
    after = real(before); real(after)
    assert after == before
    expected = 0o666 & ~before
    assert {(tmp_path / f"out-{i}.json").stat().st_mode & 0o777 for i in range(8)} == {expected}
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected


def test_the_mode_follows_the_umask_in_force(tmp_path):
    old = os.umask(0o077)
    try:
        with staged_outputs(tmp_path / "private.txt") as tmp: tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
