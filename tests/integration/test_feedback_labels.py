"""Labels have an owner (issue 18, findings 1, 9, 11 and 13), on a real `mlnb serve` on 127.0.0.1 with a keys file: a
feedback role, prediction ids bound by a MAC to the key they were answered for, one label per id unless an audited
correction, the key's name in each feedback row, purged keys left out of retraining and monitoring, out-of-contract
labelled rows quarantined, encrypted logs bound to their log and file name, the log queue bounded by rows, and feedback
for an unknown id answered without reading the prediction log."""
import base64
import json
import os
import re
import time
from os.path import commonprefix

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, run
from mlnb.core.audit import AuditLog
from mlnb.core.config import config_from_dict
from mlnb.data.ingest import synthesize
from mlnb.features.spec import feature_spec, model_frame
from mlnb.predlog.log import LogKeyError, LogKeys, join_feedback, log_files, read_log
from mlnb.pipeline.retrain import labelled_traffic, retrain
from serving import signed_logreg, Server, create_key, metric, serve_params, signed_model_dir, workspace

ROLES = {"app": "predict", "crm": "feedback", "crm2": "feedback", "ops": "operate"}


@pytest.fixture(scope="module")
def model_dir(telco_split, tmp_path_factory):
    "One real exported logistic regression, signed."
    return signed_logreg(telco_split, tmp_path_factory.mktemp("labels-model"))


@pytest.fixture(scope="module")
def records(telco_split):
    schema, s = telco_split
    spec = feature_spec(schema, config_from_dict({}).features, "churn", "binary")
    return json.loads(model_frame(s["test"].head(60), spec).to_json(orient="records"))


def secured_params(model_dir, work, **serve) -> dict:
    directory, keys = model_dir
    params = serve_params(directory, keys, work / "logs", auth={"keys_file": str(work / "keys.yaml")}, **serve)
    params["registry"]["audit_log"] = str(work / "audit.jsonl")
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(json.dumps(params))
    return params


@pytest.fixture(scope="module")
def secured(model_dir, tmp_path_factory):
    "A server with access control and a key per name in ROLES."
    work = tmp_path_factory.mktemp("labels")
    params = secured_params(model_dir, work)
    keys = {name: create_key(work, name, role) for name, role in ROLES.items()}
    s = Server(work, params).wait_ready()
    yield s, keys
    s.stop()


def predict(s, key, rows) -> list[str]:
    r = s.client.post("/invocations", json={"dataframe_records": rows}, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    return [p["prediction_id"] for p in r.json()["predictions"]]


def label(s, key, ids, actual="Yes", **extra):
    return s.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": actual} for i in ids], **extra},
                         headers={"X-API-Key": key})


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.2)


def test_a_predict_key_cannot_label(secured, records):
    s, keys = secured
    (pid,) = predict(s, keys["app"], records[:1])
    r = label(s, keys["app"], [pid])
    assert r.status_code == 403 and r.json()["error"] == "key 'app' (role predict) may not POST /feedback; it needs feedback", r.text
    assert label(s, keys["crm"], predict(s, keys["crm"], records[:1])).status_code == 200     # a feedback key labels its own


def test_an_id_issued_to_another_key_is_refused(secured, records):
    s, keys = secured
    (theirs,) = predict(s, keys["crm"], records[1:2])
    r = label(s, keys["crm2"], [theirs])
    assert r.status_code == 403 and "issued to another API key" in r.json()["error"] and theirs in r.json()["error"], r.text
    (apps,) = predict(s, keys["app"], records[2:3])                    # a predict key's prediction: no feedback key labels it
    assert label(s, keys["crm"], [apps]).status_code == 403
    mine = predict(s, keys["crm2"], records[3:4])                      # one refused id refuses the whole request
    assert label(s, keys["crm2"], [*mine, theirs]).status_code == 403
    assert label(s, keys["crm2"], mine).json() == {"accepted": 1, "unknown_ids": []}
    assert label(s, keys["ops"], [theirs, apps]).json() == {"accepted": 2, "unknown_ids": []}   # an operator labels any id


