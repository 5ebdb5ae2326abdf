"""Malformed, oversized and hostile input: the right 4xx, the one error shape,
and nothing stored."""

import io
import json

import pytest

from support import Client, make_app

INTAKE = "/api/v1/intake"
UPSERT = "/api/v1/users/upsert"


def assert_error(r, status, code):
    assert r.status == status, r
    body = r.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def jobs_held(client):
    return len(client.app.services.jobs)


@pytest.mark.parametrize("case, raw", [
    ("truncated", b'{"workflow": "w", "payload": {'),
    ("not json", b"workflow=w"),
    ("nan", b'{"workflow": "w", "payload": {"x": NaN}}'),
    ("infinity", b'{"workflow": "w", "payload": {"x": -Infinity}}'),
    ("duplicate keys", b'{"workflow": "a", "workflow": "b", "payload": {}}'),
    ("duplicate nested keys", b'{"workflow": "a", "payload": {"k": 1, "k": 2}}'),
    ("invalid utf-8", b'{"workflow": "\xff\xfe", "payload": {}}'),
    ("lone surrogate", b'{"workflow": "\\ud800", "payload": {}}'),
    ("lone surrogate in key", b'{"workflow": "w", "payload": {"\\udfff": 1}}'),
    ("too deep", b'{"workflow": "w", "payload": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"),
    ("absurdly deep", b'{"workflow": "w", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("empty", b""),
    ("whitespace", b"   "),
])
def test_bad_json_is_400_invalid_json(client, case, raw):
    r = client.request("POST", INTAKE, body=raw)
    if case == "absurdly deep":  # over the 512 KiB default cap before it is even parsed
        assert r.status in (400, 413)
    else:
        assert_error(r, 400, "invalid_json")
    assert jobs_held(client) == 0


def test_valid_surrogate_pair_is_accepted(client):
    # In the payload: a workflow name holds to the registration pattern.
    r = client.request("POST", INTAKE, body=b'{"workflow": "w", "payload": {"s": "\\ud83d\\ude00"}}')
    assert r.status == 202


def test_nesting_within_the_limit_is_accepted(client):
    payload = {"a": 1}
    for _ in range(25):
        payload = {"a": payload}
    assert client.post(INTAKE, {"workflow": "w", "payload": payload}).status == 202


@pytest.mark.parametrize("body, field", [
    ({"payload": {}}, "workflow"),
    ({"workflow": "w"}, "payload"),
    ({"workflow": "", "payload": {}}, "workflow"),
    ({"workflow": "w" * 129, "payload": {}}, "workflow"),
    ({"workflow": 7, "payload": {}}, "workflow"),
    ({"workflow": "w", "payload": []}, "payload"),
    ({"workflow": "w", "payload": {}, "priority": "urgent"}, "priority"),
    ({"workflow": "w", "payload": {}, "callback_url": "ftp://example.com/x"}, "callback_url"),
    ({"workflow": "w", "payload": {}, "callback_url": "not a url"}, "callback_url"),
    ({"workflow": "w", "payload": {}, "callback_url": "https://"}, "callback_url"),
    ({"workflow": "w", "payload": {}, "callback_url": "https://x.io:99999/"}, "callback_url"),
    ({"workflow": "w", "payload": {}, "callback_url": "https://example.com/" + "a" * 2048}, "callback_url"),
    ({"workflow": "w", "payload": {}, "surprise": 1}, "surprise"),
])
def test_intake_schema_violations_name_the_field(client, body, field):
    assert assert_error(client.post(INTAKE, body), 400, "validation_failed")["field"] == field
    assert jobs_held(client) == 0


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_intake_body_must_be_an_object(client, body):
    assert_error(client.request("POST", INTAKE, body=json.dumps(body).encode()), 400, "validation_failed")


def test_validation_message_does_not_echo_huge_values(client):
    r = client.post(INTAKE, {"workflow": "w", "payload": {}, "priority": "x" * 100_000})
    assert r.status == 400 and len(r.body) < 1000


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "application/jsonx", ""])
def test_wrong_content_type_is_415(client, ctype):
    r = client.request("POST", INTAKE, body=b'{"workflow": "w", "payload": {}}', content_type=ctype)
    assert_error(r, 415, "unsupported_media_type")


