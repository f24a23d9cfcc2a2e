"""Encryption at rest of the prediction and feedback logs, through a real `mlnb serve` on 127.0.0.1 with a key
configured: nothing readable on disk, everything readable with the key (the server's own feedback check, `mlnb monitor`,
`mlnb ab report`, retraining's labelled traffic), a clear error without the key or with a wrong one, and key rotation."""
import base64
import json
import os
import re
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, run, tool_env
from mlnb.data.ingest import synthesize
from mlnb.features.spec import model_frame
from mlnb.pipeline.retrain import labelled_traffic
from mlnb.predlog.log import SEALED_SUFFIX, LogKeyError, LogKeys, log_files, open_log_file, read_log
from serving import Server, serve_params, signed_model_dir, workspace


def plain_env() -> dict:
    "The tools' environment without any log key in it."
    env = tool_env()
    env.pop("MLNB_LOG_KEY", None)
    return env


def new_key(key_file) -> str:
    out = run(["mlnb", "log-key", "new", "--key-file", str(key_file)], key_file.parent.parent, env=plain_env()).stdout
    assert str(key_file) in out
    for line in key_file.read_text().split():
        assert line not in out                                           # the key is never printed
    return out


def with_encryption(params: dict, key_file, known_ids: int = 0) -> dict:
    "Params whose logs are encrypted with `key_file`; known_ids 0: every feedback id is looked up in the log on disk."
    log = params["serve"]["prediction_log"]
    return {**params, "serve": {**params["serve"], "prediction_log": {**log, "known_ids": known_ids, "encryption": {"key_file": str(key_file)}}}}


def predict(server, records: list[dict], batch: int = 50) -> list[dict]:
    out = []
    for start in range(0, len(records), batch):
        r = server.client.post("/invocations", json={"dataframe_records": records[start:start + batch]})
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


def wait_logged(directory, ids, keys, timeout: float = 60) -> None:
    "Until the writer thread has put every one of `ids` on disk."
    deadline = time.time() + timeout
    while set(ids) - set(read_log(directory, ["prediction_id"], keys=keys)["prediction_id"] if log_files(directory) else []):
        assert time.time() < deadline, "the predictions never reached the log"
        time.sleep(0.2)


