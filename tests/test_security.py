"""Auth, rate limits, client IPs, CORS, response headers, logs and static
files: what stands between Levqor and a hostile client."""

import dataclasses
import io
import json
import os
import threading

import pytest

import levqor
import storage
import wsgi_routes
from support import KEY, NEXT_KEY, Client, make_app, wait_until

INTAKE = "/api/v1/intake"
JOB = {"workflow": "w", "payload": {}}


# -- authentication -------------------------------------------------------------


def test_missing_key_is_401(keyed):
    r = keyed.post(INTAKE, JOB)
    assert r.status == 401 and r.json()["error"] == "unauthorized"
    assert "www-authenticate" in r.headers


@pytest.mark.parametrize("bad", ["wrong-key-0123456789", KEY[:-1], KEY + "x", KEY.upper(),
                                 "caf\xe9-\xff-latin1-bytes", " " + KEY])
def test_wrong_key_is_403(keyed, bad):
    r = keyed.post(INTAKE, JOB, key=bad)
    assert r.status == 403 and r.json()["error"] == "forbidden"


def test_current_and_next_keys_both_work(keyed):
    assert keyed.post(INTAKE, JOB, key=KEY).status == 202
    assert keyed.post(INTAKE, JOB, key=NEXT_KEY).status == 202


def test_non_ascii_key_without_lint_is_still_403(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY)
    r = Client(app, lint=False).post(INTAKE, JOB, key="ключ-\udcff-€")
    assert r.status == 403
    app.stop()


def test_production_without_keys_refuses_to_start(tmp_path):
    with pytest.raises(levqor.ConfigError, match="API_KEYS"):
        make_app(tmp_path, LEVQOR_ENV="production")


def test_open_mode_warns_loudly(tmp_path):
    log = io.StringIO()
    make_app(tmp_path, log=log)
    first = json.loads(log.getvalue().splitlines()[0])
    assert first["level"] == "WARNING" and "OPEN DEVELOPMENT MODE" in first["msg"]


@pytest.mark.parametrize("env, message", [
    ({"RATE_BURST": "lots"}, "RATE_BURST"),
    ({"RATE_READ": "0"}, "RATE_READ"),
    ({"API_KEYS": "short"}, "API_KEYS"),
    ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"KEEPALIVE_LINGER": "60"}, "KEEPALIVE_LINGER"),  # a thread per idle connection, for a minute
])
def test_bad_settings_refuse_to_start(tmp_path, env, message):
    with pytest.raises(levqor.ConfigError, match=message):
        make_app(tmp_path, **env)


def test_keys_are_never_logged_or_stored(tmp_path):
    log = io.StringIO()
    app = make_app(tmp_path, log=log, API_KEYS=KEY)
    c = Client(app)
    c.post(INTAKE, JOB, key=KEY)
    c.post(INTAKE, JOB, key="attacker-guess-0000000000")
    app.services.recorder.flush()
    app.services.log.flush()
    assert KEY not in log.getvalue() and "attacker-guess" not in log.getvalue()
    for stored in tmp_path.glob("levqor.db*"):  # the database, its WAL and shm (not the wake folder)
        assert not stored.is_file() or KEY.encode() not in stored.read_bytes()
    rows = app.services.db.query("SELECT key_id, method, path, status FROM audit_log")
    assert rows == [{"key_id": wsgi_routes.fingerprint(KEY), "method": "POST",
                     "path": INTAKE, "status": 202}]
    app.stop()


# -- audit ------------------------------------------------------------------------