def _neighbour(pid: str) -> str:
    "The id a caller would guess from one it holds: the next counter of `<prefix>-<hex counter>`, else the id one character off."
    if m := re.fullmatch(r"([0-9a-f]+-)([0-9a-f]+)", pid): return f"{m[1]}{int(m[2], 16) + 1:x}"
    return pid[:-1] + ("A" if pid[-1] != "A" else "B")


def test_guessed_and_forged_ids_are_refused(secured, records):
    s, keys = secured
    (mine,) = predict(s, keys["crm"], records[4:5])
    (next_one,) = predict(s, keys["crm"], records[5:6])                # a real prediction, the next one issued
    guesses = [_neighbour(mine), "no-such-id", base64.urlsafe_b64encode(os.urandom(24)).decode()]
    r = label(s, keys["crm"], guesses)
    assert r.status_code == 404 and r.json() == {"accepted": 0, "unknown_ids": guesses}, r.text
    assert _neighbour(mine) != next_one
    assert label(s, keys["crm"], [next_one]).status_code == 200


def test_ids_carry_96_random_bits_and_share_nothing(secured, records):
    s, keys = secured
    ids = [predict(s, keys["crm"], [r])[0] for r in records[:20]] + predict(s, keys["crm"], records[20:30])
    assert len(set(ids)) == 30
    for a, b in zip(ids, ids[1:]):
        assert len(commonprefix([a, b])) <= 3 and len(commonprefix([a[::-1], b[::-1]])) <= 3, (a, b)    # no shared prefix or counter
        assert not re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", a)                  # not <prefix>-<counter>
    for pid in ids:
        raw = base64.urlsafe_b64decode(pid + "=" * (-len(pid) % 4))
        assert len(raw) >= 24                                             # 96 random bits and a 96-bit tag
    chars = "".join(ids)
    assert len(set(chars)) >= 55                                          # the whole base64 alphabet in use, not hex digits


def test_a_second_label_is_refused_unless_an_audited_correction(secured, records):
    s, keys = secured
    (pid,) = predict(s, keys["crm"], records[30:31])
    assert label(s, keys["crm"], [pid], "Yes").status_code == 200
    again = label(s, keys["crm"], [pid], "No")
    assert again.status_code == 409 and pid in again.json()["error"] and "correction" in again.json()["error"], again.text
    no_reason = label(s, keys["crm"], [pid], "No", correction=True)
    assert no_reason.status_code == 400 and "reason" in no_reason.json()["error"]
    assert label(s, keys["crm2"], [pid], "No", correction=True, reason="mine now").status_code == 403
    assert label(s, keys["crm"], [pid], "No", correction=True, reason="the CRM matched the wrong customer").status_code == 200
    assert label(s, keys["ops"], [pid], "Yes", correction=True, reason="checked with the customer").status_code == 200
    assert label(s, keys["crm"], [pid], "No").status_code == 409       # still labelled once, whoever corrected it

    entries = [e for e in AuditLog(s.workdir / "audit.jsonl").entries() if e["action"] == "feedback.correction"]
    assert [(e["actor"], e["details"]["reason"], e["details"]["ids"]) for e in entries] == [
        ("crm", "the CRM matched the wrong customer", [pid]), ("ops", "checked with the customer", [pid])]
    assert not AuditLog(s.workdir / "audit.jsonl").verify()

    feedback_dir, predictions_dir = s.workdir / "logs/feedback", s.workdir / "logs/predictions"
    wait_for(lambda: (read_log(feedback_dir)["prediction_id"] == pid).sum() == 3, "the labels reaching the log")
    rows = read_log(feedback_dir).query("prediction_id == @pid").sort_values("timestamp")
    assert rows["key_name"].tolist() == ["crm", "crm", "ops"] and rows["correction"].tolist() == [False, True, True]
    assert rows["actual"].tolist() == ["Yes", "No", "Yes"]
    wait_for(lambda: pid in set(read_log(predictions_dir)["prediction_id"]), "the prediction reaching the log")
    joined = join_feedback(read_log(predictions_dir), read_log(feedback_dir)).set_index("prediction_id")
    assert joined.loc[pid, "actual"] == "Yes"                         # the latest correction wins


