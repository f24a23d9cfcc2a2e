"""Fuzzing a real `mlnb serve` with schemathesis against the OpenAPI document it serves at /openapi.json: every operation gets
schema-valid (positive) and schema-breaking (negative) requests, plus the document's own examples; no answer may be a 5xx, and
every answer must be a documented status with the documented content type and body. With access control on (and TLS), the same
fuzzing runs as an admin, as a predict key and with no or a wrong key: nobody gets into an operation their role does not allow."""
from collections import Counter
from typing import NamedTuple

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth, negative_data_rejection, response_schema_conformance,
                                               status_code_conformance)
from schemathesis.specs.openapi.definitions import OPENAPI_30

from mlnb.serving.auth import RANK, includes, required_role
from serving import CHALLENGE, Server, create_key, secured_params, serve_params, signed_model_dir, tls_params

DERANDOMIZE = True      # the same cases every run: a failure reproduces
EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 6}     # per operation: bounded, so the test stays short
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]}
CHECKS[GenerationMode.NEGATIVE] = [*CHECKS[GenerationMode.POSITIVE], negative_data_rejection]
# how the server refuses a request: 413 for too many rows or bytes, 409 for a rollout command that does not fit the rollout's state
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "409", "413", "415"]}}})
# the operations every server documents, and the two a server with access control adds: new ones may come, none may go
OPERATIONS = {"POST /invocations", "POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer",
              "GET /v2/models/{name}", "GET /v2/models/{name}/versions/{version}", "GET /v2/models/{name}/ready",
              "GET /v2/models/{name}/versions/{version}/ready", "GET /v2", "GET /v2/health/live", "GET /ping",
              "GET /v2/health/ready", "GET /health", "POST /feedback", "GET /metrics", "GET /openapi.json",
              "GET /admin/model", "POST /admin/reload", "GET /admin/rollout", "POST /admin/rollout/{action}"}
KEY_OPERATIONS = {"GET /admin/keys", "POST /admin/keys/reload"}