def test_every_authenticated_write_is_audited_with_its_status(keyed):
    user = keyed.post("/api/v1/users/upsert", {"email": "a@example.com"}, key=KEY).json()["user"]
    keyed.request("PATCH", f"/api/v1/users/{user['id']}", json={"name": "A"}, key=KEY)
    job_id = keyed.post(INTAKE, JOB, key=KEY).json()["job_id"]
    keyed.post(f"/api/v1/_dev/complete/{job_id}", {}, key=KEY)
    keyed.post(INTAKE, {"workflow": "w"}, key=KEY)  # a refused write is audited too
    keyed.post(INTAKE, JOB)  # unauthenticated: nobody to attribute it to
    services = keyed.app.services
    services.recorder.flush()
    rows = services.db.query("SELECT method, path, status, request_id FROM audit_log ORDER BY id")
    assert [(r["method"], r["status"]) for r in rows] == [
        ("POST", 201), ("PATCH", 200), ("POST", 202), ("POST", 200), ("POST", 400)]
    assert all(len(r["request_id"]) == 32 for r in rows)
    assert keyed.get("/public/metrics").json()["audit_coverage"] == 100.0


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_an_intake_is_answered_once_its_audit_row_is_written(tmp_path, store):
    """With jobs in the database, an intake's audit rows go in the jobs' own
    transaction (committed together, or neither); in memory, the recorder
    writes them before the answer. Either way the row is there the moment
    the answer is, once, and the coverage counts it."""
    app = make_app(tmp_path, API_KEYS=KEY, JOB_STORE=store)
    try:
        c = Client(app)
        db = app.services.db
        once = c.post(INTAKE, JOB, key=KEY).json()["job_id"]
        replay = {"Idempotency-Key": "order-1"}
        assert c.post(INTAKE, JOB, key=KEY, headers=replay).status == 202
        assert c.post(INTAKE, JOB, key=KEY, headers=replay).headers["idempotent-replayed"] == "true"
        made = c.post("/api/v1/intake/batch", {"jobs": [JOB, JOB]}, key=KEY).json()["jobs"]
        assert c.post(INTAKE, {"workflow": "w"}, key=KEY).status == 400  # refused: not waited for
        rows = db.query("SELECT path, status, request_id FROM audit_log ORDER BY id")
        assert [(r["path"], r["status"]) for r in rows][:5] == [(INTAKE, 202)] * 3 + [
            (f"/api/v1/intake/batch#{j['job_id']}", 202) for j in made]
        assert rows[3]["request_id"] == rows[4]["request_id"] != rows[0]["request_id"]
        assert c.get(f"/api/v1/status/{once}", key=KEY).status == 200
        app.services.recorder.flush()
        assert [r["status"] for r in db.query("SELECT status FROM audit_log ORDER BY id")] == \
            [202] * 5 + [400]
        assert c.get("/public/metrics").json()["audit_coverage"] == 100.0
    finally:
        app.stop()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_claim_is_answered_once_its_audit_row_is_written(tmp_path, store):
    """A worker's claim that takes jobs leaves one audit row, there the
    moment it is answered: with jobs in SQLite, committed in the claim's
    own transaction (one commit before the answer, not two). A claim that
    takes nothing changed nothing, and leaves none."""
    app = make_app(tmp_path, API_KEYS=KEY, JOB_STORE=store)
    claim = "/api/v1/jobs/claim"
    try:
        c = Client(app)
        db = app.services.db
        assert c.post(claim, {"workflows": ["w"]}, key=KEY).status == 204
        for _ in range(2):
            assert c.post(INTAKE, JOB, key=KEY).status == 202
        assert c.post(claim, {"workflows": ["w"]}, key=KEY).status == 200
        assert len(c.post(claim, {"workflows": ["w"], "max_jobs": 5, "wait": 1}, key=KEY).json()["jobs"]) == 1
        rows = db.query("SELECT path, status, request_id FROM audit_log ORDER BY id")
        assert [(r["path"], r["status"]) for r in rows] == [(INTAKE, 202)] * 2 + [(claim, 200)] * 2
        assert rows[2]["request_id"] != rows[3]["request_id"]
        app.services.recorder.flush()
        assert len(db.query("SELECT id FROM audit_log")) == 4
        assert c.get("/public/metrics").json()["audit_coverage"] == 100.0
    finally:
        app.stop()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_waiting_claim_handed_a_new_job_is_answered_once_both_audit_rows_are_written(tmp_path, store):
    """A job queued while a claim waits for it is stored claimed for that
    claim, in its intake's transaction: the intake still answers "queued"
    (as it was accepted), the claim answers the job, and the intake's row
    and the claim's are both there the moment the claim is answered (in
    SQLite, committed with the job)."""
    app = make_app(tmp_path, API_KEYS=KEY, JOB_STORE=store)
    claim = "/api/v1/jobs/claim"
    try:
        c = Client(app)
        answers = {}
        waiting = threading.Thread(target=lambda: answers.update(
            claim=c.post(claim, {"workflows": ["w"], "wait": 10}, key=KEY)))
        waiting.start()
        assert wait_until(lambda: app.services.engine._takers, 5)
        accepted = c.post(INTAKE, JOB, key=KEY)
        waiting.join(10)
        rows = app.services.db.query("SELECT path, status FROM audit_log ORDER BY id")
        assert accepted.status == 202 and accepted.json()["status"] == "queued"
        handed = answers["claim"].json()["job"]
        assert handed["job_id"] == accepted.json()["job_id"] and handed["attempt"] == 1
        assert sorted((r["path"], r["status"]) for r in rows) == [(INTAKE, 202), (claim, 200)]
        app.services.recorder.flush()
        assert len(app.services.db.query("SELECT id FROM audit_log")) == 2  # each once
        assert c.get(f"/api/v1/status/{handed['job_id']}", key=KEY).json()["status"] == "running"
        assert c.post(f"/api/v1/jobs/{handed['job_id']}/complete",
                      {"lease_token": handed["lease_token"], "result": {"ok": True}}, key=KEY).status == 200
        assert c.get(f"/api/v1/status/{handed['job_id']}", key=KEY).json()["status"] == "succeeded"
    finally:
        app.stop()


