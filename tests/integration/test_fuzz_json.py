"""Fuzzing a real `mlnb serve` beyond its OpenAPI document (test_fuzz.py covers what the document describes).

Over HTTP (httpx): every route the server documents gets hypothesis-made requests: valid bodies with one place changed (any JSON
value in any field, a field taken out or added, raw tokens written into the JSON text: NaN/Infinity, 1e309, 10**400, lone
surrogates, NUL, right-to-left text, nesting to orjson's depth limit and past it, duplicate keys, cut-off text), arbitrary JSON
values as the whole body, and wrong or odd headers (Content-Type, Inference-Header-Content-Length, X-Request-Id, credentials).
Over a raw socket: malformed HTTP (bad, negative, huge or non-numeric Content-Length, a body without one, truncated bodies, chunked
encoding oddities, garbage request lines). Both run against a server without access control and one with a keys file (predict,
operate and admin keys; valid, wrong and malformed credentials).

What must hold: no 5xx ever; every 4xx is a JSON `{"error": ...}` whose message names what was wrong: the field (or the input or
column) a changed body got wrong, the header (Content-Type, Content-Length, credentials), or, for JSON that does not parse, says
"malformed JSON" and where. Where HTTP gives no way to answer, a dropped connection is accepted; `NO_ANSWER` lists those cases.

The default run makes a few thousand cases in about a minute; `MLNB_FUZZ_EXAMPLES` (examples per body-taking route on the open
server, default 300; the other groups scale with it) makes it longer. The slow test runs five times as many with other seeds.
The module ends by printing and writing `reports/fuzz-summary.json`: cases run, routes, the status histogram and the 5xx count."""
import json
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from mlnb.serving.auth import RANK, includes, required_role
from serving import Server, create_key, secured_params, serve_params, signed_model_dir
from conftest import ROOT

EXAMPLES = int(os.environ.get("MLNB_FUZZ_EXAMPLES", "300"))     # per body-taking route on the open server
SENTINEL = "\x01mlnb-fuzz\x01"                                    # where a raw token goes in the JSON text
BODY_ROUTES = ("POST /invocations", "POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer",
               "POST /feedback", "POST /admin/rollout/{action}")


# --- what was seen, for the summary -------------------------------------------------------------------------------------------
SEEN = {"cases": 0, "statuses": Counter(), "routes": set(), "by_route": Counter(), "no_answer": Counter(), "failures": [], "seconds": Counter()}


def note(group: str, route: str, status: int | str) -> None:
    SEEN["cases"] += 1
    SEEN["statuses"][str(status)] += 1
    SEEN["routes"].add(route)
    SEEN["by_route"][f"{group} {route} {status}"] += 1


@pytest.fixture(scope="module", autouse=True)
def summary():
    "After the module: one line on stdout and reports/fuzz-summary.json (cases, routes, statuses, 5xx)."
    started = time.time()
    yield
    if not SEEN["cases"]: return           # only the fixed cases ran: keep the last fuzzing run's summary
    statuses = dict(sorted(SEEN["statuses"].items()))
    server_errors = sum(n for s, n in statuses.items() if s[:1] == "5")
    routes = {r.removeprefix("raw ") for r in SEEN["routes"]}
    line = f"fuzz: {SEEN['cases']} cases over {len(routes)} routes, statuses {statuses}, 5xx: {server_errors}"
    print("\n" + line)
    out = ROOT / "reports" / "fuzz-summary.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"summary": line, "cases": SEEN["cases"], "routes": sorted(SEEN["routes"]), "statuses": statuses,
                               "server_errors": server_errors, "no_answer": dict(SEEN["no_answer"]), "seconds": round(time.time() - started, 1),
                               "failures": SEEN["failures"][:100], "seconds_by_route": dict(SEEN["seconds"].most_common()),
                               "by_route": dict(sorted(SEEN["by_route"].items()))}, indent=1) + "\n")


# --- servers --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_server(onnx_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-json")
    model_dir = signed_model_dir(onnx_models["a"], root / "model", root / "keys")
    s = Server(root / "server", serve_params(model_dir, root / "keys", root / "logs")).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(onnx_models, tmp_path_factory):
    """Access control on (plain HTTP, so the raw socket can talk to it; test_fuzz.py covers TLS), /metrics guarded, a key per role;
    and a 50/50 split with a challenger, routed by a `customer_id` field, so requests go through the rollout's path too."""
    root = tmp_path_factory.mktemp("fuzz-json-keys")
    model_dir = signed_model_dir(onnx_models["a"], root / "model", root / "keys")
    challenger = signed_model_dir(onnx_models["b"], root / "challenger", root / "keys")
    rollout = {"mode": "split", "challenger": str(challenger / "model.onnx"), "weights": {"champion": 0.5, "challenger": 0.5},
               "key_field": "customer_id"}
    params = secured_params((model_dir, root / "keys"), root / "server", auth={"metrics_public": False}, rollout=rollout)
    keys = {role: create_key(root / "server", role, role) for role in ("predict", "operate", "admin")}
    s = Server(root / "server", params).wait_ready()
    yield s, keys
    s.stop()


@dataclass
class Target:
    "What the cases are made from: the routes the server documents, valid bodies, and an id it issued."
    server: Server
    operations: list[tuple[str, str]]       # (method, path template)
    bodies: dict[str, object]               # route -> a valid body
    version: str
    keys: dict[str, str]                    # role -> key; empty without access control