def test_feedback_rows_record_the_key_name_never_the_key(secured, records):
    s, keys = secured
    ids = predict(s, keys["crm2"], records[31:35])
    assert label(s, keys["crm2"], ids, "No").status_code == 200
    feedback_dir = s.workdir / "logs/feedback"
    wait_for(lambda: set(ids) <= set(read_log(feedback_dir)["prediction_id"]), "the labels reaching the log")
    rows = read_log(feedback_dir).set_index("prediction_id").loc[ids]
    assert set(rows["key_name"]) == {"crm2"}
    for f in log_files(feedback_dir):
        assert not any(k.encode() in f.read_bytes() for k in keys.values())


def test_purged_keys_are_left_out_of_retraining_monitoring_and_ab_reports(onnx_models, spec, tmp_path):
    "A vandal key labels its predictions wrongly: monitoring sees accuracy decay; after `mlnb feedback purge` it does not."
    model_dir = workspace(tmp_path, spec, onnx_models, None)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["serve"]["auth"] = {"keys_file": str(tmp_path / "keys.yaml")}
    params["monitor"].pop("webhook")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    keys = {name: create_key(tmp_path, name, "feedback") for name in ("crm", "vandal")}
    traffic = synthesize(600, seed=3)
    records = json.loads(model_frame(traffic, spec).to_json(orient="records"))
    s = Server(tmp_path / "srv", params).wait_ready()
    try:
        for who, part in (("crm", slice(0, 400)), ("vandal", slice(400, 600))):
            chunk = records[part]
            ids = [i for start in range(0, len(chunk), 40) for i in predict(s, keys[who], chunk[start:start + 40])]
            truth = traffic["churn"].iloc[part]
            actual = list(truth if who == "crm" else truth.map({"Yes": "No", "No": "Yes"}))     # the vandal flips every label
            for start in range(0, len(ids), 200):
                r = s.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": a} for i, a in
                                                                  zip(ids[start:start + 200], actual[start:start + 200])]},
                                  headers={"X-API-Key": keys[who]})
                assert r.status_code == 200 and r.json()["accepted"] == len(ids[start:start + 200]), r.text
    finally:
        s.stop()
    monitor = ["mlnb", "monitor", "--params", "params.yaml", "--model", str(model_dir / "model.onnx")]
    run(monitor, tmp_path, check=False)
    before = json.loads((tmp_path / "monitoring/latest.json").read_text())
    assert before["performance"]["labelled"] == 600 and before["performance"]["decayed"], before["performance"]
    features = [c for c in spec.inputs]
    logs = tmp_path / "logs"
    assert len(labelled_traffic(logs / "predictions", logs / "feedback", features, "churn")) == 600

    (tmp_path / "registry").mkdir(exist_ok=True)
    (tmp_path / "registry/users.yaml").write_text("default_roles: [viewer]\n")
    denied = run(["mlnb", "feedback", "purge", "--key", "vandal", "--reason", "flipped labels", "--params", "params.yaml"], tmp_path, check=False)
    assert denied.returncode == 3 and "approver" in denied.stderr
    (tmp_path / "registry/users.yaml").write_text("default_roles: [viewer, approver]\n")
    out = run(["mlnb", "feedback", "purge", "--key", "vandal", "--reason", "flipped labels", "--params", "params.yaml"], tmp_path)
    assert "'vandal'" in out.stdout

    run(monitor, tmp_path, check=False)
    after = json.loads((tmp_path / "monitoring/latest.json").read_text())
    assert after["performance"]["labelled"] == 400 and not after["performance"]["decayed"], after["performance"]
    assert after["feedback_excluded"] == 200
    rows = labelled_traffic(logs / "predictions", logs / "feedback", features, "churn")
    assert len(rows) == 400 and rows.attrs["excluded_labels"] == 200
    from mlnb.rollout.ab import ab_report                       # the A/B report leaves them out too
    assert [(v.variant, v.labelled) for v in ab_report(logs / "predictions", logs / "feedback").variants] == [("champion", 400)]
    assert [e["action"] for e in AuditLog(tmp_path / "registry/audit.jsonl").entries()] == ["denied", "feedback-purge"]