@pytest.fixture(scope="module")
def server(onnx_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = signed_model_dir(onnx_models["a"], root / "model", root / "keys")
    s = Server(root / "server", serve_params(model_dir, root / "keys", root / "logs")).wait_ready()
    yield s
    s.stop()


class Fuzzed(NamedTuple):
    statuses: Counter           # (operation, status) -> answers
    failures: list[str]         # failed checks
    unbreakable: list[str]      # operations with nothing in the request to break
    answers: Counter            # (operation, credentials sent, status, WWW-Authenticate header or None) -> answers


def presented(headers, roles: dict[str, str]) -> str:
    "Who a request claims to be, from the credentials it carried: the role of a known key, or none, wrong (unknown keys) or mixed."
    sent = [headers[h].removeprefix("Bearer ") if h == "authorization" else headers[h] for h in ("authorization", "x-api-key") if h in headers]
    known = {roles[key] for key in sent if key in roles}
    if not sent: return "none"
    if not known: return "wrong"
    return known.pop() if len(known) == 1 and len(sent) == 1 else "mixed"


def fuzz(schema, base_url: str, checks: dict = CHECKS, roles: dict[str, str] = {}) -> Fuzzed:
    "Run every operation's cases; the statuses seen (by operation), the failed checks, the operations with nothing to break, who sent what."
    statuses, failures, unbreakable, answers, session = Counter(), [], [], Counter(), requests.Session()

    def run(case, mode):
        response = case.call(base_url=base_url, session=session, timeout=30)
        statuses[(case.operation.label, response.status_code)] += 1
        challenge = ", ".join(response.headers.get("www-authenticate", [])) or None
        answers[(case.operation.label, presented(response.request.headers, roles), response.status_code, challenge)] += 1
        try: case.validate_response(response, checks=checks[mode])
        except (Exception, BaseExceptionGroup) as e:       # schemathesis raises its failures (one, or a group); collect them all, then fail once
            failures.append(f"{mode.value} {case.operation.label} -> {response.status_code}: {str(e)[:600]}")

    with session:                  # closed at the end: an open keep-alive connection would hold up the server's shutdown
        for result in schema.get_all_operations():
            operation = result.ok()
            strategies = [(GenerationMode.POSITIVE, s) for s in schema.get_strategies_from_examples(operation)]
            strategies += [(mode, operation.as_strategy(generation_mode=mode)) for mode in EXAMPLES]
            for mode, strategy in strategies:
                @settings(max_examples=EXAMPLES[mode], derandomize=DERANDOMIZE, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(strategy)
                def test(case): run(case, mode)
                try: test()
                except Unsatisfiable:
                    if mode is GenerationMode.POSITIVE: raise
                    unbreakable.append(operation.label)          # nothing in the request to break (no body, no parameters)
    return Fuzzed(statuses, failures, unbreakable, answers)


@pytest.mark.slow
def test_fuzz_against_own_openapi_schema(server):
    document = server.client.get("/openapi.json")
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.0")
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=CONFIG)
    statuses, failures, unbreakable, _ = fuzz(schema, server.url)
    server_errors = {k: n for k, n in statuses.items() if k[1] >= 500 and k != ("GET /health", 503) and k != ("GET /v2/health/ready", 503)}
    assert not server_errors, f"5xx answers: {server_errors}\n{server.stderr()[-3000:]}"
    assert not failures, "\n\n".join(failures)
    documented = {f"{method.upper()} {path}" for path, methods in document.json()["paths"].items() for method in methods}
    fuzzed = documented - {"GET /openapi.json"}                 # schemathesis leaves out the document it was loaded from (fetched above)
    missing, keys = OPERATIONS - documented, documented & KEY_OPERATIONS
    assert not missing and not keys, (missing, keys)
    assert {op for op, _ in statuses} == fuzzed, sorted(fuzzed ^ {op for op, _ in statuses})
    assert "POST /invocations" not in unbreakable and "POST /feedback" not in unbreakable
    assert sum(statuses.values()) >= 100, statuses                                   # the fuzzer really ran
    assert statuses[("POST /invocations", 200)] and statuses[("POST /v2/models/{name}/infer", 200)]     # valid requests were served...
    assert statuses[("POST /invocations", 400)] and statuses[("POST /v2/models/{name}/infer", 400)]     # ... and invalid ones refused


def test_undocumented_methods_answer_405_with_allow(server):
    "Every documented path refuses a method it does not document: 405, the methods it takes in `Allow`, the JSON error body."
    paths = server.client.get("/openapi.json").json()["paths"]
    for path, methods in paths.items():
        url, documented = path.format(name="churn", version="1", action="pause"), {m.upper() for m in methods}
        for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - documented):
            r = server.client.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code, r.text)
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert documented <= allowed <= documented | {"HEAD"}, (method, url, allowed)
            assert r.headers["content-type"] == "application/json" and f"method {method} is not allowed" in r.json()["error"]