def target(s: Server, keys: dict[str, str] = {}) -> Target:
    headers = {"Authorization": f"Bearer {keys['admin']}"} if keys else {}
    document = s.client.get("/openapi.json", headers=headers).json()
    operations = [(m.upper(), p) for p, ms in document["paths"].items() for m in ms]
    v2 = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    records = document["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["example"]["dataframe_records"]
    version = s.client.get("/v2/models/churn", headers=headers).json()["versions"][0]
    answered = s.client.post("/invocations", json={"dataframe_records": records}, headers=headers).json()
    pid = answered["predictions"][0]["prediction_id"]
    row = records[0]
    rollout = s.client.get("/admin/rollout", headers=headers).json()
    if (key_field := rollout["routing_key"]["field"]) is not None:         # rows carry the routing key (taken out before the model)
        assert rollout["mode"] == "split" and rollout["challenger"], rollout
        records = [{**r, key_field: f"customer-{i}"} for i, r in enumerate(records * 3)]
        row = records[0]
        v2 = {"inputs": [*v2["inputs"], {"name": key_field, "shape": [1], "datatype": "BYTES", "data": ["customer-0"]}]}
    bodies = {"v2": v2, "dataframe_records": {"dataframe_records": records * 2},
              "dataframe_split": {"dataframe_split": {"columns": list(row), "data": [list(row.values())] * 2}},
              "instances": {"instances": records}, "inputs": {"inputs": {k: [v, v] for k, v in row.items()}},
              "feedback": {"feedback": [{"prediction_id": pid, "actual": "No"}]}, "feedback_list": [{"prediction_id": pid, "actual": "Yes"}],
              "rollout": {"reason": "fuzz", "mode": "canary", "challenger": "no/such/model.onnx"}}
    return Target(s, operations, bodies, version, keys)


# --- JSON values and changes to a body -------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, -1, 1e300, -1e-300, 2**63, 2**64]),
                    st.text(max_size=20), st.sampled_from(["", "churn", "FP32", "BYTES", "No", "Yes", "0", "1e309", "NaN",
                                                           "Infinity", "-Infinity", "\u202eLTR\u202c", "a\x00b", "\ufeff", "x" * 300,
                                                           "../" * 100, "churn@\x00", "models:/churn/1", "a/b@c/d"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def nest(depth: int, inner: str = "1", kind: str = "list") -> str:
    return "[" * depth + inner + "]" * depth if kind == "list" else '{"a":' * depth + inner + "}" * depth


# raw JSON text put in place of a value: tokens orjson refuses (NaN, 1e309, 10**400 overflows a double, a lone surrogate, nesting
# past its limit of 1024) and ones it takes (1e-400 is 0.0, NUL, RTL marks, nesting up to the limit, duplicate keys)
TOKENS = ["NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf", '"NaN"', '"Infinity"', '"-Infinity"', "1e309", "-1e309", "1" + "0" * 400,
          "-" + "9" * 400, "1e-400", "-0", "0e0", "1E+2", '"\\ud800"', '"\\udfff"', '"\\ud800\\u0041"', '"a\\u0000b"', '"\\u0000"',
          '"\u202e\u05d0\u05d1"', '"\\u202eevil"', '"\ufeff"', '"\U0001f600"', '"\\uDBFF\\uDFFF"', "tru", "nul", '"unterminated', "01",
          "+1", ".5", "1.", "0x10", "[1,]", '{"a":1,}', "[1 2]", "'single'", "{}", "[]", '{"a":1,"a":2}', '{"a":{"b":1},"a":[1]}',
          *(nest(n) for n in (2, 64, 200, 255, 256, 999, 1000, 1023, 1024, 1025, 3000)), *(nest(n, kind="dict") for n in (64, 255, 256, 1024, 1025)),
          nest(1023, '"x"'), nest(3000, "")]


def paths(value, prefix=()) -> list[tuple]:
    "Every place in a JSON value: the root, each key of each object and each index of each list."
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items(): out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]): out += paths(v, (*prefix, i))        # three items are enough to mean "any item"
    return out


def at(value, path):
    for p in path: value = value[p]
    return value


def replaced(value, path, new):
    if not path: return new
    copy = value.copy()
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def removed(value, path):
    copy = value.copy()
    if len(path) == 1: del copy[path[0]]
    else: copy[path[0]] = removed(value[path[0]], path[1:])
    return copy


def field_names(body, path) -> set[str]:
    """What an error about the value at `path` may name: the innermost key on the path, the input or column the value belongs
    to (a V2 tensor's name, a `dataframe_split` column); for the body itself, nothing in particular."""
    if not path: return set()              # the whole body: any clear message (it names what the body must hold)
    keys = [p for p in path if isinstance(p, str)]
    names = {keys[-1]} if keys else set()
    if isinstance(path[0], int) and keys: names.add(keys[-1])                                   # a bare feedback list
    if len(path) >= 2 and path[0] == "inputs" and isinstance(path[1], int):                         # a V2 tensor
        tensor = body["inputs"][path[1]]
        if isinstance(tensor, dict) and isinstance(tensor.get("name"), str): names.add(tensor["name"])
        names.add(f"inputs[{path[1]}]")
    if path[:1] == ("dataframe_split",) and len(path) >= 3:
        columns = body["dataframe_split"]["columns"]
        j = path[2] if path[1] == "columns" else path[3] if len(path) >= 4 else None
        if isinstance(j, int) and j < len(columns): names.add(columns[j])
    if path[:1] == ("inputs",) and isinstance(body["inputs"], dict) and len(path) >= 2: names.add(path[1])
    if len(path) == 1 and isinstance(path[0], str): names.add(path[0])
    return {n for n in names if isinstance(n, str) and n}


@dataclass(frozen=True)
class Case:
    kind: str                   # "changed" (one place in a valid body), "token" (raw text in a valid body), "value" (any JSON), "text"
    method: str
    route: str                  # the path template
    url: str
    body: bytes
    headers: tuple = ()
    names: frozenset = frozenset()      # for a 400: what its message must name (one of them)

    def describe(self) -> str:
        return f"{self.kind} {self.method} {self.url} headers={dict(self.headers)} body={self.body[:300]!r}"


def dumps(value) -> bytes:
    "JSON text of any value the strategies make (integers past 64 bits too), non-ASCII as UTF-8."
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def text_with(body, path, token: str) -> bytes:
    "The JSON text of `body` with the raw `token` where the value at `path` was."
    return dumps(replaced(body, path, SENTINEL)).replace(dumps(SENTINEL), token.encode())


@st.composite
def changed_body(draw, body):
    "A valid body with one change, as bytes, and what an error about it must name."
    where = draw(st.sampled_from(paths(body)))
    names = field_names(body, where)
    how = draw(st.sampled_from(["value", "value", "value", "token", "token", "remove", "add", "duplicate"]))
    if how == "remove" and where:
        return dumps(removed(body, where)), names
    if how == "add" and isinstance(at(body, where), dict):
        key = draw(st.text(max_size=10))
        return dumps(replaced(body, where, {**at(body, where), key: draw(json_values)})), names | {key} if key else names
    if how == "duplicate" and where and isinstance(where[-1], str):
        parent, key = at(body, where[:-1]), where[-1]
        wrong, first = dumps(draw(json_values)).decode(), draw(st.booleans())
        pairs = [f"{dumps(k).decode()}:{dumps(v).decode()}" for k, v in parent.items() if k != key]
        twice = [f"{dumps(key).decode()}:{dumps(parent[key]).decode()}", f"{dumps(key).decode()}:{wrong}"]
        text = "{" + ",".join(pairs + (twice if first else twice[::-1])) + "}"
        return text_with(body, where[:-1], text), names
    if how == "token":
        return text_with(body, where, draw(st.sampled_from(TOKENS))), names
    return dumps(replaced(body, where, draw(json_values))), names


CONTENT_TYPES = [None, "text/plain", "application/json; charset=utf-8", "APPLICATION/JSON", "application/jsonx", "application/json;",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/octet-stream", "*/*",
                 "application/json, text/plain", " application/json ", "application/json; charset=latin-1", "text/json", "\u00e9/\u00e9"]
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f"), max_size=30)


@st.composite
def headers(draw, method: str, keys: dict[str, str]):
    "Mostly what a client sends (JSON, a valid key when there are keys), sometimes anything."
    h = {}
    if method == "POST":
        ct = "application/json" if draw(st.integers(0, 5)) else draw(st.sampled_from(CONTENT_TYPES) | HEADER_TEXT)
        if ct is not None: h["content-type"] = ct
    if draw(st.integers(0, 9)) == 0: h["inference-header-content-length"] = draw(st.sampled_from(["0", "-1", "10", "99999", "abc", "1e3", " 5"]) | HEADER_TEXT)
    if draw(st.integers(0, 9)) == 0: h["x-request-id"] = draw(HEADER_TEXT)
    if draw(st.integers(0, 9)) == 0: h["x-routing-key"] = draw(HEADER_TEXT)
    if keys:
        who = draw(st.sampled_from(["predict", "operate", "admin"] * 3 + ["none", "wrong", "malformed", "both"]))
        if who in keys:
            if draw(st.booleans()): h["authorization"] = f"Bearer {keys[who]}"
            else: h["x-api-key"] = keys[who]
        if who == "wrong": h["authorization"] = "Bearer mlnb_" + draw(st.text("abcdef0123456789", min_size=0, max_size=40))
        if who == "malformed": h["authorization"] = draw(st.sampled_from(["Bearer", "Basic dXNlcjpwdw==", "bearer  ", "Bearer a b", "\u00e9"]) | HEADER_TEXT)
        if who == "both": h.update({"authorization": f"Bearer {keys['admin']}", "x-api-key": draw(st.sampled_from([keys["predict"], "mlnb_x"]))})
    return tuple((k, v.strip(" \t")) for k, v in h.items())        # httpx sends no padded header value (the raw socket does)


def base_bodies(t: Target, route: str) -> list:
    b = t.bodies
    if route.startswith("POST /v2/"): return [b["v2"]]
    if route == "POST /invocations": return [b["dataframe_records"], b["dataframe_split"], b["instances"], b["inputs"]]
    if route == "POST /feedback": return [b["feedback"], b["feedback_list"]]
    if route == "POST /admin/rollout/{action}": return [b["rollout"]]
    return [{}]


@st.composite
def cases(draw, t: Target, method: str, template: str):
    route = f"{method} {template}"
    odd = draw(st.integers(0, 9)) == 0          # one case in ten has odd path parameters
    name = draw(st.sampled_from(["other", "", "..", "chürn", "%2e%2e"]) | st.text(max_size=8)) if odd else "churn"
    version = draw(st.sampled_from(["0", "-1", "9" * 30, "latest"]) | st.text(max_size=6)) if odd else t.version
    action = draw(st.sampled_from(["", "stop", "START"]) | st.text(max_size=6)) if odd else draw(st.sampled_from(["pause", "resume", "rollback", "start"]))
    concrete = {"name": name or "churn", "version": version or t.version, "action": action or "pause"}
    url = re.sub(r"\{(\w+)\}", lambda m: quote(concrete[m.group(1)], safe=""), template)
    if draw(st.integers(0, 9)) == 0: url += "?" + quote(draw(st.text(max_size=12)), safe="=&")        # queries are ignored, whatever they say
    kind = draw(st.sampled_from(["changed"] * 6 + ["value", "text"] if route in BODY_ROUTES else ["value", "text", "empty", "empty"]))
    if kind == "changed":
        body, names = draw(changed_body(draw(st.sampled_from(base_bodies(t, route)))))
    elif kind == "value": body, names = dumps(draw(json_values)), frozenset()
    elif kind == "text": body, names = draw(st.sampled_from(TOKENS + ["", " ", "\x00", "\xff\xfe"]) | st.text(max_size=40)).encode(), frozenset()
    else: body, names = b"", frozenset()
    return Case(kind, method, template, url, body, draw(headers(method, t.keys)), frozenset(names))


# --- what an answer must be -------------------------------------------------------------------------------------------------------
MALFORMED_JSON = ("malformed JSON", "empty request body")
HEADER_WORDS = {415: ("Content-Type",), 401: ("API key", "credentials"), 403: ("key ",), 413: ("limit",),
                405: ("not allowed",), 404: ("not served here", "no route")}


def unknown_ids(status: int, body: bytes) -> bool:
    "/feedback's 404 when no id was one the server issued: the ids it does not know, not an error message."
    try: answer = orjson.loads(body)
    except orjson.JSONDecodeError: return False
    return status == 404 and isinstance(answer, dict) and answer.get("accepted") == 0 and bool(answer.get("unknown_ids"))


def problems(case: Case, status: int, content_type: str, text: str, t: Target) -> list[str]:
    "What is wrong with the answer to `case` (nothing for a fine one)."
    if status >= 500: return [f"{status}: {text[:300]}"]
    if status < 400: return []
    if not content_type.startswith("application/json"): return [f"{status} is not JSON ({content_type}): {text[:200]}"]
    if unknown_ids(status, text.encode()): return []
    try: error = orjson.loads(text)["error"]
    except Exception: return [f"{status} body has no 'error': {text[:200]}"]
    if not isinstance(error, str) or not error.strip(): return [f"{status} with an empty error"]
    if status in HEADER_WORDS and not any(w.lower() in error.lower() for w in HEADER_WORDS[status]):
        return [f"{status} does not say what it is about ({HEADER_WORDS[status]}): {error}"]
    if status == 400:
        headers = dict(case.headers)
        if any(m in error for m in MALFORMED_JSON): return []           # JSON that does not parse: where, not which field
        if "inference-header-content-length" in headers and "Inference-Header-Content-Length" in error: return []
        if case.names and not any(n in error for n in case.names):
            return [f"400 does not name the field at fault (one of {sorted(case.names)[:6]}): {error[:300]}"]
    if t.keys and status in (401, 403):
        return []
    return []


def role_problem(case: Case, status: int, t: Target) -> str | None:
    "With access control: a request with a known key whose role covers the path is never refused; with none it is (401)."
    path = httpx.URL(case.url).path
    needs = required_role(path, metrics_public=False)
    sent = {v.removeprefix("Bearer ") for k, v in case.headers if k in ("authorization", "x-api-key")}
    roles = {role for role, key in t.keys.items() if key in sent}
    if needs is None or status in (404, 405) and needs == "predict": return None
    if not sent and status != 401: return f"no credentials, but {status}"
    if len(sent) == 1 and roles and includes(roles.pop(), needs) and status in (401, 403): return f"a key that may, but {status}"
    return None


def send(client: httpx.Client, case: Case) -> httpx.Response:
    return client.request(case.method, case.url, content=case.body, headers={k: v.encode("latin-1") for k, v in case.headers})


def fuzz_route(t: Target, group: str, method: str, template: str, examples: int, rng_seed: int | None = None) -> list[str]:
    failures, started = [], time.perf_counter()
    with httpx.Client(base_url=t.server.url, timeout=30) as client:
        @settings(max_examples=examples, derandomize=rng_seed is None, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(cases(t, method, template))
        def run(case):
            r = send(client, case)
            note(group, f"{method} {template}", r.status_code)
            found = problems(case, r.status_code, r.headers.get("content-type", ""), r.text, t)
            if t.keys and (p := role_problem(case, r.status_code, t)): found.append(p)
            failures.extend(f"{p}\n    case: {case.describe()}" for p in found)
        (seed(rng_seed)(run) if rng_seed is not None else run)()
    SEEN["seconds"][f"{group} {method} {template}"] += round(time.perf_counter() - started, 2)
    return failures


def examples_for(method: str, template: str, scale: float) -> int:
    route = f"{method} {template}"
    if route in BODY_ROUTES: return max(10, int(EXAMPLES * scale))
    if route == "POST /admin/reload": return max(5, int(EXAMPLES * scale / 20))       # each one reloads the model
    return max(5, int(EXAMPLES * scale / 12))


def check(failures: list[str], server: Server):
    SEEN["failures"].extend(failures)
    distinct = list(dict.fromkeys(f.split("\n")[0][:160] for f in failures))
    assert not failures, f"{len(failures)} bad answers, {len(distinct)} kinds:\n" + "\n".join(distinct[:30]) + "\n\nfirst cases:\n" + \
        "\n".join(failures[:10]) + f"\n\nserver log:\n{server.stderr()[-2000:]}"


def test_fuzz_json_without_access_control(open_server):
    t = target(open_server)
    failures = []
    for method, template in t.operations:
        failures += fuzz_route(t, "open", method, template, examples_for(method, template, 1.0))
    check(failures, open_server)
    assert open_server.client.post("/invocations", json=t.bodies["dataframe_records"]).status_code == 200     # still serving


def test_fuzz_json_with_access_control(keyed_server):
    s, keys = keyed_server
    t = target(s, keys)
    failures = []
    for method, template in t.operations:
        failures += fuzz_route(t, "keys", method, template, examples_for(method, template, 0.4))
    check(failures, s)


@pytest.mark.slow
def test_fuzz_json_long(open_server, keyed_server):
    "Five times the default run's cases, from other seeds, on both servers."
    for server, keys, group in ((open_server, {}, "open-long"), (*keyed_server, "keys-long")):
        t = target(server, keys)
        failures = []
        for i, (method, template) in enumerate(t.operations):
            failures += fuzz_route(t, group, method, template, examples_for(method, template, 5.0 if not keys else 2.0), rng_seed=1000 + i)
        check(failures, server)


# --- malformed HTTP over a raw socket ---------------------------------------------------------------------------------------------
# Where a dropped connection (or silence until the client gives up) is the only answer HTTP allows, by the kind of case:
NO_ANSWER = {
    "incomplete": "the request is not complete (a Content-Length larger than the bytes sent, a chunked body without its last chunk): "
                  "the server waits for the rest, and a client that then closes has left; there is no one to answer",
    "mutated": "random byte changes to a valid request: some leave it incomplete (see above) or valid with keep-alive, which "
               "the server rightly holds open",
}
WAIT = 1.0          # seconds a raw exchange waits for the server (an incomplete request waits that long, in parallel)


def exchange(port: int, data: bytes, wait: float = WAIT) -> tuple[bytes, str]:
    "Send `data` on a fresh connection; what came back before the server closed (or `wait` passed), and how it ended."
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try: s.sendall(data)
        except OSError: pass                        # the server may answer and close before everything is sent
        got, end, how = b"", time.monotonic() + wait, "closed"
        while True:
            left = end - time.monotonic()
            if left <= 0: how = "timeout"; break
            s.settimeout(left)
            try: chunk = s.recv(65536)
            except socket.timeout: how = "timeout"; break
            except ConnectionResetError: how = "reset"; break
            if not chunk: break
            got += chunk
    return got, how


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    "The HTTP responses in `data`, in order: status, headers, body."
    out = []
    while data.startswith(b"HTTP/"):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep: break
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def request(method: str, path: str, headers: list[str], body: bytes = b"", close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, *(["Connection: close"] if close else [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)


def raw_cases(path: str, body: bytes, keys: dict[str, str]) -> list[tuple[str, str, bytes]]:
    """(name, kind, bytes) for one POST path: `kind` is "answer" (an answer is due) or "incomplete" (see NO_ANSWER).
    The valid body goes with bad framing; malformed request lines and headers go to the same path."""
    auth = [f"Authorization: Bearer {keys['admin']}"] if keys else []
    json_ = ["Content-Type: application/json", *auth]
    n = len(body)
    cases = [
        ("valid", "answer", request("POST", path, [*json_, f"Content-Length: {n}"], body)),
        ("content-length negative", "answer", request("POST", path, [*json_, "Content-Length: -1"], body)),
        ("content-length not a number", "answer", request("POST", path, [*json_, "Content-Length: abc"], body)),
        ("content-length 1e3", "answer", request("POST", path, [*json_, "Content-Length: 1e3"], body)),
        ("content-length +n", "answer", request("POST", path, [*json_, f"Content-Length: +{n}"], body)),
        ("content-length hex", "answer", request("POST", path, [*json_, f"Content-Length: 0x{n:x}"], body)),
        ("content-length overflows", "answer", request("POST", path, [*json_, "Content-Length: " + "9" * 30], body)),
        ("content-length 2**64", "answer", request("POST", path, [*json_, f"Content-Length: {2**64 + n}"], body)),
        ("content-length huge, body not sent", "answer", request("POST", path, [*json_, "Content-Length: 100000000"])),
        ("content-length superscript two", "answer", request("POST", path, [*json_, "Content-Length: \u00b2"], body)),
        ("content-length empty", "answer", request("POST", path, [*json_, "Content-Length: "], body)),
        ("content-length twice, different", "answer", request("POST", path, [*json_, f"Content-Length: {n}", f"Content-Length: {n + 1}"], body)),
        ("content-length twice, same", "answer", request("POST", path, [*json_, f"Content-Length: {n}", f"Content-Length: {n}"], body)),
        ("content-length list", "answer", request("POST", path, [*json_, f"Content-Length: {n}, {n}"], body)),
        ("content-length padded", "answer", request("POST", path, [*json_, f"Content-Length:   {n}   "], body)),
        ("content-length smaller than the body", "answer", request("POST", path, [*json_, f"Content-Length: {max(n // 2, 1)}"], body)),
        ("no content-length, a body", "answer", request("POST", path, json_, body)),
        ("content-length larger than the body", "incomplete", request("POST", path, [*json_, f"Content-Length: {n + 10}"], body)),
        ("body cut off", "incomplete", request("POST", path, [*json_, f"Content-Length: {n}"], body[: n // 2])),
        ("content-type text/plain", "answer", request("POST", path, [*auth, "Content-Type: text/plain", f"Content-Length: {n}"], body)),
        ("content-type form", "answer", request("POST", path, [*auth, "Content-Type: application/x-www-form-urlencoded", f"Content-Length: {n}"], body)),
        ("content-type missing", "answer", request("POST", path, [*auth, f"Content-Length: {n}"], body)),
        ("content-type twice", "answer", request("POST", path, [*json_, "Content-Type: text/plain", f"Content-Length: {n}"], body)),
        ("content-type latin-1", "answer", request("POST", path, [*auth, "Content-Type: application/json\u00e9", f"Content-Length: {n}"], body)),
        ("chunked", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], chunked(body[:5], body[5:]) + b"0\r\n\r\n")),
        ("chunked, extension", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"%x;x=1\r\n%s\r\n0\r\n\r\n" % (n, body))),
        ("chunked, trailer", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], chunked(body) + b"0\r\nX-Trailer: 1\r\n\r\n")),
        ("chunked, bad size", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"zz\r\n" + body + b"\r\n0\r\n\r\n")),
        ("chunked, negative size", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"-5\r\n" + body + b"\r\n0\r\n\r\n")),
        ("chunked, size overflows", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"f" * 40 + b"\r\n" + body + b"\r\n0\r\n\r\n")),
        ("chunked, data longer than its size", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"2\r\n" + body + b"\r\n0\r\n\r\n")),
        ("chunked, no CRLF after data", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"%x\r\n%sXX0\r\n\r\n" % (n, body))),
        ("chunked and content-length", "answer", request("POST", path, [*json_, f"Content-Length: {n}", "Transfer-Encoding: chunked"], chunked(body) + b"0\r\n\r\n")),
        ("chunked twice", "answer", request("POST", path, [*json_, "Transfer-Encoding: chunked, chunked"], chunked(body) + b"0\r\n\r\n")),
        ("transfer-encoding gzip", "answer", request("POST", path, [*json_, "Transfer-Encoding: gzip"], body)),
        ("transfer-encoding xchunked", "answer", request("POST", path, [*json_, "Transfer-Encoding: xchunked"], chunked(body) + b"0\r\n\r\n")),
        ("chunked, no last chunk", "incomplete", request("POST", path, [*json_, "Transfer-Encoding: chunked"], chunked(body))),
        ("chunked, cut in a chunk", "incomplete", request("POST", path, [*json_, "Transfer-Encoding: chunked"], b"%x\r\n%s" % (n, body[: n // 2]))),
        ("expect 100-continue", "answer", request("POST", path, [*json_, "Expect: 100-continue", f"Content-Length: {n}"], body)),
        ("http/1.0", "answer", request("POST", path, [*json_, f"Content-Length: {n}"], body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
        ("pipelined", "answer", request("POST", path, [*json_, f"Content-Length: {n}"], body, close=False) + request("POST", path, [*json_, f"Content-Length: {n}"], body)),
        ("header without colon", "answer", request("POST", path, [*json_, "NoColonHere", f"Content-Length: {n}"], body)),
        ("header name with a space", "answer", request("POST", path, [*json_, "Bad Name: 1", f"Content-Length: {n}"], body)),
        ("header with NUL", "answer", request("POST", path, [*json_, "X-Request-Id: a\x00b", f"Content-Length: {n}"], body)),
        ("obs-fold", "answer", request("POST", path, [*json_, "X-Request-Id: a", " folded", f"Content-Length: {n}"], body)),
        ("bare LF", "answer", request("POST", path, [*json_, f"Content-Length: {n}"], body).replace(b"\r\n", b"\n")),
        ("control characters in a header", "answer", request("POST", path, [*json_, "X-Request-Id: \x01\x7f\x1b[31m", f"Content-Length: {n}"], body)),
        ("authorization latin-1", "answer", request("POST", path, ["Content-Type: application/json", "Authorization: Bearer \u00e9\u00ff", f"Content-Length: {n}"], body)),
        ("huge header", "answer", request("POST", path, [*json_, "X-Big: " + "a" * 70000, f"Content-Length: {n}"], body)),
        ("many headers", "answer", request("POST", path, [*json_, *(f"X-H{i}: {i}" for i in range(300)), f"Content-Length: {n}"], body)),
        ("lower-case method", "answer", request("post", path, [*json_, f"Content-Length: {n}"], body)),
        ("unknown method", "answer", request("BREW", path, [*json_, f"Content-Length: {n}"], body)),
        ("absolute-form target", "answer", request("POST", f"http://evil.example{path}", [*json_, f"Content-Length: {n}"], body)),
        ("asterisk target", "answer", request("OPTIONS", "*", [*auth])),
        ("NUL in the path", "answer", request("POST", path + "\x00x", [*json_, f"Content-Length: {n}"], body)),
        ("space in the path", "answer", request("POST", path + " x", [*json_, f"Content-Length: {n}"], body)),
        ("percent-encoded path", "answer", request("POST", path.replace("/", "/%2e%2e/", 1), [*json_, f"Content-Length: {n}"], body)),
        ("bad percent-encoding", "answer", request("POST", path + "%zz%", [*json_, f"Content-Length: {n}"], body)),
        ("long path", "answer", request("POST", path + "/" + "x" * 20000, [*json_, f"Content-Length: {n}"], body)),
        ("http/9.9", "answer", request("POST", path, [*json_, f"Content-Length: {n}"], body).replace(b"HTTP/1.1", b"HTTP/9.9", 1)),
        ("http/2 preface", "answer", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("TLS hello on plain HTTP", "answer", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40),
        ("garbage line", "answer", b"GARBAGE\r\n\r\n"),
        ("binary", "answer", b"\xff\xfe\x00\x01\r\n\r\n"),
        ("no target", "answer", b"GET\r\n\r\n"),
        ("no version", "answer", f"GET {path}\r\n\r\n".encode()),
        ("upgrade websocket", "answer", request("GET", path, [*auth, "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: x", "Sec-WebSocket-Version: 13"], close=False)),
        ("upgrade h2c", "answer", request("GET", path, [*auth, "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", "Connection: Upgrade, HTTP2-Settings"], close=False)),
    ]
    return cases


def mutated_cases(path: str, body: bytes, keys: dict[str, str], n: int, rng_seed: int) -> list[tuple[str, str, bytes]]:
    "`n` valid requests with 1-3 random byte-level changes each (deleted, inserted, replaced or repeated bytes), reproducibly."
    import random
    rng = random.Random(rng_seed)
    auth = [f"Authorization: Bearer {keys['admin']}"] if keys else []
    valid = bytearray(request("POST", path, ["Content-Type: application/json", *auth, f"Content-Length: {len(body)}"], body))
    alphabet = b"\r\n :;,\t\x00\xff-+0123456789abcdefxGET/HTTP{}[]\"\\"
    out = []
    for i in range(n):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            at_, how = rng.randrange(len(data)), rng.choice(["delete", "insert", "replace", "repeat"])
            size = rng.choice([1, 1, 2, 4, 16])
            if how == "delete": del data[at_:at_ + size]
            elif how == "insert": data[at_:at_] = bytes(rng.choice(alphabet) for _ in range(size))
            elif how == "replace": data[at_:at_ + size] = bytes(rng.choice(alphabet) for _ in range(size))
            else: data[at_:at_] = data[at_:at_ + size * 4]
        out.append((f"mutated {i}", "mutated", bytes(data)))
    return out


def raw_problems(name: str, kind: str, got: bytes, how: str) -> list[str]:
    "What is wrong with what came back for one raw case."
    answers = responses(got)
    if not answers:
        if kind in NO_ANSWER: return []
        return [f"{name}: no answer ({how}, {got[:120]!r})"]
    out = []
    for status, headers, body in answers:
        if status >= 500: out.append(f"{name}: {status} {body[:200]!r}")
        elif status >= 400 and not unknown_ids(status, body):
            try: error = orjson.loads(body)["error"]
            except Exception: out.append(f"{name}: {status} is not a JSON error: {headers.get('content-type')} {body[:200]!r}"); continue
            if status == 400 and "Content-Length" in name.title() and not any(w in error for w in ("Content-Length", "malformed", "body")):
                out.append(f"{name}: 400 does not say what was wrong: {error}")
    return out


def fuzz_raw(t: Target, group: str, mutations: int, rng_seed: int = 0) -> list[str]:
    "Every raw case on every POST route, and the same garbage on a GET route, sent in parallel; the problems found."
    from concurrent.futures import ThreadPoolExecutor
    port = int(t.server.url.rsplit(":", 1)[1])
    concrete = {"name": "churn", "version": t.version, "action": "pause"}
    work = []
    for method, template in t.operations:
        path = re.sub(r"\{(\w+)\}", lambda m: concrete[m.group(1)], template)
        bodies = base_bodies(t, f"{method} {template}")
        body = json.dumps(bodies[0]).encode() if method == "POST" else b"{}"
        cases = raw_cases(path, body, t.keys)
        if method == "POST" and f"{method} {template}" in BODY_ROUTES: cases += mutated_cases(path, body, t.keys, mutations, rng_seed)
        work += [(f"{method} {template}", *case) for case in cases]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda w: (w, exchange(port, w[3])), work))
    failures = []
    for (route, name, kind, data), (got, how) in results:
        answers = responses(got)
        for status, _, _ in answers: note(group, f"raw {route}", status)
        if not answers:
            note(group, f"raw {route}", "no answer")
            SEEN["no_answer"][f"{kind}: {name}" if kind != "mutated" else "mutated"] += 1
        failures += [f"{p}\n    case: {route} {data[:300]!r}" for p in raw_problems(name, kind, got, how)]
    return failures


def test_malformed_http_without_access_control(open_server):
    t = target(open_server)
    failures = fuzz_raw(t, "open", max(10, EXAMPLES // 3))
    check(failures, open_server)
    assert open_server.client.post("/invocations", json=t.bodies["dataframe_records"]).status_code == 200     # still serving


def test_malformed_http_with_access_control(keyed_server):
    s, keys = keyed_server
    t = target(s, keys)
    check(fuzz_raw(t, "keys", max(10, EXAMPLES // 6)), s)
    assert s.client.post("/invocations", json=t.bodies["dataframe_records"], headers={"X-API-Key": keys["predict"]}).status_code == 200


# --- what fuzzing found, fixed: each case failed on main (4972a6c) ---------------------------------------------------------------
ROW = {"tenure": 1.0, "monthly_charges": 20.0, "total_charges": 20.0, "female": 0.0, "senior_citizen": 0.0, "partner": 0.0,
       "dependents": 0.0, "phone_service": 1.0, "paperless_billing": 0.0, "multiple_lines": "No", "internet_service": "DSL",
       "online_security": "No", "online_backup": "No", "device_protection": "No", "tech_support": "No", "streaming_tv": "No",
       "streaming_movies": "No", "contract": "Month-to-month", "payment_method": "Bank transfer (automatic)"}
V2 = {"inputs": [{"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]} for k, v in ROW.items()]}
BINARY = {"content-type": "application/octet-stream"}
FOUND = [   # (what, path, headers, body text, status, what the error says)
    ("a value nested 1,000 deep in a category column (was a 500: RecursionError in the error's repr)", "/invocations", {},
     text_with({"instances": [ROW]}, ("instances", 0, "multiple_lines"), nest(1000)), 400, "'multiple_lines': row 0 value [[[...]]] is not a string"),
    ("an object nested 1,000 deep in a number column (was a 500)", "/invocations", {},
     text_with({"dataframe_records": [ROW]}, ("dataframe_records", 0, "tenure"), nest(1000, kind="dict")), 400, "'tenure': row 0 value {'a': {'a': {...}}} is not a number"),
    ("V2 'data' nested 1,000 deep (was a 500: RecursionError flattening it)", "/v2/models/churn/infer", {},
     text_with(V2, ("inputs", 0, "data"), nest(1000, "1")), 200, None),
    ("a non-ASCII digit in Inference-Header-Content-Length (was a 500: ValueError)", "/v2/models/churn/infer",
     {"inference-header-content-length": "\u00b3"}, dumps(V2).decode(), 400, "Inference-Header-Content-Length '³' does not fit"),
    ("binary data with 'inputs' a number (was a 500: TypeError)", "/v2/models/churn/infer",
     {**BINARY, "inference-header-content-length": "13"}, '{"inputs": 5}xx', 400, "2 bytes of binary data that no input claims"),
    ("binary data with a list as the datatype (was a 500: TypeError)", "/v2/models/churn/infer", {**BINARY, "inference-header-content-length": "83"},
     '{"inputs": [{"name": [1], "datatype": [1], "parameters": {"binary_data_size": 2}}]}xx', 400, "inputs[0]: datatype [1] is not a V2 datatype"),
    ("a rollout challenger too long to be a file name (was a 500: OSError)", "/admin/rollout/start", {},
     dumps({"challenger": "x" * 300}).decode(), 409, "File name too long"),
    ("an MLflow 'inputs' column that is not a list (the error did not say which)", "/invocations", {},
     dumps({"inputs": {**{k: [v] for k, v in ROW.items()}, "contract": {}}}).decode(), 400, "inputs: column 'contract' must be a list of values"),
    ("a dataframe_split row of the wrong length (the error named neither 'data' nor 'columns')", "/invocations", {},
     dumps({"dataframe_split": {"columns": list(ROW)[1:], "data": [list(ROW.values())]}}).decode(), 400,
     "dataframe_split: 'data' row 0 must be a list of 18 values, one per name in 'columns'"),
]


@pytest.mark.parametrize("what,path,headers,text,status,says", FOUND, ids=[f[0].split(" (")[0] for f in FOUND])
def test_what_json_fuzzing_found_stays_fixed(open_server, what, path, headers, text, status, says):
    r = open_server.client.post(path, content=text.encode() if isinstance(text, str) else text,
                                headers={k: v.encode("latin-1") for k, v in {"content-type": "application/json", **headers}.items()})
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    if says: assert says in r.json()["error"], (what, r.text[:300])


def test_what_raw_fuzzing_found_stays_fixed(open_server):
    "A WebSocket Upgrade was answered by uvicorn's handshake code in text/plain (the server has no WebSocket route): now plain HTTP."
    port = int(open_server.url.rsplit(":", 1)[1])
    for key in ("x", "dGhlIHNhbXBsZSBub25jZQ=="):
        got, _ = exchange(port, request("GET", "/invocations", ["Upgrade: websocket", "Connection: Upgrade, close", f"Sec-WebSocket-Key: {key}",
                                                                "Sec-WebSocket-Version: 13"], close=False))
        (status, headers, body), = responses(got)
        assert status == 405 and headers["content-type"] == "application/json", got[:300]
        assert "method GET is not allowed on /invocations" in orjson.loads(body)["error"]


@pytest.mark.parametrize("depth", [200, 255, 256, 1024, 1025, 30_000])            # 30,000 levels: 60 kB, under the body limit
def test_nesting_up_to_and_past_the_parsers_limits(open_server, depth):
    """orjson (the inference routes) takes 1,024 levels and refuses more; pydantic's parser (/feedback, the rollout commands)
    stops earlier. Either way a deep body is a 400: "malformed JSON" past a parser's limit, the field at fault below it."""
    for path, body, field in (("/invocations", {"dataframe_records": [ROW]}, ("dataframe_records", 0, "tenure")),
                              ("/v2/models/churn/infer", V2, ("inputs", 0, "shape")),
                              ("/feedback", {"feedback": [{"prediction_id": "x", "actual": "No"}]}, ("feedback", 0, "actual")),
                              ("/admin/rollout/pause", {"reason": "r"}, ("reason",))):
        r = open_server.client.post(path, content=text_with(body, field, nest(depth)), headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, depth, r.status_code, r.text[:200])
        error = r.json()["error"]
        assert "malformed JSON" in error or field[-1] in error, (path, depth, error[:200])


@pytest.mark.slow
def test_malformed_http_long(open_server, keyed_server):
    "Five times the default run's randomly changed requests, from another seed, on both servers."
    for server, keys, group in ((open_server, {}, "open-long"), (*keyed_server, "keys-long")):
        t = target(server, keys)
        check(fuzz_raw(t, group, 5 * max(10, EXAMPLES // 3), rng_seed=1), server)