def test_a_claim_handed_a_job_by_an_intake_that_failed_is_audited_for_the_job_it_takes(tmp_path):
    """An intake whose transaction asked for the waiting claim's audit row,
    then failed, wrote neither: the claim waits on, and when it takes a job
    another way (a workflow with limits: no row in its transaction), its
    row is written after it, once."""
    app = make_app(tmp_path, API_KEYS=KEY, JOB_STORE="sqlite")
    claim = "/api/v1/jobs/claim"
    try:
        c, services = Client(app), app.services
        real_add_many = services.jobs.add_many

        def failing(jobs, idempotency=None, batch_key=None, also=None, take=None):
            if take is not None:  # the transaction asks for the rows, then fails
                also([(dict(jobs[0], **take), True)])
                raise storage.StorageError("busy", "database is locked")
            return real_add_many(jobs, idempotency, batch_key, also, take)

        services.jobs.add_many = failing
        answers = {}
        waiting = threading.Thread(target=lambda: answers.update(
            claim=c.post(claim, {"workflows": ["w"], "wait": 10}, key=KEY)))
        waiting.start()
        assert wait_until(lambda: services.engine._takers, 5)
        refused = c.post(INTAKE, JOB, key=KEY)
        assert refused.status == 503, refused.text
        assert waiting.is_alive()
        services.jobs.add_many = real_add_many
        services.engine.set_limits("w", {"max_concurrency": 5})
        accepted = c.post(INTAKE, JOB, key=KEY).json()
        waiting.join(10)
        assert answers["claim"].json()["job"]["job_id"] == accepted["job_id"]
        services.recorder.flush()
        rows = services.db.query("SELECT path, status FROM audit_log ORDER BY id")
        assert sorted((r["path"], r["status"]) for r in rows) == [(INTAKE, 202), (INTAKE, 503), (claim, 200)]
    finally:
        app.stop()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_an_intake_whose_link_fails_once_stored_is_accepted_and_audited_once(tmp_path, store, monkeypatch):
    """A job that depends on another is linked to it after it is stored. If
    that fails (the database busy), the job exists all the same: the intake
    is answered 202 with one audit row, its reservation kept, and the log
    says housekeeping resolves it (answering an error invited a duplicate,
    and left a second audit row beside the one committed with the job)."""
    log = io.StringIO()
    app = make_app(tmp_path, log=log, API_KEYS=KEY, JOB_STORE=store)
    try:
        c = Client(app)
        parent = c.post(INTAKE, JOB, key=KEY).json()["job_id"]

        def busy(parent_id, child_id):
            raise RuntimeError("database busy")

        monkeypatch.setattr(app.services.engine, "_link", busy)
        r = c.post(INTAKE, dict(JOB, depends_on=[parent]), key=KEY)
        assert r.status == 202, r
        child = c.get(f"/api/v1/status/{r.json()['job_id']}", key=KEY).json()
        assert child["status"] == "waiting"
        app.services.recorder.flush()
        rows = app.services.db.query("SELECT path, status FROM audit_log ORDER BY id")
        assert [(row["path"], row["status"]) for row in rows] == [(INTAKE, 202)] * 2
        assert c.get("/public/metrics").json()["audit_coverage"] == 100.0
        assert "its dependencies not linked" in log.getvalue()
    finally:
        app.stop()