def test_json_content_type_with_charset_is_fine(client):
    r = client.request("POST", INTAKE, body=b'{"workflow": "w", "payload": {}}',
                       content_type="application/json; charset=utf-8")
    assert r.status == 202


def test_oversized_body_is_413_before_reading(tmp_path):
    app = make_app(tmp_path, MAX_CONTENT_LENGTH=2048)
    c = Client(app)

    class Exploding(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body must not be read")

    r = c.request("POST", INTAKE, body=b"x", environ={"CONTENT_LENGTH": "4096",
                                                     "wsgi.input": Exploding(b"x")})
    assert_error(r, 413, "payload_too_large")
    app.stop()


def test_chunked_body_over_the_cap_is_413(tmp_path):
    app = make_app(tmp_path, MAX_CONTENT_LENGTH=2048)
    big = json.dumps({"workflow": "w", "payload": {"x": "y" * 5000}}).encode()
    r = Client(app).request("POST", INTAKE, body=big, environ={
        "CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"})
    assert_error(r, 413, "payload_too_large")
    small = json.dumps({"workflow": "w", "payload": {}}).encode()
    r = Client(app).request("POST", INTAKE, body=small, environ={
        "CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"})
    assert r.status == 202
    app.stop()


def test_missing_content_length_is_411(client):
    r = client.request("POST", INTAKE, environ={"CONTENT_TYPE": "application/json"})
    assert_error(r, 411, "length_required")


def test_body_shorter_than_content_length_is_400(client):
    r = client.request("POST", INTAKE, body=b'{"workflow": "w"}',
                       environ={"CONTENT_LENGTH": "100", "wsgi.input": io.BytesIO(b'{"workflow": "w"}')})
    assert_error(r, 400, "incomplete_body")


@pytest.mark.parametrize("length", ["abc", "-5", "1e3"])
def test_bad_content_length_is_400(app, length):
    r = Client(app, lint=False).request("POST", INTAKE, body=b"{}", environ={"CONTENT_LENGTH": length})
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("email", ["", "plain", "a@b", "a@@b.com", "a b@c.com", "a@b..com",
                                   "a@-b.com", "x" * 65 + "@example.com", "a@" + "b" * 250 + ".com",
                                   "a\x00@b.com", "a@b\n.com"])
def test_implausible_emails_are_refused(client, email):
    body = assert_error(client.post(UPSERT, {"email": email}), 400, "validation_failed")
    assert body["field"] == "email"


@pytest.mark.parametrize("body, field", [
    ({"email": "a@b.com", "currency": "JPY"}, "currency"),
    ({"email": "a@b.com", "locale": "english please"}, "locale"),
    ({"email": "a@b.com", "name": "n" * 201}, "name"),
    ({"email": "a@b.com", "meta": "not an object"}, "meta"),
    ({"email": "a@b.com", "meta": {"k": "v" * 20_000}}, "meta"),
    ({"email": "a@b.com", "meta": {str(i): i for i in range(101)}}, "meta"),
    ({"email": "a@b.com", "id": "mine"}, "id"),
    ({"name": "no email"}, "email"),
])
def test_upsert_violations_store_nothing(client, body, field):
    assert assert_error(client.post(UPSERT, body), 400, "validation_failed")["field"] == field
    assert client.get("/api/v1/users?email=a@b.com").status == 404


def test_too_many_query_fields_is_400(client):
    query = "&".join(f"k{i}=v" for i in range(50))
    assert_error(client.get(f"/api/v1/users?email=a@b.com&{query}"), 400, "invalid_query")


def test_repeated_query_parameters_are_400(client):
    r = client.get("/api/v1/users?email=a@b.com&email=c@d.com")
    assert_error(r, 400, "invalid_query")


def test_hostile_email_query_is_just_not_found(client):
    r = client.get("/api/v1/users?email=%27%20OR%201%3D1%20--")
    assert_error(r, 404, "not_found")
