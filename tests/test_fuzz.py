"""Fuzzing a real `mlnb serve` with schemathesis against the OpenAPI document it serves at /openapi.json: every operation gets
schema-valid (positive) and schema-breaking (negative) requests, plus the document's own examples; no answer may be a 5xx, and
every answer must be a documented status with the documented content type and body."""
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection, response_schema_conformance,
                                               status_code_conformance)

from serving import Server, serve_params, signed_model_dir
from test_registry import onnx_models, telco_split  # noqa: F401 (fixtures)

DERANDOMIZE = True      # the same cases every run: a failure reproduces
EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 6}     # per operation: bounded, so the test stays short
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]}
CHECKS[GenerationMode.NEGATIVE] = [*CHECKS[GenerationMode.POSITIVE], negative_data_rejection]
# how the server refuses a request: 413 for too many rows or bytes, 409 for a rollout command that does not fit the rollout's state
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "409", "413", "415"]}}})


@pytest.fixture(scope="module")
def server(onnx_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = signed_model_dir(onnx_models["a"], root / "model", root / "keys")
    s = Server(root / "server", serve_params(model_dir, root / "keys", root / "logs")).wait_ready()
    yield s
    s.stop()


def fuzz(schema, base_url: str) -> tuple[Counter, list[str], list[str]]:
    "Run every operation's cases; the statuses seen (by operation), the failed checks and the operations with nothing to break."
    statuses, failures, unbreakable, session = Counter(), [], [], requests.Session()

    def run(case, mode):
        response = case.call(base_url=base_url, session=session, timeout=30)
        statuses[(case.operation.label, response.status_code)] += 1
        try: case.validate_response(response, checks=CHECKS[mode])
        except (Exception, BaseExceptionGroup) as e:       # schemathesis raises its failures (one, or a group); collect them all, then fail once
            failures.append(f"{mode.value} {case.operation.label} -> {response.status_code}: {str(e)[:600]}")

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
    return statuses, failures, unbreakable


@pytest.mark.slow
def test_fuzz_against_own_openapi_schema(server):
    document = server.client.get("/openapi.json")
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.0")
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=CONFIG)
    statuses, failures, unbreakable = fuzz(schema, server.url)
    server_errors = {k: n for k, n in statuses.items() if k[1] >= 500 and k != ("GET /health", 503) and k != ("GET /v2/health/ready", 503)}
    assert not server_errors, f"5xx answers: {server_errors}\n{server.stderr()[-3000:]}"
    assert not failures, "\n\n".join(failures)
    documented = {f"{method.upper()} {path}" for path, methods in document.json()["paths"].items() for method in methods}
    fuzzed = documented - {"GET /openapi.json"}                 # schemathesis leaves out the document it was loaded from (fetched above)
    assert len(documented) == 19 and {op for op, _ in statuses} == fuzzed, sorted(fuzzed ^ {op for op, _ in statuses})
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