def test_lost_audit_rows_show_in_coverage(client, app):
    recorder = app.services.recorder
    client.post(INTAKE, JOB)
    client.post(INTAKE, JOB)
    # Simulate a row lost on its way to the disk.
    recorder.db.write_one("DELETE FROM audit_log WHERE id = (SELECT MAX(id) FROM audit_log)")
    assert client.get("/public/metrics").json()["audit_coverage"] == 50.0


# -- rate limits --------------------------------------------------------------------


def test_write_burst_per_ip_then_429(tmp_path):
    app = make_app(tmp_path, RATE_BURST=3)
    c = Client(app)
    statuses = [c.post(INTAKE, JOB).status for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    r = c.post(INTAKE, JOB)
    assert r.json()["error"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) >= int(r.headers["retry-after"])
    # Another client is not held back, and reads are a separate budget.
    assert Client(app, remote_addr="192.0.2.7").post(INTAKE, JOB).status == 202
    assert c.get("/health").status == 200
    app.stop()


def test_global_write_limit_covers_all_clients(tmp_path):
    app = make_app(tmp_path, RATE_BURST=100, RATE_GLOBAL=5)
    statuses = [Client(app, remote_addr=f"192.0.2.{i}").post(INTAKE, JOB).status for i in range(7)]
    assert statuses == [202] * 5 + [429] * 2
    app.stop()


def test_read_limit_is_separate_and_generous(tmp_path):
    app = make_app(tmp_path, RATE_BURST=1, RATE_READ=5)
    c = Client(app)
    assert [c.get("/health").status for _ in range(6)] == [200] * 5 + [429]
    assert c.post(INTAKE, JOB).status == 202
    app.stop()


def test_spoofed_forwarded_for_gains_nothing(tmp_path):
    app = make_app(tmp_path, RATE_BURST=2)
    c = Client(app)
    statuses = [c.post(INTAKE, JOB, headers={"X-Forwarded-For": f"198.51.100.{i}"}).status
                for i in range(3)]
    assert statuses == [202, 202, 429]
    app.stop()


def test_forwarded_for_is_believed_from_trusted_proxies(tmp_path):
    log = io.StringIO()
    app = make_app(tmp_path, log=log, RATE_BURST=1, TRUSTED_PROXIES="10.0.0.0/8")
    proxy = Client(app, remote_addr="10.1.2.3")
    # The client is the rightmost address that is not one of our proxies.
    assert proxy.post(INTAKE, JOB, headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.5, 10.9.9.9"}).status == 202
    assert proxy.post(INTAKE, JOB, headers={"X-Forwarded-For": "203.0.113.6"}).status == 202
    assert proxy.post(INTAKE, JOB, headers={"X-Forwarded-For": "1.1.1.1, 203.0.113.5"}).status == 429
    app.services.log.flush()
    ips = [json.loads(line).get("client_ip") for line in log.getvalue().splitlines()]
    assert "203.0.113.5" in ips and "6.6.6.6" not in ips
    app.stop()


# -- CORS -------------------------------------------------------------------------------

CORS_CASES = [
    ("https://levqor.ai", True),
    ("https://levqor.ai.evil.com", False),
    ("https://evil-levqor.ai", False),
    ("http://levqor.ai", False),
    ("https://LEVQOR.ai", False),
    ("https://levqor.ai/", False),
    ("null", False),
    ("", False),
]


@pytest.mark.parametrize("origin, allowed", CORS_CASES)
def test_cors_origin_matrix(client, origin, allowed):
    r = client.get("/health", headers={"Origin": origin})
    assert ("access-control-allow-origin" in r.headers) == allowed
    if allowed:
        assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["vary"] == "Origin"


@pytest.mark.parametrize("origin, allowed", CORS_CASES)
def test_cors_preflight_matrix(client, origin, allowed):
    r = client.request("OPTIONS", INTAKE, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key"})
    assert r.status == 204 and r.body == b""
    assert r.headers["allow"] == "OPTIONS, POST"
    assert ("access-control-allow-methods" in r.headers) == allowed
    if allowed:
        assert "X-Api-Key" in r.headers["access-control-allow-headers"]
        assert "PATCH" in r.headers["access-control-allow-methods"]


def test_cors_origins_are_configurable(tmp_path):
    app = make_app(tmp_path, CORS_ORIGINS="https://app.example.com, https://admin.example.com")
    c = Client(app)
    assert c.get("/", headers={"Origin": "https://admin.example.com"}).headers[
        "access-control-allow-origin"] == "https://admin.example.com"
    assert "access-control-allow-origin" not in c.get("/", headers={"Origin": "https://levqor.ai"}).headers
    app.stop()


# -- headers on every response -------------------------------------------------------------

SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
                    "referrer-policy": "strict-origin-when-cross-origin"}


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/nope"), ("DELETE", "/health"), ("POST", INTAKE),
    ("GET", "/public/faq/index.html"), ("GET", "/public/robots.txt"), ("OPTIONS", "/health"),
])
def test_security_headers_everywhere(client, method, path):
    r = client.request(method, path, body=b"{" if method == "POST" else None)
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    assert "permissions-policy" in r.headers
    assert "strict-transport-security" not in r.headers  # only in production
    csp = r.headers["content-security-policy"]
    if r.headers.get("content-type", "").startswith("text/html"):
        assert "style-src 'self'" in csp and "script-src" not in csp
    else:
        assert csp.startswith("default-src 'none'")
    assert len(r.headers["x-request-id"]) == 32


