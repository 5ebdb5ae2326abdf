"""What an attack on a production-mode deployment found, each reproduced:
input that poisoned the store, anonymous traffic eating the write budget,
limits that multiplied with the worker count, one tenant's profiles open
to another, lost audit rows, and the small doors (encoded slashes,
transfer codings, digits from other scripts, names with control
characters)."""

import json
import socket
import sqlite3
import threading

import pytest
import requests

import callbacks
import levqor
from support import KEY, Client, Server, make_app, wait_until

INTAKE = "/api/v1/intake"
JOB = {"workflow": "w", "payload": {}}
ADMIN = {"X-Api-Key": KEY}


def managed_key(client, role="client", **fields):
    r = client.post("/api/v1/keys", {"name": "k", "role": role, **fields}, key=KEY)
    assert r.status == 201, r
    return r.json()["key"]


# -- non-finite numbers never get in --------------------------------------------------


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 400, b"-" + b"9" * 400])
def test_numbers_past_a_double_are_invalid_json_at_intake(client, number):
    r = client.request("POST", INTAKE, body=b'{"workflow":"ext.x","payload":{"x":' + number + b"}}")
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    assert client.app.services.engine.counts()["by_status"]["queued"] == 0


def test_numbers_past_a_double_are_refused_in_meta_and_results(client):
    r = client.request("POST", "/api/v1/users/upsert",
                       body=b'{"email":"a@example.com","meta":{"x":1e400}}')
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    job_id = client.post(INTAKE, {"workflow": "ext.x", "payload": {}}).json()["job_id"]
    claim = client.post("/api/v1/jobs/claim", {"workflows": ["ext.x"]}).json()["job"]
    r = client.request("POST", f"/api/v1/jobs/{job_id}/complete",
                       body=b'{"lease_token":"%s","result":{"x":1e999}}' % claim["lease_token"].encode())
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    assert client.get(f"/api/v1/status/{job_id}").json()["status"] == "running"


def test_large_but_finite_numbers_still_pass(client):
    r = client.request("POST", INTAKE, body=b'{"workflow":"w","payload":{"x":1e300,"n":' + b"9" * 300 + b"}}")
    assert r.status == 202