def files_under(root):
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_encrypted_logs_hold_no_plaintext_and_read_back_exactly_with_the_key(onnx_models, spec, tmp_path):
    model_dir = workspace(tmp_path, spec, onnx_models, None)
    key_file = tmp_path / "keys/log.key"
    assert "1 key(s)" in new_key(key_file) and key_file.stat().st_mode & 0o777 == 0o600
    keys = LogKeys.parse(key_file.read_text(), "test")
    params = with_encryption(yaml.safe_load((tmp_path / "params.yaml").read_text()), key_file)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    traffic = synthesize(400, seed=3)
    records = json.loads(model_frame(traffic, spec).to_json(orient="records"))
    logs = tmp_path / "logs"

    s = Server(tmp_path / "srv", params).wait_ready()
    try:
        served = predict(s, records)
        ids = [p["prediction_id"] for p in served]
        wait_logged(logs / "predictions", ids, keys)
        labels = [{"prediction_id": i, "actual": a} for i, a in zip(ids, traffic["churn"])]
        for start in range(0, 400, 200):                               # every id is checked by its MAC: no log file is read
            r = s.client.post("/feedback", json={"feedback": labels[start:start + 200]})
            assert r.status_code == 200 and r.json() == {"accepted": 200, "unknown_ids": []}, r.text
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": "no-such-id", "actual": "Yes"}]})
        assert r.status_code == 404 and r.json()["unknown_ids"] == ["no-such-id"]
    finally:
        assert s.stop() in (0, -15, 143), s.stderr()[-2000:]

    # On disk: only sealed files, with nothing of the traffic readable, and pyarrow alone cannot open them.
    # Beside them, the server's own dot-files: the prediction id key (0600) and the label index, which holds digests, not ids.
    every = files_under(logs)
    on_disk = [p for p in every if not p.name.startswith(".")]
    assert on_disk and all(p.name.endswith(SEALED_SUFFIX) for p in on_disk)
    dot_files = {p.relative_to(logs).as_posix() for p in every if p.name.startswith(".")}
    assert {"predictions/.id-key", "feedback/.labels.sqlite"} <= dot_files <= {"predictions/.id-key", "feedback/.labels.sqlite",
                                                                               "feedback/.labels.sqlite-wal", "feedback/.labels.sqlite-shm"}
    assert (logs / "predictions/.id-key").stat().st_mode & 0o777 == 0o600
    blobs = b"".join(p.read_bytes() for p in every)
    for secret in [b"Month-to-month", b"Electronic check", b"prediction_id", *(i.encode() for i in ids[::40])]:
        assert secret not in blobs, secret
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(on_disk[0])

    # With the key: exactly what was served and what was sent.
    log = read_log(logs / "predictions", keys=keys).set_index("prediction_id").loc[ids]
    assert len(log) == 400 and (log["label"].tolist() == [p["label"] for p in served])
    assert log["proba.Yes"].round(6).tolist() == [round(p["probabilities"]["Yes"], 6) for p in served]
    for column in ["contract", "payment_method", "tenure", "monthly_charges"]:
        assert log[f"input.{column}"].tolist() == [r[column] for r in records], column
    feedback = read_log(logs / "feedback", keys=keys)
    assert sorted(feedback["prediction_id"]) == sorted(ids) and feedback.set_index("prediction_id").loc[ids, "actual"].tolist() == traffic["churn"].tolist()
    rows = labelled_traffic(logs / "predictions", logs / "feedback", list(spec.inputs), "churn", keys)   # what retraining adds
    assert len(rows) == 400 and rows.set_index("prediction_id").loc[ids, "churn"].tolist() == traffic["churn"].tolist()

    # Without the key, or with a wrong one: a clear error naming the file.
    for wrong, says in [(None, "no key is configured"), (LogKeys((os.urandom(32),), "another key"), "not among the 1 key(s) from another key")]:
        with pytest.raises(LogKeyError, match=re.escape(says)) as e:
            read_log(logs / "predictions", keys=wrong)
        assert str(e.value).startswith(str(logs / "predictions")) and SEALED_SUFFIX in str(e.value).split(":")[0]

    # `mlnb monitor` over the encrypted logs gives what it gives over a plain copy of them.
    plain = tmp_path / "plain"
    for f in log_files(logs / "predictions") + log_files(logs / "feedback"):
        copy = plain / f.relative_to(logs).parent / f.name.removesuffix(".enc")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(open_log_file(f, keys).read())
    plain_params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    plain_params["serve"]["prediction_log"] = {"dir": str(plain / "predictions"), "feedback_dir": str(plain / "feedback")}
    plain_params["monitor"]["output_dir"] = str(tmp_path / "monitoring-plain")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain_params))
    monitor = ["mlnb", "monitor", "--model", str(model_dir / "model.onnx")]
    (tmp_path / "nbs/stages").mkdir(parents=True)
    shutil.copy(ROOT / "nbs/stages/07_monitor.ipynb", tmp_path / "nbs/stages")     # the report reads the encrypted window too
    encrypted_out = run([*monitor, "--params", "params.yaml", "--report"], tmp_path, env=plain_env()).stdout
    plain_out = run([*monitor, "--params", "plain.yaml"], tmp_path, env=plain_env()).stdout
    results = [json.loads((tmp_path / d / "latest.json").read_text()) for d in ("monitoring", "monitoring-plain")]
    for r in results:
        r.pop("window_start"); r.pop("window_end")
        for section in r["versions"]:                   # the notes name where each run cached its reference scores:
            section["reference"].pop("notes")           # its own monitor.output_dir
    assert results[0] == results[1] and results[0]["rows"] == 400 and results[0]["performance"]["labelled"] == 400
    said = [out.split("wrote")[0].split("\n", 1)[1].replace(str(tmp_path / d), "OUTPUT_DIR")     # each run's own cache
            for out, d in ((encrypted_out, "monitoring"), (plain_out, "monitoring-plain"))]
    assert said[0] == said[1]
    assert "400 rows" in (tmp_path / "monitoring/07_monitor.html").read_text()

    # The key from the environment instead of params; and no key at all: the CLI names the file and asks for the key.
    no_key = {**plain_params, "serve": {"prediction_log": {"dir": str(logs / "predictions"), "feedback_dir": str(logs / "feedback")}}}
    (tmp_path / "nokey.yaml").write_text(yaml.safe_dump(no_key))
    env_key = {**plain_env(), "MLNB_LOG_KEY": ",".join(base64.b64encode(k).decode() for k in keys.keys)}
    report = run(["mlnb", "ab", "report", "--params", "nokey.yaml"], tmp_path, env=env_key).stdout
    assert "champion" in report
    failed = run([*monitor, "--params", "nokey.yaml"], tmp_path, check=False, env=plain_env())
    assert failed.returncode == 1 and str(logs) in failed.stderr and ".parquet.enc" in failed.stderr and "needs the key" in failed.stderr, failed.stderr   # names the sealed file it met first