def test_hsts_in_production(tmp_path):
    app = make_app(tmp_path, LEVQOR_ENV="production", API_KEYS=KEY)
    assert "max-age=" in Client(app).get("/health").headers["strict-transport-security"]
    app.stop()


@pytest.mark.parametrize("given, kept", [
    ("abc-123.XYZ:9_z", True), ("x" * 128, True), ("x" * 129, False),
    ("has space", False), ("new\nline", False), ("", False), ("<script>", False),
])
def test_request_id_is_taken_only_if_sane(client, given, kept):
    r = client.get("/health", headers={"X-Request-ID": given})
    assert (r.headers["x-request-id"] == given) == kept


def test_request_ids_differ(client):
    assert client.get("/").headers["x-request-id"] != client.get("/").headers["x-request-id"]


# -- logs -----------------------------------------------------------------------------------


def test_one_json_line_per_request_that_input_cannot_forge(tmp_path):
    log = io.StringIO()
    app = make_app(tmp_path, log=log)
    c = Client(app, lint=False)
    forged = '\n{"level":"INFO","msg":"request","path":"/admin","status":200}'
    c.get("/nope" + forged, headers={"User-Agent": "evil\r\n" + forged})
    app.services.log.flush()
    lines = [line for line in log.getvalue().splitlines() if '"msg":"request"' in line]
    assert len(lines) == 1
    assert all(json.loads(line) for line in log.getvalue().splitlines())
    entry = json.loads(lines[0])
    assert entry["path"].startswith("/nope\n") and entry["status"] == 404
    assert set(entry) >= {"time", "level", "request_id", "method", "path", "status",
                          "duration_ms", "client_ip", "user_agent"}
    app.stop()