@pytest.mark.server
def test_a_poisoned_payload_cannot_stop_the_service_from_starting(tmp_path):
    # The attack: intake 1e400, cancel it, kill -9, and every restart failed.
    env = dict(API_KEYS=KEY, JOB_STORE="sqlite", WEB_CONCURRENCY=2,
               CALLBACK_SECRET="whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
    srv = Server(tmp_path, **env).start()
    try:
        r = requests.post(srv.url + INTAKE, data=b'{"workflow":"ext.x","payload":{"x":1e400}}',
                          headers={**ADMIN, "Content-Type": "application/json"}, timeout=5)
        assert r.status_code == 400
    finally:
        srv.kill()
    again = Server(tmp_path, **env).start()
    again.stop()


# -- anonymous traffic has buckets of its own --------------------------------------------


def test_keyless_writes_do_not_use_up_the_clients_write_budget(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY, RATE_BURST=1000, RATE_GLOBAL=20, RATE_ANON=40,
                   RATE_ANON_GLOBAL=40)
    attackers = [Client(app, remote_addr=f"198.51.100.{i}") for i in range(13)]
    for i in range(520):  # 520 keyless POSTs to a missing path from 13 addresses
        attackers[i % 13].post("/api/v1/nothing-here", {})
    anon = [a.post(INTAKE, JOB).status for a in attackers]
    assert set(anon) <= {401, 429} and 429 in anon  # the anonymous buckets ran dry
    client = Client(app, remote_addr="203.0.113.7")
    assert [client.post(INTAKE, JOB, key=KEY).status for _ in range(8)] == [202] * 8
    app.stop()


def test_wrong_keys_take_from_the_anonymous_buckets_too(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY, RATE_GLOBAL=5, RATE_ANON=3)
    c = Client(app)
    assert [c.post(INTAKE, JOB, key="not-a-valid-key-at-all").status for _ in range(4)] == [403] * 3 + [429]
    assert [c.post(INTAKE, JOB, key=KEY).status for _ in range(5)] == [202] * 5
    app.stop()


def test_ipv6_clients_are_bucketed_by_their_64(tmp_path):
    app = make_app(tmp_path, RATE_BURST=2)
    statuses = [Client(app, remote_addr=f"2001:db8:1:2::{i:x}").post(INTAKE, JOB).status
                for i in range(1, 4)]
    assert statuses == [202, 202, 429]
    assert Client(app, remote_addr="2001:db8:1:3::1").post(INTAKE, JOB).status == 202
    app.stop()


# -- limits hold per host, whatever the number of workers ------------------------------


def _burst(url, n, headers, threads=8):
    """n POSTs from 8 threads at once, each on a new connection so that
    every worker process gets some; the statuses."""
    statuses, lock = [], threading.Lock()

    def send(count):
        for _ in range(count):
            code = requests.post(url, json=JOB, headers=headers, timeout=10).status_code
            with lock:
                statuses.append(code)

    workers = [threading.Thread(target=send, args=(n // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return statuses


@pytest.mark.server
def test_write_burst_holds_across_worker_processes(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, WEB_CONCURRENCY=2, JOB_STORE="sqlite", RATE_BURST=20,
                 RATE_GLOBAL=10_000).start()
    try:
        statuses = _burst(srv.url + INTAKE, 80, ADMIN)
        # 20 a minute refills one every 3 s: a slow machine may earn one more.
        assert 20 <= statuses.count(202) <= 21 and statuses.count(202) + statuses.count(429) == 80
    finally:
        srv.stop()


@pytest.mark.server
def test_a_keys_rate_holds_across_worker_processes(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, WEB_CONCURRENCY=2, JOB_STORE="sqlite").start()
    try:
        secret = requests.post(srv.url + "/api/v1/keys", headers=ADMIN, timeout=5,
                               json={"name": "slow", "role": "client", "rate_per_minute": 5}).json()["key"]
        statuses = _burst(srv.url + INTAKE, 24, {"X-Api-Key": secret})
        assert statuses.count(202) == 5 and statuses.count(429) == 19
    finally:
        srv.stop()


# -- profiles belong to the key that made them --------------------------------------------


def test_one_tenant_cannot_read_rename_or_rewrite_anothers_profile(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY)
    c = Client(app)
    a, b = managed_key(c), managed_key(c)
    made = c.post("/api/v1/users/upsert", {"email": "ann@example.com", "name": "Ann"}, key=a)
    assert made.status == 201
    user_id = made.json()["user"]["id"]
    assert c.get(f"/api/v1/users/{user_id}", key=b).status == 404
    assert c.get("/api/v1/users?email=ann@example.com", key=b).status == 404
    assert c.request("PATCH", f"/api/v1/users/{user_id}", json={"name": "Mallory"}, key=b).status == 404
    # B's upsert of the same address makes B's own profile, not a rewrite of A's.
    theirs = c.post("/api/v1/users/upsert", {"email": "ann@example.com", "name": "B's Ann"}, key=b)
    assert theirs.status == 201 and theirs.json()["user"]["id"] != user_id
    assert c.get(f"/api/v1/users/{user_id}", key=a).json()["name"] == "Ann"
    assert c.get(f"/api/v1/users/{user_id}", key=KEY).json()["name"] == "Ann"  # admin sees all
    app.stop()


def test_public_user_reads_keep_the_seeds_behaviour(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY, PUBLIC_USER_READS=1)
    c = Client(app)
    user_id = c.post("/api/v1/users/upsert", {"email": "pub@example.com"}, key=KEY).json()["user"]["id"]
    assert c.get(f"/api/v1/users/{user_id}").status == 200
    assert c.get("/api/v1/users?email=pub@example.com").json()["id"] == user_id
    # A tenant's profiles stay its own, and it still finds them with its key.
    tenant = managed_key(c)
    theirs = c.post("/api/v1/users/upsert", {"email": "t@example.com"}, key=tenant).json()["user"]["id"]
    assert c.get(f"/api/v1/users/{theirs}").status == 404
    assert c.get("/api/v1/users?email=t@example.com").status == 404
    assert c.get("/api/v1/users?email=t@example.com", key=tenant).json()["id"] == theirs
    assert c.get(f"/api/v1/users/{theirs}", key=tenant).status == 200
    app.stop()


def test_meta_limits_hold_for_the_merged_profile(client):
    user_id = client.post("/api/v1/users/upsert", {"email": "m@example.com"}).json()["user"]["id"]
    statuses = [client.request("PATCH", f"/api/v1/users/{user_id}",
                               json={"meta": {f"k{i}-{j}": "x" * 100 for j in range(100)}}).status
                for i in range(30)]
    assert statuses[0] == 200 and set(statuses[1:]) == {400}
    meta = client.get(f"/api/v1/users/{user_id}").json()["meta"]
    assert len(meta) == 100 and len(json.dumps(meta, separators=(",", ":"))) <= 16 * 1024
    # Upserts merge too, and are held to the same limits.
    r = client.post("/api/v1/users/upsert", {"email": "m@example.com", "meta": {"one-more": 1}})
    assert r.status == 400 and r.json()["field"] == "meta"
    # Deleting keys (null) makes room again.
    r = client.request("PATCH", f"/api/v1/users/{user_id}", json={"meta": {"k0-0": None, "new": 1}})
    assert r.status == 200 and "new" in r.json()["user"]["meta"]


# -- numbers as text are ASCII digits ------------------------------------------------------


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A1", "%EF%BC%95", "1%C2%B2", "+5", "-1", " 5"])
def test_limit_with_digits_from_other_scripts_is_400(client, limit):
    r = client.get(f"/api/v1/jobs?limit={limit}")
    assert r.status == 400 and r.json()["error"] == "invalid_query"


@pytest.mark.parametrize("value, seconds", [("12", 12), ("\u0661\u0662", None), ("\u00b2", None),
                                            ("-5", None), ("99999", 3600), (None, None)])
def test_a_receivers_retry_after_is_read_in_ascii_digits_only(value, seconds):
    assert callbacks._retry_after(value) == seconds


def test_content_length_in_other_digits_is_400(tmp_path):
    app = make_app(tmp_path)
    c = Client(app, lint=False)  # wsgiref.validate would refuse the environ itself
    r = c.request("POST", INTAKE, json=JOB, environ={"CONTENT_LENGTH": "\u0662\u0663"})
    assert r.status == 400 and r.json()["error"] == "bad_request"
    app.stop()


# -- encoded slashes, codings, keys and names ---------------------------------------------------


def test_an_encoded_slash_never_reaches_another_route(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY)
    c = Client(app)
    for raw in ("/api%2Fv1%2Fkeys", "/api/v1%2Fkeys", "/api/v1/keys%2F"):
        r = c.get(raw, key=KEY, environ={"RAW_URI": raw, "PATH_INFO": "/api/v1/keys"})
        assert r.status == 404 and r.json()["error"] == "not_found", raw
    job_id = c.post(INTAKE, JOB, key=KEY).json()["job_id"]
    raw = f"/api/v1/status/{job_id}%2Fx"
    assert c.get(raw, key=KEY, environ={"RAW_URI": raw}).status == 404
    # Percent-encoding that decodes to an ordinary character is still that character.
    raw = f"/api/v1/status/{job_id[:-1]}%{ord(job_id[-1]):02X}"
    assert c.get(raw, key=KEY, environ={"RAW_URI": raw}).status == 200
    app.stop()


@pytest.mark.server
def test_an_encoded_slash_through_gunicorn(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /api%2Fv1%2Fkeys HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY.encode()
                  + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404") and b'"not_found"' in answer


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "chunked, chunked", "br"])
def test_transfer_codings_we_do_not_apply_are_501(client, coding):
    r = client.request("POST", INTAKE, body=json.dumps(JOB).encode(),
                       headers={"Transfer-Encoding": coding})
    assert r.status == 501 and r.json()["error"] == "unsupported_transfer_encoding"


def test_a_content_encoding_is_refused(client):
    r = client.request("POST", INTAKE, body=json.dumps(JOB).encode(), headers={"Content-Encoding": "gzip"})
    assert r.status == 415


def test_admin_keys_with_the_managed_prefix_are_refused_at_start():
    with pytest.raises(levqor.ConfigError, match="lq_"):
        levqor.Settings.from_env({"API_KEYS": "lq_0123456789abcdefghij"})


@pytest.mark.parametrize("name", ["a\x00b", "bad\u202ename", "\u200bzero", "sp ace", ".dot-first", "x" * 129])
def test_workflow_names_hold_to_the_registration_pattern(client, name):
    r = client.post(INTAKE, {"workflow": name, "payload": {}})
    assert r.status == 400 and r.json()["field"] == "workflow"
    r = client.post("/api/v1/jobs/claim", {"workflows": [name]})
    assert r.status == 400


# -- defaults a new user does not trip over ---------------------------------------------


def test_development_allows_more_writes_than_production():
    dev = levqor.Settings.from_env({})
    prod = levqor.Settings.from_env({"LEVQOR_ENV": "production"})
    assert (prod.rate_burst, prod.rate_global) == (20, 200)
    assert dev.rate_burst >= 100 and dev.rate_global >= 1000
    assert levqor.Settings.from_env({"RATE_BURST": "7"}).rate_burst == 7


# -- audit rows survive kill -9 -------------------------------------------------------


@pytest.mark.server
def test_every_acknowledged_intake_has_its_audit_row_after_kill_9(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, JOB_STORE="sqlite", WEB_CONCURRENCY=2, RATE_BURST=10**6,
                 RATE_GLOBAL=10**6).start()
    acknowledged, stop = [], threading.Event()

    def write():
        s = requests.Session()
        for _ in range(3000):  # bounded even if the kill never lands
            if stop.is_set():
                return
            try:
                r = s.post(srv.url + INTAKE, json={"workflow": "ext", "payload": {}, "max_cost": 0},
                           headers=ADMIN, timeout=5)
            except requests.RequestException:
                return
            if r.status_code == 202:
                acknowledged.append(r.headers["X-Request-ID"])

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 400, 30, 0.02)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(10)
    conn = sqlite3.connect(tmp_path / "levqor.db")
    audited = {r[0] for r in conn.execute("SELECT request_id FROM audit_log WHERE status = 202")}
    conn.close()
    assert len(acknowledged) >= 400
    assert set(acknowledged) <= audited


def test_an_audited_change_is_refused_while_its_audit_row_could_not_be_kept(client):
    client.app.services.recorder.MAX_PENDING = 0  # as if the writer had fallen 50,000 rows behind
    r = client.post(INTAKE, JOB)
    assert r.status == 503 and r.json()["error"] == "storage_busy"
    assert client.app.services.engine.counts()["by_status"]["queued"] == 0


def test_the_memory_job_store_refuses_several_worker_processes():
    with pytest.raises(levqor.ConfigError, match="WEB_CONCURRENCY"):
        levqor.Settings.from_env({"WEB_CONCURRENCY": "2"})
    assert levqor.Settings.from_env({"WEB_CONCURRENCY": "2", "JOB_STORE": "sqlite"}).workers == 2


@pytest.mark.parametrize("raw", [b"\x0b", b"\x0c", b" \x0b ", b"\x1c"])
def test_a_body_of_what_json_does_not_call_whitespace_is_invalid(client, raw):
    job_id = client.post(INTAKE, JOB).json()["job_id"]
    r = client.request("POST", f"/api/v1/_dev/complete/{job_id}", body=raw)
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    assert client.get(f"/api/v1/status/{job_id}").json()["status"] == "queued"