def _labelled_logs(root, rows: pd.DataFrame) -> None:
    "A prediction and a feedback log, as the server writes them, holding `rows` (with churn as the label)."
    now = pd.Timestamp.now(tz="UTC")
    ids = [f"p{i}" for i in range(len(rows))]
    preds = pd.DataFrame({"prediction_id": ids, "timestamp": now, "variant": "champion",
                          **{f"input.{c}": rows[c].to_numpy() for c in rows.columns if c != "churn"}})
    feedback = pd.DataFrame({"prediction_id": ids, "actual": rows["churn"].to_numpy(), "timestamp": now, "key_name": "crm"})
    for kind, frame in (("predictions", preds), ("feedback", feedback)):
        folder = root / "logs" / kind / f"date={now:%Y-%m-%d}"
        folder.mkdir(parents=True)
        frame.to_parquet(folder / f"{kind}-{now:%Y%m%dT%H%M%S%f}-1-000000.parquet", index=False)


def test_an_out_of_contract_labelled_row_is_quarantined_and_the_loop_goes_on(tmp_path, monkeypatch):
    rows = synthesize(8, seed=5)
    rows.loc[3, "tenure"] = 500                                        # far beyond the schema's range
    _labelled_logs(tmp_path, rows)
    run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: 'true'\n")              # the pipeline: a stage that does nothing
    (tmp_path / "models").mkdir()
    (tmp_path / "models/registration.json").write_text(json.dumps(
        {"name": "churn", "version": "1", "status": "approved", "gates_passed": True, "created": False}))
    (tmp_path / "users.yaml").write_text("default_roles: [viewer, data-scientist]\n")
    cfg = config_from_dict({"data": {"schema": str(ROOT / "schema/telco_churn.yaml"), "feedback": str(tmp_path / "data/labelled.parquet")},
                            "registry": {"audit_log": str(tmp_path / "audit.jsonl"), "users": str(tmp_path / "users.yaml"),
                                         "tracking_uri": "http://127.0.0.1:9"},
                            "retrain": {"min_new_labels": 1},
                            "serve": {"prediction_log": {"dir": str(tmp_path / "logs/predictions"), "feedback_dir": str(tmp_path / "logs/feedback")}},
                            "monitor": {"output_dir": str(tmp_path / "monitoring")}})
    monkeypatch.chdir(tmp_path)
    first = retrain(cfg, "manual: test")
    assert (first.status, first.new_rows, first.quarantined) == ("unchanged", 7, 1), first
    assert sorted(pd.read_parquet(tmp_path / "data/labelled.parquet")["prediction_id"]) == [f"p{i}" for i in range(8) if i != 3]
    (line,) = (tmp_path / "monitoring/retrain/quarantine.jsonl").read_text().splitlines()
    set_aside = json.loads(line)
    assert set_aside["prediction_id"] == "p3" and "tenure" in set_aside["reason"] and set_aside["row"]["tenure"] == 500
    second = retrain(cfg, "manual: test again")                       # the row is seen: never retried, never blocking
    assert (second.status, second.new_rows, second.quarantined) == ("skipped", 0, 0), second
    actions = [e["action"] for e in AuditLog(tmp_path / "audit.jsonl").entries()]
    assert "retrain-quarantined" in actions and "retrain-failed" not in actions


def encrypted_params(model_dir, work, **prediction_log):
    directory, keys = model_dir
    key_file = work / "log.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n"); key_file.chmod(0o600)
    params = serve_params(directory, keys, work / "logs", prediction_log={"encryption": {"key_file": str(key_file)}, **prediction_log})
    return params, LogKeys.parse(key_file.read_text(), "the test key")


