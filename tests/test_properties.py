"""Property tests: arbitrary paths, headers and bodies, in-process, never
answer 500 and never break the WSGI contract (wsgiref.validate checks every
call). Seeded and bounded."""

import json

import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

import web
import wsgi_routes
from support import KEY, Client, make_app

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# What a WSGI server can put in PATH_INFO: latin-1 text (bytes as code points).
latin1 = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=30)
ROUTE_PATHS = [p.replace("<path:path>", "legal/x").replace("<job_id>", "0" * 32)
               .replace("<user_id>", "0" * 32).replace("<key_id>", "key_0") for _, p, *_ in wsgi_routes.ROUTES]
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS", "TRACE"])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("props"), API_KEYS=KEY, RATE_BURST=10**9, RATE_GLOBAL=10**9,
                   RATE_READ=10**9, RATE_WORKER=10**9, MAX_CONTENT_LENGTH=65536)
    yield Client(app)
    app.stop()


def answered(r):
    assert r.status < 500, r
    if r.body and r.headers.get("content-type") == "application/json":  # HEAD has no body
        body = json.loads(r.body)
        if r.status >= 400:
            assert set(body) >= {"error", "message", "request_id"}, body
    return r


@SETTINGS
@given(method=METHODS, path=latin1)
def test_the_router_answers_any_path(client, method, path):
    answered(client.request(method, "/" + path.replace("?", "")))


def test_router_match_only_raises_404_or_405():
    @SETTINGS
    @given(method=METHODS, path=st.text(max_size=100))
    def check(method, path):
        try:
            wsgi_routes.ROUTER.match(method, path)
        except web.HTTPError as exc:
            assert exc.status in (404, 405)
    check()


@SETTINGS
@given(path=st.sampled_from(ROUTE_PATHS), method=METHODS, body=st.binary(max_size=2000))
def test_arbitrary_bytes_as_a_body(client, path, method, body):
    answered(client.request(method, path, body=body, key=KEY))


@SETTINGS
@given(path=st.sampled_from(ROUTE_PATHS), method=st.sampled_from(["POST", "PATCH", "DELETE"]),
       value=json_values)
def test_arbitrary_json_to_every_handler(client, path, method, value):
    answered(client.request(method, path, body=json.dumps(value).encode(), key=KEY))


@SETTINGS
@given(value=st.dictionaries(st.sampled_from(["workflow", "payload", "priority", "callback_url",
                                              "max_cost", "email", "name", "meta", "locale",
                                              "currency", "workflows", "lease_token", "result"]),
                             json_values, max_size=6),
       path=st.sampled_from(["/api/v1/intake", "/api/v1/users/upsert", "/api/v1/jobs/claim"]))
def test_near_valid_bodies(client, value, path):
    answered(client.request("POST", path, json=value, key=KEY))


# A number no JSON consumer downstream can hold, spliced in anywhere.
NON_FINITE = st.sampled_from(["1e400", "-1e400", "1E+999", "-9e9999", "9" * 400, "-" + "9" * 320,
                              "Infinity", "-Infinity", "NaN"])
HOLE = "\u0000hole\u0000"
with_hole = st.recursive(
    st.just(HOLE) | st.none() | st.integers(-2**63, 2**63) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@SETTINGS
@given(value=with_hole, bad=NON_FINITE,
       path=st.sampled_from(["/api/v1/intake", "/api/v1/users/upsert", "/api/v1/jobs/claim"]))
def test_a_non_finite_number_anywhere_is_invalid_json(client, value, bad, path):
    text = json.dumps({"workflow": "w", "email": "p@example.com", "payload": {"v": value},
                       "meta": {"v": value}})
    assume(json.dumps(HOLE) in text)
    held = client.app.services.engine.counts()["by_status"]["queued"]
    r = answered(client.request("POST", path, body=text.replace(json.dumps(HOLE), bad).encode(), key=KEY))
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    assert client.app.services.engine.counts()["by_status"]["queued"] == held


@SETTINGS
@given(raw=latin1, method=METHODS)
def test_any_raw_path_is_routed_without_a_500(client, raw, method):
    path = "/" + raw.replace("?", "")
    answered(client.request(method, path, key=KEY, environ={"RAW_URI": path}))


@SETTINGS
@given(headers=st.dictionaries(
    st.sampled_from(["X-Api-Key", "X-Request-ID", "Origin", "Idempotency-Key", "If-None-Match",
                     "If-Modified-Since", "X-Forwarded-For", "User-Agent", "Content-Type",
                     "Transfer-Encoding", "Content-Encoding", "Access-Control-Request-Method"]),
    latin1, max_size=6),
    path=st.sampled_from(ROUTE_PATHS), method=METHODS)
def test_arbitrary_headers(client, headers, path, method):
    content_type = headers.pop("Content-Type", "application/json")
    answered(client.request(method, path, body=b'{"workflow": "w", "payload": {}}', headers=headers,
                            content_type=content_type))


@SETTINGS
@given(query=latin1)
def test_arbitrary_query_strings(client, query):
    for path in ("/api/v1/users", "/api/v1/jobs", "/api/v1/usage"):
        answered(client.request("GET", f"{path}?{query}", key=KEY))


@seed(7)
@SETTINGS
@given(text=st.text(max_size=300))
def test_any_unicode_path_without_lint(tmp_path_factory, text):
    # Servers that are not strictly WSGI may hand over any str at all.
    app = make_app(tmp_path_factory.mktemp("u"), API_KEYS=KEY)
    r = Client(app, lint=False).request("GET", "/" + text.replace("?", ""), key=KEY)
    assert r.status < 500
    app.stop()
