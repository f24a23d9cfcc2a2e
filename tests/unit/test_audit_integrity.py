"""The audit log against someone who can write its directory but not read the key (issue 18, finding 6): a rewrite with
recomputed hashes, a cut-off end with a rewritten head and a deleted log are caught; a crash between an entry and its
head is told apart from tampering and carried on from; nothing is written through a symlink."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlnb.core.audit import AuditLog, entry_hash

GENESIS = "0" * 64


@pytest.fixture
def log(tmp_path):
    log = AuditLog(tmp_path / "logs" / "audit.jsonl")
    for action in ("register", "approve", "promote"):
        log.append("alice", action, model="churn", version="1")
    assert log.verify() == []
    return log


def rehashed(lines: list[str], edit, keep_alg: bool) -> tuple[list[str], dict]:
    "The entries edited by `edit`, every hash recomputed (sha256, as anyone without the key can), and the head to match."
    out, prev = [], GENESIS
    for e in map(json.loads, lines):
        e = {**edit(e), "prev": prev}
        if not keep_alg: e.pop("alg", None)
        e["hash"] = entry_hash(e)
        prev = e["hash"]
        out.append(json.dumps(e, sort_keys=True))
    return out, {"seq": json.loads(out[-1])["seq"], "hash": prev}


@pytest.mark.parametrize("keep_alg", [True, False])
def test_an_edit_with_every_hash_recomputed_is_detected(log, keep_alg):
    lines = log.path.read_text().splitlines()
    forged, head = rehashed(lines, lambda e: {**e, "actor": "mallory"} if e["seq"] == 2 else e, keep_alg)
    log.path.write_text("\n".join(forged) + "\n")
    log.head_path.write_text(json.dumps(head))
    problems = [str(p) for p in log.verify()]
    assert problems, "a rewritten, rehashed log verified as intact"


def test_a_cut_off_end_with_a_rewritten_head_is_detected(log):
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join(lines[:-1]) + "\n")
    log.head_path.write_text(json.dumps({"seq": 2, "hash": json.loads(lines[1])["hash"]}))
    problems = [str(p) for p in log.verify()]
    assert any("entries removed from the end" in p for p in problems), problems


def test_deleting_the_log_and_its_head_is_reported_as_missing(log):
    log.path.unlink()
    log.head_path.unlink()
    problems = [str(p) for p in log.verify()]
    assert any("missing" in p and "3 entries" in p for p in problems), problems


def _append_in_child(path: Path, action: str, failpoint: str | None = None) -> int:
    env = {**os.environ, **({"MLNB_FAILPOINT": failpoint} if failpoint else {})}
    code = f"from mlnb.core.audit import AuditLog; AuditLog({str(path)!r}).append('alice', {action!r})"
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode


def test_a_crash_between_the_line_and_the_head_is_not_tampering_and_the_next_append_works(log):
    assert _append_in_child(log.path, "rollback", failpoint="audit:after-line") == 86   # killed right after the fsynced line
    assert len(log.entries()) == 4 and json.loads(log.head_path.read_text())["seq"] == 3
    assert log.verify() == []
    assert any("a crash during an append" in n for n in log.notes), log.notes
    assert _append_in_child(log.path, "promote") == 0
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4, 5]
    assert log.verify() == [] and log.notes == []


def test_an_old_head_left_by_a_crash_is_told_apart_from_a_cut(log, tmp_path):
    "The same state made by hand: the head (and whatever else the log keeps outside the file) as before the last append."
    key_dir = Path(os.environ["MLNB_AUDIT_KEY"]).parent
    saved = {p: p.read_bytes() for p in [log.head_path, *key_dir.rglob("*.json")]}
    log.append("alice", "rollback")
    for p, data in saved.items(): p.write_bytes(data)
    assert log.verify() == [], "a crash before the head was replaced reads as tampering"
    log.append("alice", "promote")
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4, 5] and log.verify() == []


def test_a_symlink_planted_as_the_head_temporary_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    log = AuditLog(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl.head.tmp").symlink_to(victim)
    log.append("alice", "register")
    log.append("alice", "approve")
    assert victim.read_text() == "precious"
    assert log.verify() == [] and len(log.entries()) == 2


def test_a_log_path_that_is_a_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "audit.jsonl").symlink_to(victim)
    with pytest.raises(Exception, match="symlink is refused"):
        AuditLog(tmp_path / "audit.jsonl").append("alice", "register")
    assert victim.read_text() == "precious"