def test_encrypted_logs_refuse_plain_files_and_files_moved_or_renamed(model_dir, records, tmp_path):
    params, keys = encrypted_params(model_dir, tmp_path)
    s = Server(tmp_path / "srv", params).wait_ready()
    try:
        ids = [p["prediction_id"] for p in s.client.post("/invocations", json={"dataframe_records": records[:20]}).json()["predictions"]]
        assert s.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": "Yes"} for i in ids]}).status_code == 200
    finally:
        s.stop()
    logs = tmp_path / "logs"
    features = list(records[0])
    assert len(labelled_traffic(logs / "predictions", logs / "feedback", features, "churn", keys)) == 20

    # a plain Parquet file dropped into the encrypted feedback log: refused, named
    (sealed_feedback,) = log_files(logs / "feedback")
    dropped = sealed_feedback.parent / "feedback-20990101T000000000000-1-000000.parquet"
    pq.write_table(pa.table({"prediction_id": ids, "actual": ["No"] * 20, "timestamp": pa.array([0] * 20, pa.timestamp("us", tz="UTC"))}), dropped)
    with pytest.raises(LogKeyError, match=re.escape(str(dropped))):
        labelled_traffic(logs / "predictions", logs / "feedback", features, "churn", keys)
    with pytest.raises(LogKeyError, match="plain Parquet"):
        read_log(logs / "feedback", keys=keys)
    dropped.unlink()

    # a sealed prediction file renamed inside its log: refused
    (sealed_predictions,) = log_files(logs / "predictions")
    renamed = sealed_predictions.with_name(sealed_predictions.name.replace("-000000.", "-000001."))
    sealed_predictions.rename(renamed)
    with pytest.raises(LogKeyError, match="renamed"):
        read_log(logs / "predictions", keys=keys)
    renamed.rename(sealed_predictions)
    assert len(read_log(logs / "predictions", keys=keys)) == 20

    # the sealed feedback file copied, under its own name, into the prediction log of another day: refused
    moved = logs / "predictions/date=2099-01-01" / sealed_feedback.name
    moved.parent.mkdir()
    moved.write_bytes(sealed_feedback.read_bytes())
    with pytest.raises(LogKeyError):
        read_log(logs / "predictions", keys=keys)
    moved.unlink()
    # and a prediction file under the feedback log's name, in the feedback log: refused as a feedback file
    (logs / "feedback" / sealed_feedback.parent.name / sealed_feedback.name).write_bytes(sealed_predictions.read_bytes())
    with pytest.raises(LogKeyError, match="moved from another log"):
        labelled_traffic(logs / "predictions", logs / "feedback", features, "churn", keys)


def test_the_log_queue_is_bounded_by_rows(model_dir, records, tmp_path):
    directory, keys = model_dir
    params = serve_params(directory, keys, tmp_path / "logs", prediction_log={"queue_rows": 100, "flush_seconds": 30})
    s = Server(tmp_path / "srv", params).wait_ready()
    try:
        for _ in range(3):                                             # 50 + 50 rows fit; the third 50 do not
            assert s.client.post("/invocations", json={"dataframe_records": records[:50]}).status_code == 200
        assert metric(s, "mlnb_prediction_log_dropped_total", log="predictions") == 50     # dropped and counted, by rows
    finally:
        s.stop()
    assert len(read_log(tmp_path / "logs/predictions")) == 100      # what was queued is written on shutdown


def test_feedback_for_an_unknown_id_reads_no_log_file(model_dir, records, tmp_path):
    "The prediction log is made unreadable on disk: a server that scanned it for an unknown id would fail; this one answers 404."
    params, keys = encrypted_params(model_dir, tmp_path)
    s = Server(tmp_path / "srv", params).wait_ready()
    try:
        ids = [p["prediction_id"] for p in s.client.post("/invocations", json={"dataframe_records": records[:10]}).json()["predictions"]]
        wait_for(lambda: len(log_files(tmp_path / "logs/predictions")) > 0, "the predictions reaching the log")
        for f in log_files(tmp_path / "logs/predictions"):
            f.write_bytes(b"MLNBLOG" + os.urandom(200))                # no key opens it now
        started = time.perf_counter()
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": "a3e21e9d93-2", "actual": "Yes"}]})
        assert r.status_code == 404 and r.json()["unknown_ids"] == ["a3e21e9d93-2"], r.text
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": ids[0], "actual": "Yes"}]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        assert time.perf_counter() - started < 5
    finally:
        s.stop()
    assert "could not be read" not in s.stderr() and "does not decrypt" not in s.stderr()