@pytest.mark.slow
def test_key_rotation_keeps_old_files_readable_and_old_ids_acceptable(onnx_models, spec, tmp_path):
    model_dir = signed_model_dir(onnx_models["a"], tmp_path / "served", tmp_path / "keys")
    key_file = tmp_path / "keys/log.key"
    new_key(key_file)
    old_keys = LogKeys.parse(key_file.read_text(), "the first key")
    params = with_encryption(serve_params(model_dir, tmp_path / "keys", tmp_path / "logs"), key_file)
    records = json.loads(model_frame(synthesize(60, seed=7), spec).to_json(orient="records"))
    refused = Server(tmp_path / "no-key", with_encryption(params, tmp_path / "keys/missing.key"))   # a configured key must exist
    assert refused.proc.wait(120) == 1 and "keys/missing.key does not exist" in refused.stderr() and "mlnb log-key new" in refused.stderr()
    refused.client.close()

    s = Server(tmp_path / "first", params).wait_ready()
    try: before = [p["prediction_id"] for p in predict(s, records[:30])]
    finally: s.stop()
    assert "2 key(s)" in new_key(key_file)                             # rotation: a new key in front of the old one
    keys = LogKeys.parse(key_file.read_text(), "both keys")
    assert keys.keys[1:] == old_keys.keys

    s = Server(tmp_path / "second", params).wait_ready()
    try:
        after = [p["prediction_id"] for p in predict(s, records[30:])]
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": i, "actual": "Yes"} for i in before[:5]]})
        assert r.status_code == 200 and r.json() == {"accepted": 5, "unknown_ids": []}, r.text   # ids in files sealed with the old key
    finally: s.stop()

    header_key_ids = {f.read_bytes()[8:16] for f in log_files(tmp_path / "logs/predictions")}
    assert len(header_key_ids) == 2                                    # files sealed with each key
    log = read_log(tmp_path / "logs/predictions", keys=keys)
    assert sorted(log["prediction_id"]) == sorted(before + after)
    assert sorted(read_log(tmp_path / "logs/feedback", keys=keys)["prediction_id"]) == sorted(before[:5])
    with pytest.raises(LogKeyError, match="not among the 1 key"):     # the new key alone cannot read the older files
        read_log(tmp_path / "logs/predictions", keys=LogKeys(keys.keys[:1], "the new key alone"))

    new_only = tmp_path / "keys/new-only.key"                          # a server whose key file lost the old key
    new_only.write_text(base64.b64encode(keys.keys[0]).decode() + "\n")
    s = Server(tmp_path / "third", with_encryption(params, new_only)).wait_ready()
    try:
        r = s.client.post("/feedback", json={"feedback": [{"prediction_id": before[5], "actual": "No"}]})
        assert r.status_code == 200 and r.json() == {"accepted": 1, "unknown_ids": []}, r.text   # the id's MAC is checked: no old file is read
    finally: s.stop()
    assert "not among" not in s.stderr()