def test_what_fuzzing_found_stays_fixed(server):
    "Requests fuzzing once answered badly: each is now a 400 naming the problem, and the server still serves."
    document = server.client.get("/openapi.json").json()
    row = document["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["example"]["dataframe_records"][0]
    r = server.client.post("/invocations", json={"dataframe_records": [{**row, "tenure": 1e300}]})       # was a 200 with null probabilities
    assert r.status_code == 400 and "'tenure': row 0 value 1e+300 is out of range" in r.json()["error"], r.text
    r = server.client.post("/admin/rollout/start", json={"challenger": True})                           # was a 500 in plain text
    assert r.status_code == 400 and "each a string" in r.json()["error"], r.text
    r = server.client.post("/invocations", json={"dataframe_records": [row]})
    assert r.status_code == 200 and all(p is not None for p in r.json()["predictions"][0]["probabilities"].values())


# --- with access control on (and TLS) ---------------------------------------------------------------------------------------------
OPEN = {"GET /v2/health/live", "GET /v2/health/ready", "GET /ping", "GET /health", "GET /openapi.json"}
NEEDS = {"GET /metrics": "operate", "GET /admin/model": "operate", "POST /admin/reload": "operate", "GET /admin/rollout": "operate",
         "POST /admin/rollout/{action}": "operate", "GET /admin/keys": "admin", "POST /admin/keys/reload": "admin",
         "POST /feedback": "feedback"}     # all others need predict
# with a key, a 2xx also makes schemathesis send the same request without a key and with a wrong one: both must be refused
AUTH_CHECKS = {mode: [*checks, ignored_auth] for mode, checks in CHECKS.items()}
REFUSED = ["400", "404", "409", "413", "415", "401", "403"]        # schema-breaking requests may be refused by access control first


@pytest.fixture(scope="module")
def secured_server(onnx_models, certificate, tmp_path_factory):
    "A server with access control over https (/metrics guarded too), and a key per role made by `mlnb api-key create`."
    root = tmp_path_factory.mktemp("fuzz-auth")
    model_dir = signed_model_dir(onnx_models["a"], root / "model", root / "keys")
    params = secured_params((model_dir, root / "keys"), root / "server", tls=tls_params(certificate), auth={"metrics_public": False})
    keys = {role: create_key(root / "server", role, role) for role in ("predict", "operate", "admin")}
    s = Server(root / "server", params, cacert=certificate[0]).wait_ready()
    yield s, keys, certificate[0]
    s.stop()


def secured_fuzz(s: Server, cacert, auth: dict, roles: dict[str, str]) -> Fuzzed:
    "Fuzz the secured server with schemathesis's credentials per security scheme (`auth`: none, or a key for one), trusting the test CA."
    config = schemathesis.Config.from_dict({**({"auth": {"openapi": auth}} if auth else {}), "tls-verify": str(cacert),
                                            "checks": {"negative_data_rejection": {"expected-statuses": REFUSED}}})
    schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json", config=config)
    return fuzz(schema, s.url, AUTH_CHECKS if auth else CHECKS, roles)


def role_errors(run: Fuzzed) -> list[str]:
    """Every answer that is not what the credentials it was sent with allow: on an open operation no refusal; else without a known key
    a 401 with the challenge, with a key whose role is too low a 403 (without the challenge), with a key that may, no refusal."""
    errors = Counter()
    for (op, who, status, challenge), n in run.answers.items():
        needs = None if op in OPEN else NEEDS.get(op, "predict")
        if needs is None or (who in RANK and includes(who, needs)): ok = status not in (401, 403)
        elif who in RANK: ok = status == 403 and challenge is None
        else: ok = status == 401 and challenge == CHALLENGE
        if not ok: errors[f"{op} (needs {needs or 'nothing'}) with {who} credentials: {status} {challenge or ''}"] += n
    return [f"{e}: {n} time(s)" for e, n in errors.items()]


def by(run: Fuzzed, **match) -> int:
    "How many answers match `op`, `who`, `status`."
    fields = ("op", "who", "status")
    return sum(n for key, n in run.answers.items() if all(key[fields.index(f)] == v for f, v in match.items()))


@pytest.mark.slow
@pytest.mark.parametrize("who", ["admin", "predict", "anonymous"])
def test_fuzz_with_access_control(secured_server, who):
    """Fuzzing over https with an admin key (everything reachable and conforming, and refused without the key), a predict key (every
    operate or admin operation a 403) and no key or random ones (every guarded operation a 401 with the challenge; open ones answer).
    Schemathesis also drops or garbles the credentials in some negative cases: those must get a 401 too."""
    s, keys, cacert = secured_server
    auth = {"admin": {"bearer": {"bearer": keys["admin"]}}, "predict": {"apiKey": {"api_key": keys["predict"]}}}.get(who, {})  # both schemes used
    run = secured_fuzz(s, cacert, auth, {key: role for role, key in keys.items()})
    server_errors = {k: n for k, n in run.statuses.items() if k[1] >= 500 and k not in {("GET /health", 503), ("GET /v2/health/ready", 503)}}
    assert not server_errors, f"5xx answers: {server_errors}\n{s.stderr()[-3000:]}"
    assert not run.failures, "\n\n".join(run.failures)
    assert not (errors := role_errors(run)), "\n".join(errors)
    documented = {f"{m.upper()} {p}" for p, ms in s.client.get("/openapi.json").json()["paths"].items() for m in ms}
    assert OPERATIONS | KEY_OPERATIONS <= documented, sorted((OPERATIONS | KEY_OPERATIONS) - documented)
    assert {op for op, _ in run.statuses} == documented - {"GET /openapi.json"}
    assert sum(run.statuses.values()) >= 100 and not by(run, who="mixed"), run.statuses
    guarded = documented - OPEN
    if who == "anonymous":
        assert by(run, who="none") and by(run, who="wrong") and by(run, status=401) == by(run) - sum(by(run, op=op) for op in OPEN)
    else:       # the key went with most requests, on every operation
        assert all(by(run, op=op, who=who) >= 8 for op in guarded), run.answers
        assert by(run, op="POST /invocations", who=who, status=200) and by(run, op="POST /invocations", who=who, status=400)
    if who == "admin":
        assert not by(run, status=403) and by(run, op="GET /admin/keys", status=200) and by(run, op="POST /admin/rollout/{action}", status=409)
    if who == "predict":
        for op in NEEDS: assert by(run, op=op, status=403) == by(run, op=op, who="predict") > 0, op
        assert by(run, status=403) == sum(by(run, op=op, who="predict") for op in NEEDS)


def test_secured_document_declares_what_is_enforced(secured_server):
    "The document served with access control on is valid OpenAPI 3.0 and asks for a key on exactly the operations the server guards, by role."
    s, keys, _ = secured_server
    document = s.client.get("/openapi.json").json()
    errors = sorted(jsonschema.Draft4Validator(OPENAPI_30).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    concrete = {"name": "churn", "version": "1", "action": "pause"}
    for path, methods in document["paths"].items():
        needs = required_role(path.format(**concrete), metrics_public=False)
        for method, operation in methods.items():
            op = f"{method.upper()} {path}"
            if needs is None:
                assert operation["security"] == [] and "401" not in operation["responses"], op
            else:
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}] and operation["x-mlnb-role"] == needs, op
                assert {"401", "403"} <= set(operation["responses"]) and "WWW-Authenticate" in operation["responses"]["401"]["headers"], op
            assert needs == (None if op in OPEN else NEEDS.get(op, "predict")), op      # and both agree with what the fuzzing expects
    guarded = [(m.upper(), p.format(**concrete)) for p, ms in document["paths"].items() for m in ms
               if required_role(p.format(**concrete), metrics_public=False)]
    with s.new_client(keys["predict"]) as predict:            # the enforcement itself, once per operation
        for method, path in guarded:
            assert s.client.request(method, path).status_code == 401, (method, path)
            status = predict.request(method, path).status_code
            assert status == 403 if path.startswith("/admin") or path in ("/metrics", "/feedback") else status not in (401, 403), (method, path, status)


def test_what_fuzzing_found_with_access_control_stays_fixed(secured_server):
    "A valid key beside a wrong one was let in (schemathesis: 'API accepts invalid authentication'); a guarded /metrics was documented open."
    s, keys, _ = secured_server
    for method, path in (("POST", "/invocations"), ("GET", "/admin/keys"), ("POST", "/admin/reload")):
        r = s.client.request(method, path, headers={"Authorization": f"Bearer {keys['admin']}", "X-API-Key": "mlnb_wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE and "malformed credentials" in r.json()["error"], (path, r.text)
        r = s.client.request(method, path, headers={"Authorization": "Bearer mlnb_wrong", "X-API-Key": keys["admin"]})
        assert r.status_code == 401, (path, r.text)
    same = {"Authorization": f"Bearer {keys['admin']}", "X-API-Key": keys["admin"]}
    assert s.client.get("/admin/keys", headers=same).status_code == 200
    assert s.client.get("/metrics", headers={"X-API-Key": keys["predict"]}).status_code == 403
    assert s.client.get("/metrics", headers={"X-API-Key": keys["operate"]}).status_code == 200
    assert s.client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["x-mlnb-role"] == "operate"