def test_the_query_string_is_not_logged(tmp_path):
    log = io.StringIO()
    app = make_app(tmp_path, log=log)
    Client(app).get("/api/v1/users?email=secret.person@example.com")
    app.services.log.flush()
    assert "secret.person" not in log.getvalue()
    app.stop()


def test_unexpected_errors_are_500_with_no_internals(tmp_path, monkeypatch):
    log = io.StringIO()
    app = make_app(tmp_path, log=log)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.services.users, "get_by_email", broken)
    r = Client(app).get("/api/v1/users?email=a@b.com")
    assert r.status == 500
    body = r.json()
    assert body["error"] == "internal_error" and "secret" not in r.body.decode()
    logged = [json.loads(line) for line in log.getvalue().splitlines()]
    error = next(e for e in logged if e["msg"] == "unhandled exception")
    assert "secret internal detail" in error["traceback"]
    assert error["request_id"] == body["request_id"]
    app.stop()


# -- static files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/public/../levqor.py", "/public/legal/../../levqor.py", "/public/./legal/privacy.html",
    "/public//etc/passwd", "/public/legal\\..\\..\\levqor.py", "/public/legal/privacy.html\x00.css",
    "/public/../../../../etc/passwd", "/public/%2e%2e/levqor.py", "/public/..%2flevqor.py",
    "/public/legal/", "/public/nope.html", "/public/assets",
    "/public/.well-known/../../levqor.py",
])
def test_no_path_leaves_public(client, path):
    r = client.get(path)
    assert r.status == 404 and r.json()["error"] == "not_found"
    assert b"import" not in r.body and b"root:" not in r.body


def test_symlink_out_of_public_is_refused(tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    (public / "ok.txt").write_text("fine")
    os.symlink(tmp_path / "secret.txt", public / "leak.txt")
    settings = levqor.Settings.from_env({"SQLITE_PATH": str(tmp_path / "l.db")})
    settings = dataclasses.replace(settings, public_dir=str(public))
    c = Client(levqor.create_app(settings, log_stream=io.StringIO()))
    assert c.get("/public/ok.txt").body == b"fine"
    assert c.get("/public/leak.txt").status == 404


@pytest.mark.parametrize("path, ctype", [
    ("/public/legal/privacy.html", "text/html; charset=utf-8"),
    ("/public/legal/terms.html", "text/html; charset=utf-8"),
    ("/public/legal/cookies.html", "text/html; charset=utf-8"),
    ("/public/faq/index.html", "text/html; charset=utf-8"),
    ("/public/faq/", "text/html; charset=utf-8"),
    ("/public/robots.txt", "text/plain; charset=utf-8"),
    ("/robots.txt", "text/plain; charset=utf-8"),
    ("/public/.well-known/security.txt", "text/plain; charset=utf-8"),
    ("/.well-known/security.txt", "text/plain; charset=utf-8"),
    ("/public/assets/site.css", "text/css; charset=utf-8"),
])
def test_static_files_with_types_and_revalidation(client, path, ctype):
    r = client.get(path)
    assert r.status == 200 and r.headers["content-type"] == ctype
    assert int(r.headers["content-length"]) == len(r.body) > 0
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    again = client.get(path, headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b"" and "content-type" not in again.headers
    # A cache merges a 304's headers into the stored page: its CSP must be the page's.
    assert again.headers["content-security-policy"] == r.headers["content-security-policy"] or \
        not ctype.startswith("text/html")
    assert client.get(path, headers={"If-Modified-Since": modified}).status == 304
    assert client.get(path, headers={"If-None-Match": '"other"'}).status == 200
    assert client.get(path, headers={"If-Modified-Since": "garbage"}).status == 200
    head = client.request("HEAD", path)
    assert head.status == 200 and head.body == b"" and head.headers["etag"] == etag


def test_pages_are_real_documents(client):
    for path, must in [("/public/legal/privacy.html", "Your rights"),
                       ("/public/legal/terms.html", "Acceptable use"),
                       ("/public/legal/cookies.html", "no cookies"),
                       ("/public/faq/index.html", "rate limits")]:
        text = client.get(path).body.decode()
        assert "<title>" in text and must in text and "lorem" not in text.lower()
