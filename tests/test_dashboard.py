"""The operator dashboard in-process: login, sessions, CSRF, refusals,
escaping, the pages and their filters, and traces carried through a job.
The browser's view of the same is in test_dashboard_browser.py."""

import html
import http.server
import re
import threading
import time
from urllib.parse import quote, urlencode

import pytest

import engine
from support import KEY, NEXT_KEY, STORES, Client, make_app, store_env, wait_until
from wsgi_routes import fingerprint

FORM = "application/x-www-form-urlencoded"
XSS = {"a": "<script>alert(1)</script>", "b": '"><img src=x onerror=alert(2)>'}
HOSTILE = '"><script>alert(3)</script>'
# A schedule's name is a path segment: one with a slash could not be addressed
# (an encoded slash is refused), so the hostile name has none.
HOSTILE_NAME = '"><img src=x onerror=alert(4)>'
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def cookies_of(response):
    """{name: value} of every Set-Cookie (the client keeps one per name)."""
    found = {}
    for name, value in response.header_list:
        if name.lower() == "set-cookie":
            pair = value.split(";", 1)[0]
            found[pair.split("=", 1)[0]] = pair.split("=", 1)[1]
    return found


def csrf_in(body):
    return re.search(r'name="csrf" value="([^"]*)"', body.decode()).group(1)


class Browser:
    """A Client that keeps cookies, as a browser would (Path ignored: all are /admin)."""

    def __init__(self, app, remote_addr="127.0.0.1"):
        self.client = Client(app, remote_addr)
        self.jar = {}

    def request(self, method, path, form=None, headers=None, **kw):
        headers = dict(headers or {})
        if self.jar:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.jar.items())
        body = urlencode(form, doseq=True).encode() if form is not None else kw.pop("body", None)
        response = self.client.request(method, path, body=body, headers=headers,
                                       content_type=kw.pop("content_type", FORM), **kw)
        for name, value in cookies_of(response).items():
            if value:
                self.jar[name] = value
            else:
                self.jar.pop(name, None)
        return response

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, form, **kw):
        return self.request("POST", path, form=form, **kw)

    def login(self, key=KEY):
        page = self.get("/admin/login")
        return self.post("/admin/login", {"csrf": csrf_in(page.body), "key": key, "next": ""})

    def csrf(self, path="/admin"):
        return csrf_in(self.get(path).body)


@pytest.fixture
def app(tmp_path):
    application = make_app(tmp_path, API_KEYS=KEY, API_KEYS_NEXT=NEXT_KEY)
    yield application
    application.stop()


@pytest.fixture
def browser(app):
    b = Browser(app)
    assert b.login().status == 303
    return b


def submit(app, n=1, workflow="echo", payload=None, headers=None, key=KEY, **fields):
    api = Client(app)
    ids = []
    for _ in range(n):
        r = api.post("/api/v1/intake", json={"workflow": workflow, "payload": payload or {"n": 1}, **fields},
                     key=key, headers=headers)
        assert r.status == 202, r
        ids.append(r.json()["job_id"])
    return ids


def run_all(app):
    while app.services.engine.run_next():
        pass


# -- login, sessions, logout ----------------------------------------------------------------


def test_unauthenticated_pages_redirect_to_login(app):
    b = Browser(app)
    for path in ("/admin", "/admin/jobs", "/admin/keys", "/admin/spend", "/admin/audit",
                 "/admin/schedules", "/admin/schedules/open/x", "/admin/workflows", "/admin/workflows/echo"):
        r = b.get(path)
        assert r.status == 303, path
        assert r.headers["location"].startswith("/admin/login"), path
    r = b.get("/admin/jobs?status=failed")
    assert r.headers["location"] == "/admin/login?" + urlencode({"next": "/admin/jobs?status=failed"})


def test_login_sets_a_strict_session_cookie_and_keeps_only_a_digest(app):
    b = Browser(app)
    r = b.login()
    assert r.status == 303 and r.headers["location"] == "/admin"
    session = [v for k, v in r.header_list if k == "Set-Cookie" and v.startswith("levqor_session=")][0]
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/admin;" in session
    assert "Max-Age=28800" in session and "Secure" not in session  # development
    token = b.jar["levqor_session"]
    rows = app.services.db.query("SELECT * FROM admin_sessions")
    assert len(rows) == 1
    assert token not in str(rows) and KEY not in str(rows)  # a digest, and the key's fingerprint
    assert KEY not in str(r.header_list)
    page = b.get("/admin")
    assert page.status == 200 and b"Overview" in page.body


def test_session_cookie_is_secure_in_production(tmp_path):
    application = make_app(tmp_path, API_KEYS=KEY, LEVQOR_ENV="production")
    try:
        r = Browser(application).login()
        assert any("Secure" in v for k, v in r.header_list if v.startswith("levqor_session="))
    finally:
        application.stop()


def test_the_next_key_logs_in_and_a_managed_or_wrong_key_does_not(app):
    assert Browser(app).login(NEXT_KEY).status == 303
    client_key = Client(app).post("/api/v1/keys", json={"name": "acme", "role": "client"},
                                  key=KEY).json()["key"]
    for key in (client_key, "wrong-key-0123456789abcdef", ""):
        b = Browser(app)
        r = b.login(key)
        assert r.status == 403, key
        assert b"That is not an admin API key." in r.body
        assert "levqor_session" not in b.jar
        assert b.get("/admin").status == 303
    app.services.recorder.flush()
    refused = app.services.db.query("SELECT * FROM audit_log WHERE path = '/admin/login' AND status = 403")
    assert len(refused) == 3 and {r["key_id"] for r in refused} == {"anonymous"}


def test_failed_logins_are_rate_limited(app):
    b = Browser(app, remote_addr="198.51.100.7")
    statuses = [b.login("wrong-key-0123456789abcdef").status for _ in range(11)]
    assert statuses[:10] == [403] * 10
    assert statuses[10] == 429
    r = b.login()  # even the right key waits
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1
    assert b"text/html" in r.headers["content-type"].encode()
    assert Browser(app, remote_addr="198.51.100.8").login().status == 303  # another address


def test_login_form_needs_its_own_token(app):
    b = Browser(app)
    b.get("/admin/login")
    assert b.post("/admin/login", {"key": KEY, "next": ""}).status == 403
    assert b.post("/admin/login", {"csrf": "forged", "key": KEY, "next": ""}).status == 403
    assert "levqor_session" not in b.jar


def test_logout_ends_the_session_on_the_server(app, browser):
    token = browser.jar["levqor_session"]
    r = browser.post("/admin/logout", {"csrf": browser.csrf()})
    assert r.status == 303 and r.headers["location"] == "/admin/login?bye=1"
    assert "levqor_session" not in browser.jar
    assert app.services.db.query("SELECT COUNT(*) AS n FROM admin_sessions")[0]["n"] == 0
    replay = Browser(app)
    replay.jar["levqor_session"] = token  # the old cookie, kept by someone
    assert replay.get("/admin").status == 303
    assert replay.post("/admin/logout", {"csrf": "x"}).status == 403


def test_an_expired_session_is_refused(app, browser):
    app.services.db.write_one("UPDATE admin_sessions SET expires_at = 0")
    assert browser.get("/admin").status == 303


def test_a_session_of_a_key_no_longer_configured_is_refused(app, browser, tmp_path):
    token = browser.jar["levqor_session"]
    rotated = make_app(tmp_path, API_KEYS=NEXT_KEY)  # the same database, KEY removed
    try:
        b = Browser(rotated)
        b.jar["levqor_session"] = token
        assert b.get("/admin").status == 303
    finally:
        rotated.stop()


def test_open_development_mode_logs_in_without_a_key(tmp_path):
    application = make_app(tmp_path)
    try:
        b = Browser(application)
        assert b"Open development mode" in b.get("/admin/login").body
        assert b.login("").status == 303
        assert b.get("/admin").status == 200
    finally:
        application.stop()


# -- CSRF and refusals ------------------------------------------------------------------------


def failed_job(app):
    [job_id] = submit(app, workflow="ext.work")
    api = Client(app)
    lease = api.post("/api/v1/jobs/claim", json={"workflows": ["ext.work"]}, key=KEY).json()["job"]
    r = api.post(f"/api/v1/jobs/{job_id}/fail", json={"lease_token": lease["lease_token"],
                                                      "error": "boom", "retryable": False}, key=KEY)
    assert r.json()["job"]["status"] == "failed"
    return job_id


def test_a_post_without_the_csrf_token_is_refused(app, browser):
    job_id = failed_job(app)
    for form in ({}, {"csrf": ""}, {"csrf": "not-the-token"}):
        r = browser.post(f"/admin/jobs/{job_id}/retry", form)
        assert r.status == 403 and b"security token" in r.body
    assert app.services.jobs.get(job_id)["status"] == "failed"
    r = browser.post(f"/admin/jobs/{job_id}/retry", {"csrf": browser.csrf()})
    assert r.status == 303 and r.headers["location"] == f"/admin/jobs/{job_id}?done=retry"
    assert app.services.jobs.get(job_id)["status"] == "queued"
    assert b"Queued again." in browser.get(r.headers["location"]).body
    app.services.recorder.flush()
    rows = app.services.db.query("SELECT status FROM audit_log WHERE path = :p",
                                 {"p": f"/admin/jobs/{job_id}/retry"})
    assert sorted(r["status"] for r in rows) == [200, 403, 403, 403]


def test_a_refused_action_says_why(app, browser):
    [job_id] = submit(app)
    run_all(app)
    r = browser.post(f"/admin/jobs/{job_id}/cancel", {"csrf": browser.csrf()})
    assert r.status == 409 and b"already succeeded" in r.body
    assert browser.post(f"/admin/jobs/{job_id}/explode", {"csrf": browser.csrf()}).status == 404
    assert browser.post("/admin/jobs/" + "0" * 32 + "/cancel", {"csrf": browser.csrf()}).status == 404


@pytest.mark.parametrize("case, kwargs, status", [
    ("json body", {"body": b'{"csrf": "x"}', "content_type": "application/json"}, 415),
    ("no content type", {"body": b"csrf=x", "content_type": None}, 415),
    ("over the cap", {"body": b"csrf=" + b"x" * 70_000}, 413),
    ("not ascii", {"body": "csrf=\u00e9".encode()}, 400),
    ("too many fields", {"body": b"&".join(b"f%d=1" % i for i in range(300))}, 400),
])
def test_malformed_forms_get_a_clear_4xx(browser, case, kwargs, status):
    r = browser.request("POST", "/admin/keys", **kwargs)
    assert r.status == status, case
    assert r.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("query", ["status=bogus", "workflow=%3Cscript%3E", "from=yesterday",
                                   "from=2026-13-45", "cursor=-1", "limit=7", "status=a&status=b",
                                   "key=%00", "status=queued,bogus", "status=queued,", "schedule=a%0Ab",
                                   "concurrency_key=" + "k" * 201])
def test_bad_filters_get_400_pages(browser, query):
    r = browser.get("/admin/jobs?" + query)
    assert r.status == 400, query
    assert r.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("path, status", [
    ("/admin/schedules?state=sleeping", 400), ("/admin/schedules?cursor=no-slash", 400),
    ("/admin/schedules?key=%3Cb%3E", 400), ("/admin/schedules/key%3C/x", 404),
    ("/admin/schedules/open/nothing", 404), ("/admin/workflows/%3Cscript%3E", 404),
    ("/admin/workflows?workflow=%3Cb%3E", 400)])
def test_bad_schedule_and_workflow_addresses(browser, path, status):
    r = browser.get(path)
    assert r.status == status, path
    assert r.headers["content-type"].startswith("text/html")


def test_unknown_paths_and_methods(browser):
    assert browser.get("/admin/nope").status == 404
    assert browser.request("DELETE", "/admin/jobs").status == 405
    assert browser.request("HEAD", "/admin").body == b""


# -- what the pages show ------------------------------------------------------------------------


def test_headers_forbid_inline_script_and_framing(browser):
    r = browser.get("/admin")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "form-action 'self'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert not re.search(rb"<script(?![^>]*\bsrc=)", r.body)  # no inline script
    assert b" style=" not in r.body and b"<style" not in r.body
    assert b"onclick" not in r.body.lower()


def test_hostile_payloads_are_shown_as_text(app, browser):
    [job_id] = submit(app, workflow="ext.xss", payload=XSS)
    body = browser.get(f"/admin/jobs/{job_id}").body.decode()
    assert "<script>alert(1)</script>" not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in body
    listing = browser.get("/admin/jobs?workflow=ext.xss").body.decode()
    assert job_id[:12] in listing


def test_overview_counts_what_the_test_made(app, browser):
    submit(app, 3)
    run_all(app)
    submit(app, 2, workflow="ext.wait")
    failed_job(app)
    body = browser.get("/admin").body.decode()
    cards = dict(re.findall(r'<span class="label">([a-z ]+)</span><span class="value[^"]*">([^<]+)<', body))
    assert cards["succeeded"] == "3" and cards["queued"] == "2" and cards["failed"] == "1"
    assert cards["running"] == "0" and cards["callbacks failing"] == "0"
    assert "<svg" in body and "Throughput, last hour" in body
    assert 'class="bad"' in body  # the failed job is a red bar this minute


def test_jobs_filter_and_paginate(app, browser):
    ids = submit(app, 25, workflow="ext.page")
    submit(app, 3, workflow="ext.other")
    seen = []
    path = "/admin/jobs?workflow=ext.page&limit=10"
    for _ in range(5):
        body = browser.get(path).body.decode()
        seen += re.findall(r'href="/admin/jobs/([0-9a-f]{32})"', body)
        nxt = re.search(r'href="(/admin/jobs\?[^"]+)">Next page', body)
        if not nxt:
            break
        path = nxt.group(1).replace("&amp;", "&")
        assert "workflow=ext.page" in path and "limit=10" in path
    assert seen == list(reversed(ids))
    body = browser.get("/admin/jobs?status=queued&key=" + app.services.jobs.get(ids[0])["key_id"]).body
    assert len(re.findall(rb'href="/admin/jobs/[0-9a-f]{32}"', body)) == 20  # default page size
    assert b"No job matches" in browser.get("/admin/jobs?from=2000-01-01&to=2000-01-02").body


def test_bulk_cancel(app, browser):
    ids = submit(app, 3, workflow="ext.bulk")
    r = browser.post("/admin/jobs/bulk", {"csrf": browser.csrf("/admin/jobs"), "action": "cancel",
                                          "job_id": ids[:2], "back": "/admin/jobs?workflow=ext.bulk"})
    assert r.status == 303
    assert r.headers["location"] == "/admin/jobs?workflow=ext.bulk&bulk=cancel&ok=2&refused=0"
    assert [app.services.jobs.get(i)["status"] for i in ids] == ["canceled", "canceled", "queued"]
    assert b"Cancel: 2 done, 0 refused" in browser.get(r.headers["location"]).body


def test_keys_create_shows_the_secret_once_and_revoke(app, browser):
    r = browser.post("/admin/keys", {"csrf": browser.csrf("/admin/keys"), "name": "acme <b>",
                                     "role": "worker", "daily_budget": "2.5", "rate_per_minute": "60",
                                     "workflows": "acme.*, report"})
    assert r.status == 201
    secret = re.search(rb"<pre>(lq_[A-Za-z0-9_-]{43})</pre>", r.body).group(1).decode()
    assert b"acme &lt;b&gt;" in r.body
    listing = browser.get("/admin/keys").body
    assert secret.encode() not in listing and b"$2.50" in listing and b"acme.*, report" in listing
    key = app.services.key_store.lookup(secret)
    assert key["role"] == "worker" and key["rate_per_minute"] == 60
    bad = browser.post("/admin/keys", {"csrf": browser.csrf("/admin/keys"), "name": "x", "role": "admin"})
    assert bad.status == 400 and b"role" in bad.body
    r = browser.post(f"/admin/keys/{key['id']}/revoke", {"csrf": browser.csrf("/admin/keys")})
    assert r.status == 303 and app.services.key_store.lookup(secret) is None
    assert browser.post("/admin/keys/key_nope/revoke", {"csrf": browser.csrf()}).status == 404


def test_spend_and_audit_pages(app, browser):
    submit(app, 2)
    assert b"Spend per day" in browser.get("/admin/spend").body
    body = browser.get("/admin/audit?method=POST&status=202").body.decode()
    assert body.count("/api/v1/intake") == 2
    assert "No audit rows" in browser.get("/admin/audit?status=599").body.decode()


# -- traces ---------------------------------------------------------------------------------------


def test_traceparent_is_kept_and_passed_to_workers_and_workflows(tmp_path):
    registry = engine.registry.copy()
    registry.register("trace.me", lambda payload, ctx: {"traceparent": ctx.traceparent}, max_cost=0)
    application = make_app(tmp_path, API_KEYS=KEY, registry=registry)
    try:
        [local] = submit(application, workflow="trace.me", headers={"traceparent": TRACE})
        run_all(application)
        assert application.services.jobs.get(local)["result"] == {"traceparent": TRACE}
        [external] = submit(application, workflow="ext.trace", headers={"traceparent": TRACE})
        claim = Client(application).post("/api/v1/jobs/claim", json={"workflows": ["ext.trace"]}, key=KEY)
        assert claim.json()["job"]["job_id"] == external
        assert claim.json()["job"]["traceparent"] == TRACE
        for bad in ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", "ff-" + TRACE[3:], "garbage",
                    TRACE.upper(), TRACE + "-extra"):
            [job_id] = submit(application, workflow="ext.none", headers={"traceparent": bad})
            assert "traceparent" not in application.services.jobs.get(job_id), bad
        [future] = submit(application, workflow="ext.none", headers={"traceparent": "01" + TRACE[2:] + "-x"})
        assert application.services.jobs.get(future)["traceparent"] == "00" + TRACE[2:]
    finally:
        application.stop()


class Receiver(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.seen.append(dict(self.headers))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_callback_delivery_carries_the_traceparent_and_is_counted(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    application = make_app(tmp_path, API_KEYS=KEY, CALLBACK_SECRET=secret, CALLBACK_ALLOW_PRIVATE=1)
    try:
        url = f"http://localhost:{server.server_address[1]}/hook"
        r = Client(application).post("/api/v1/intake", json={"workflow": "echo", "payload": {},
                                                             "callback_url": url},
                                     key=KEY, headers={"traceparent": TRACE})
        assert r.status == 202
        run_all(application)
        application.services.callbacks.run_due()
        assert wait_until(lambda: Receiver.seen, 5)
        assert Receiver.seen[-1]["traceparent"] == TRACE
        text = Client(application).get("/metrics", key=KEY).body.decode()
        assert 'levqor_callback_deliveries_total{outcome="delivered"} 1' in text
    finally:
        application.stop()
        server.shutdown()


# -- every job store ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORES)
def test_every_page_and_filter_on_every_job_store(tmp_path, kind):
    """The operator's questions (insights.py) are SQL per dialect, or a walk
    of the memory store: each page, each filter, on each store."""
    application = make_app(tmp_path, API_KEYS=KEY, **store_env(kind))
    try:
        ids = submit(application, 3)
        run_all(application)
        submit(application, 2, workflow="ext.wait")
        failed = failed_job(application)
        b = Browser(application)
        assert b.login().status == 303
        body = b.get("/admin").body.decode()
        cards = dict(re.findall(r'<span class="label">([a-z ]+)</span><span class="value[^"]*">([^<]+)<', body))
        assert (cards["succeeded"], cards["queued"], cards["failed"]) == ("3", "2", "1"), kind
        assert "echo" in body and " ms" in body  # run times
        key_id = application.services.jobs.get(ids[0])["key_id"]
        query = urlencode({"status": "succeeded", "workflow": "echo", "key": key_id,
                           "from": "2000-01-01", "to": "2100-01-01T00:00", "limit": "10"})
        assert listed(b.get("/admin/jobs?" + query).body) == list(reversed(ids)), kind
        assert b"Retry" in b.get(f"/admin/jobs/{failed}").body
        audit = b.get("/admin/audit?" + urlencode({"key": key_id, "method": "POST", "status": "202",
                                                    "from": "2000-01-01"})).body.decode()
        assert audit.count("/api/v1/intake") == 6, kind  # failed_job made one too
        assert b.get("/admin/spend").status == 200 and b.get("/admin/keys").status == 200
        text = Client(application).get("/metrics", key=KEY).body.decode()
        assert 'levqor_jobs{status="queued",workflow="ext.wait"} 2' in text, kind
        # Flow control: the filters the list API has, every key's schedules, the limits.
        lane = submit(application, 2, workflow="ext.lane", concurrency_key="tenant 9")
        [later] = submit(application, workflow="ext.lane", delay=600, concurrency_key="tenant 9")
        [child] = submit(application, workflow="ext.lane", depends_on=[lane[0]])
        make_schedule(application, "every-store")
        made = fire(application, "every-store")
        query = urlencode({"status": "queued,scheduled", "workflow": "ext.lane", "concurrency_key": "tenant 9",
                           "key": key_id, "from": "2000-01-01", "limit": "10"})
        assert listed(b.get("/admin/jobs?" + query).body) == [later, *reversed(lane)], kind
        assert listed(b.get("/admin/jobs?status=waiting").body) == [child], kind
        assert listed(b.get("/admin/jobs?" + urlencode({"schedule": "every-store", "key": key_id})).body) == [made]
        assert "Depends on (1)" in b.get(f"/admin/jobs/{child}").body.decode(), kind
        acme, acme_key = client_key(application)
        make_schedule(application, "every-store", key=acme_key, paused=True)
        body = b.get("/admin/schedules").body.decode()
        assert body.count(">every-store</a>") == 2 and 'badge paused">paused' in body, kind
        assert f'href="/admin/jobs/{made}"' in body
        assert b.get("/admin/schedules?state=paused&key=" + acme).body.decode().count(">every-store</a>") == 1
        assert b.get(f"/admin/schedules/{acme}/every-store").status == 200
        csrf = b.csrf("/admin/workflows/ext.lane")
        assert b.post("/admin/workflows/ext.lane/limits", {"csrf": csrf, "max_concurrency": "4"}).status == 303
        assert application.services.engine.limits() == {"ext.lane": {"max_concurrency": 4}}, kind
        body = b.get("/admin/workflows").body.decode()
        assert re.search(r'ext\.lane</a></td><td>external workers</td><td class="num">4</td>', body), kind
    finally:
        application.stop()


def test_a_database_fault_is_an_html_page(app, browser, monkeypatch):
    from storage import StorageError

    def busy(*args, **kwargs):
        raise StorageError("busy", "the database is busy, try again shortly")

    monkeypatch.setattr(app.services.db, "query", busy)
    r = browser.get("/admin")
    assert r.status == 503 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"].startswith("text/html") and b"database is busy" in r.body


def test_every_attempt_is_listed_with_its_error_and_duration(tmp_path):
    registry = engine.registry.copy()

    def third_time_lucky(payload, ctx):
        if ctx.attempt < 3:
            raise RuntimeError(f"<b>attempt {ctx.attempt} fell over</b>")
        return {"ok": True}

    registry.register("lucky", third_time_lucky, max_cost=0)
    application = make_app(tmp_path, API_KEYS=KEY, JOB_BACKOFF=0, registry=registry)
    try:
        [job_id] = submit(application, workflow="lucky")
        run_all(application)
        log = application.services.jobs.get(job_id)["attempt_log"]
        assert [(a["attempt"], a["outcome"], a["runner"]) for a in log] == [
            (1, "queued", "local"), (2, "queued", "local"), (3, "succeeded", "local")]
        assert log[0]["error"] == {"type": "RuntimeError", "message": "<b>attempt 1 fell over</b>"}
        assert all(a["ended_at"] >= a["started_at"] for a in log)
        b = Browser(application)
        b.login()
        body = b.get(f"/admin/jobs/{job_id}").body.decode()
        rows = re.findall(r"<tr><td class=\"num\">(\d)</td><td>local</td>.*?</tr>", body)
        assert rows == ["1", "2", "3"]
        assert body.count("retried") == 2 and "RuntimeError: &lt;b&gt;attempt 2 fell over&lt;/b&gt;" in body
        assert "not listed" not in body
        # Nothing of the log reaches a client: the status view is unchanged.
        assert "attempt_log" not in Client(application).get(f"/api/v1/status/{job_id}", key=KEY).json()
    finally:
        application.stop()


# -- flow control: delays, dependencies, schedules, workflow limits ---------------------------------


def make_schedule(app, name, key=KEY, **spec):
    body = {"name": name, "workflow": "ext.tick", "payload": {"n": 1},
            **({} if "cron" in spec else {"every": 300}), **spec}
    r = Client(app).post("/api/v1/schedules", json=body, key=key)
    assert r.status == 201, r
    return r.json()["schedule"]


def fire(app, name):
    """Make a schedule due a minute ago and let the scheduler fire it: its one job."""
    app.services.db.write_one("UPDATE schedules SET next_fire = :t WHERE name = :name",
                              {"name": name, "t": time.time() - 60})
    app.services.scheduler.tick()
    return app.services.db.query("SELECT last_job FROM schedules WHERE name = :name", {"name": name})[0]["last_job"]


def client_key(app, name="acme"):
    r = Client(app).post("/api/v1/keys", json={"name": name, "role": "client"}, key=KEY)
    return r.json()["id"], r.json()["key"]


def listed(body):
    return re.findall(r'href="/admin/jobs/([0-9a-f]{32})"', body.decode() if isinstance(body, bytes) else body)


def audited(app, path):
    app.services.recorder.flush()
    return [(r["key_id"], r["status"]) for r in app.services.db.query(
        "SELECT key_id, status FROM audit_log WHERE path = :p ORDER BY id", {"p": path})]


def test_jobs_filter_by_schedule_concurrency_key_and_statuses_across_pages(app, browser):
    lane_a = submit(app, 12, workflow="ext.lane", concurrency_key="tenant a")
    submit(app, 2, workflow="ext.lane", concurrency_key="tenant b")
    make_schedule(app, "nightly")
    made = fire(app, "nightly")
    [later] = submit(app, workflow="ext.later", delay=600)
    [child] = submit(app, workflow="ext.child", depends_on=[lane_a[0]])
    path = "/admin/jobs?" + urlencode({"concurrency_key": "tenant a", "limit": "10"})
    seen = []
    while path:
        body = browser.get(path).body.decode()
        seen += listed(body)
        assert 'name="concurrency_key" value="tenant a"' in body  # the filter shown as in force
        nxt = re.search(r'href="(/admin/jobs\?[^"]+)">Next page', body)
        path = nxt and nxt.group(1).replace("&amp;", "&")
        assert not path or "concurrency_key=tenant+a" in path and "limit=10" in path
    assert seen == list(reversed(lane_a))
    # The bulk form goes back to the same filters.
    assert 'name="back" value="/admin/jobs?concurrency_key=tenant+a&amp;limit=10"' in body
    body = browser.get("/admin/jobs?schedule=nightly").body.decode()
    assert listed(body) == [made]
    assert f'href="/admin/schedules/{fingerprint(KEY)}/nightly">nightly</a>' in body
    body = browser.get("/admin/jobs?" + urlencode({"status": "scheduled,waiting"})).body.decode()
    assert listed(body) == [child, later]
    assert '<option value="scheduled,waiting" selected>scheduled or waiting</option>' in body
    assert "on 1 job" in body
    assert re.search(r'badge scheduled">scheduled</span><span class="sub"><span title="\d{4}-[0-9 :-]+ UTC">'
                     r'runs in (9|10) min', body)
    assert listed(browser.get("/admin/jobs?" + urlencode({"status": "waiting", "concurrency_key": "tenant a"})
                              ).body) == []


def test_a_job_shows_its_parents_their_results_and_its_dependents(app, browser):
    [parent] = submit(app, payload={"report": "q3"})
    [child] = submit(app, workflow="ext.child", depends_on=[parent], concurrency_key="tenant-7", delay=0)
    waiting = browser.get(f"/admin/jobs/{child}").body.decode()
    assert "Depends on (1)" in waiting and f'<a href="/admin/jobs/{parent}">{parent[:12]}…</a>' in waiting
    assert 'badge queued">queued' in waiting and "Results received" not in waiting
    assert "<dt>Concurrency key</dt><dd><code>tenant-7</code></dd>" in waiting
    run_all(app)  # the parent succeeds: the child queues with its parent's result
    body = browser.get(f"/admin/jobs/{child}").body.decode()
    assert 'badge succeeded">succeeded' in body
    results = re.search(r"Results received from its parents</h2><pre>(.*?)</pre>", body, re.S).group(1)
    assert parent in results and "&quot;report&quot;: &quot;q3&quot;" in results
    body = browser.get(f"/admin/jobs/{parent}").body.decode()
    assert "Dependents (1)" in body and f'href="/admin/jobs/{child}"' in body
    assert "Depends on" not in body and "Results received" not in body
    # A parent that fails cancels its dependent, which says why.
    failed = failed_job(app)
    [orphan] = submit(app, workflow="ext.child", depends_on=[failed])
    body = browser.get(f"/admin/jobs/{orphan}").body.decode()
    assert 'badge canceled">canceled' in body and "dependency_failed" in body


def test_a_delayed_and_a_scheduled_job_show_when_and_from_what(app, browser):
    at = time.gmtime(time.time() + 3 * 86400)
    [later] = submit(app, workflow="ext.later", run_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", at))
    body = browser.get(f"/admin/jobs/{later}").body.decode()
    assert f"<dt>Run at</dt><dd>{time.strftime('%Y-%m-%d %H:%M:%S', at)}</dd>" in body
    assert 'badge scheduled">scheduled' in body
    make_schedule(app, "hourly")
    made = fire(app, "hourly")
    body = browser.get(f"/admin/jobs/{made}").body.decode()
    assert f'<dt>Schedule</dt><dd><a href="/admin/schedules/{fingerprint(KEY)}/hourly">hourly</a>' in body


def test_schedules_of_every_key_are_listed_and_paged(app, browser):
    acme, acme_key = client_key(app)
    make_schedule(app, "report", cron="30 2 * * mon-fri", timezone="Europe/London")
    make_schedule(app, "report", key=acme_key, every=90)
    for i in range(55):
        make_schedule(app, f"bulk-{i:02d}", key=acme_key, paused=True)
    made = fire(app, "report")
    body = browser.get("/admin/schedules?key=" + acme).body.decode()
    assert "bulk-00" in body and "bulk-49" in body and "bulk-50" not in body
    nxt = re.search(r'href="(/admin/schedules\?[^"]+)">Next page', body).group(1).replace("&amp;", "&")
    assert "key=" + acme in nxt
    body = browser.get(nxt).body.decode()
    assert "bulk-54" in body and "bulk-49" not in body and "report" in body and "Next page" not in body
    body = browser.get("/admin/schedules?state=active").body.decode()
    rows = re.findall(r"<tr><td><a href=\"/admin/schedules/([^/]+)/report\">report</a></td>(.*?)</tr>", body)
    assert {r[0] for r in rows} == {fingerprint(KEY), acme}  # one name, two owners
    mine = dict(rows)[fingerprint(KEY)]
    assert "<code>30 2 * * mon-fri</code>" in mine and "Europe/London" in mine
    assert f'href="/admin/jobs/{made}"' in mine  # the last job, or one of the two made
    assert "every 90 s" in dict(rows)[acme] and f'<span title="{acme}">acme</span>' in dict(rows)[acme]
    assert "bulk-" not in body  # paused ones filtered out
    page = browser.get(f"/admin/schedules/{acme}/bulk-03").body.decode()
    assert 'badge paused">paused' in page and "Resume" in page and "It has made no job yet" in page


def test_pause_resume_and_delete_a_clients_schedule(app, browser):
    acme, acme_key = client_key(app)
    make_schedule(app, "sync", key=acme_key)
    href = f"/admin/schedules/{acme}/sync"
    csrf = browser.csrf("/admin/schedules")
    for form in ({}, {"csrf": "forged"}):  # CSRF refused, and audited
        r = browser.post(href + "/pause", form)
        assert r.status == 403 and b"security token" in r.body
    assert app.services.schedules.get(acme, "sync")["paused"] is False
    r = browser.post(href + "/pause", {"csrf": csrf, "back": "/admin/schedules?state=active"})
    assert r.status == 303 and r.headers["location"] == "/admin/schedules?state=active&done=pause"
    assert app.services.schedules.get(acme, "sync")["paused"] is True
    assert b"Schedule paused." in browser.get(r.headers["location"]).body
    r = browser.post(href + "/resume", {"csrf": csrf, "back": "https://elsewhere.example/"})
    assert r.status == 303 and r.headers["location"] == href + "?done=resume"
    assert app.services.schedules.get(acme, "sync")["paused"] is False
    # The owner's listing through the API is what it was, bar the state.
    assert [s["name"] for s in Client(app).get("/api/v1/schedules", key=acme_key).json()["schedules"]] == ["sync"]
    assert browser.post(href + "/explode", {"csrf": csrf}).status == 404
    r = browser.post(href + "/delete", {"csrf": csrf})
    assert r.status == 303 and r.headers["location"] == "/admin/schedules?done=delete"
    assert app.services.schedules.get(acme, "sync") is None
    assert browser.post(href + "/delete", {"csrf": csrf}).status == 404
    me = fingerprint(KEY)
    assert audited(app, href + "/pause") == [(me, 403), (me, 403), (me, 200)]
    assert audited(app, href + "/resume") == [(me, 200)] and audited(app, href + "/delete") == [(me, 200)]


def test_workflow_limits_are_set_validated_as_the_api_does_and_cleared(app, browser):
    submit(app, 2, workflow="ext.limited")
    body = browser.get("/admin/workflows").body.decode()
    row = re.search(r'<tr><td><a href="/admin/workflows/ext.limited">ext.limited</a>.*?</tr>', body).group(0)
    assert "external workers" in row and 'href="/admin/jobs?workflow=ext.limited&amp;status=queued">2</a>' in row
    assert '<a href="/admin/workflows/echo">echo</a></td><td>in process' in body
    path = "/admin/workflows/ext.limited"
    csrf = browser.csrf(path)
    good = {"csrf": csrf, "max_concurrency": "20", "max_concurrency_per_key": "2", "rate_count": "100",
            "rate_per": "60"}
    assert browser.post(path + "/limits", {**good, "csrf": "forged"}).status == 403
    assert app.services.engine.limits() == {}
    r = browser.post(path + "/limits", good)
    assert r.status == 303 and r.headers["location"] == path + "?saved=1"
    want = {"max_concurrency": 20, "max_concurrency_per_key": 2, "rate": {"count": 100, "per": 60}}
    assert app.services.engine.limits() == {"ext.limited": want}
    api = Client(app).get("/api/v1/workflows", key=KEY).json()["workflows"]
    assert [w["limits"] for w in api if w["name"] == "ext.limited"] == [want]
    page = browser.get(r.headers["location"]).body.decode()
    assert "Limits saved" in page and 'name="rate_per" value="60"' in page
    assert "100 per 1 min" in browser.get("/admin/workflows").body.decode()
    # Refused exactly as PUT /api/v1/workflows/<name>/limits refuses (the
    # same body sent to the API says the same), the form kept as typed.
    for fields, body in [({"max_concurrency": "0"}, {"max_concurrency": 0}),
                         ({"max_concurrency_per_key": "lots"}, {"max_concurrency_per_key": "lots"}),
                         ({"max_concurrency": "100001"}, {"max_concurrency": 100001}),
                         ({"max_concurrency": "2.5"}, {"max_concurrency": "2.5"}),
                         ({"rate_per": ""}, {"rate": {"count": 100}}),
                         ({"rate_count": ""}, {"rate": {"per": 60}}),
                         ({"rate_per": "0"}, {"rate": {"count": 100, "per": 0}}),
                         ({"rate_per": "86401"}, {"rate": {"count": 100, "per": 86401}})]:
        message = Client(app).request("PUT", path.replace("/admin/", "/api/v1/") + "/limits", key=KEY,
                                      json=body).json()["message"]
        r = browser.post(path + "/limits", {**good, **fields})
        assert r.status == 400 and html.escape(message, quote=True) in r.body.decode(), (fields, message)
        assert f'value="{list(fields.values())[0]}"' in r.body.decode()
    assert app.services.engine.limits() == {"ext.limited": want}
    r = browser.post(path + "/limits", {**good, "max_concurrency": "", "rate_count": "3", "rate_per": "0.5"})
    assert app.services.engine.limits() == {"ext.limited": {"max_concurrency_per_key": 2,
                                                            "rate": {"count": 3, "per": 0.5}}}
    r = browser.post(path + "/limits", {"csrf": csrf})  # the "remove every limit" button
    assert r.status == 303 and app.services.engine.limits() == {}
    assert browser.get("/admin/workflows?workflow=new.one").headers["location"] == "/admin/workflows/new.one"
    assert browser.get("/admin/workflows/new.one").status == 200
    me = fingerprint(KEY)
    assert audited(app, path + "/limits") == [(me, 403), (me, 200)] + [(me, 400)] * 8 + [(me, 200)] * 2


def test_a_client_key_gets_no_flow_control_page_nor_action(app):
    acme, acme_key = client_key(app)
    make_schedule(app, "mine", key=acme_key)
    b = Browser(app)
    assert b.login(acme_key).status == 403
    for path in ("/admin/schedules", f"/admin/schedules/{acme}/mine", "/admin/workflows"):
        r = b.get(path, headers={"X-Api-Key": acme_key})  # an API key opens no page
        assert r.status == 303 and r.headers["location"].startswith("/admin/login"), path
    for path, form in ((f"/admin/schedules/{acme}/mine/delete", {}),
                       ("/admin/workflows/echo/limits", {"max_concurrency": "1"})):
        r = b.post(path, {"csrf": "x", **form}, headers={"X-Api-Key": acme_key})
        assert r.status == 403 and b"session has ended" in r.body, path
    assert app.services.schedules.get(acme, "mine") is not None and app.services.engine.limits() == {}
    # Nor may it set limits through the API: that is the operator's.
    r = Client(app).request("PUT", "/api/v1/workflows/echo/limits", key=acme_key, json={"max_concurrency": 1})
    assert r.status == 403


def test_hostile_schedule_names_payloads_and_concurrency_keys_are_text(app, browser):
    acme, acme_key = client_key(app, name=HOSTILE)
    make_schedule(app, "evil", key=acme_key, payload=XSS, workflow="ext.evil")
    # The API holds names to the workflow pattern; the store does not, so one
    # written there (by a future version, or by hand) must still be text.
    spec = {"workflow": "ext.evil", "payload": XSS, "every": 60, "cron": None, "timezone": None,
            "priority": None, "max_cost": None, "callback_url": None}
    app.services.schedules.create(acme, HOSTILE_NAME, spec)
    [job] = submit(app, workflow="ext.evil", payload=XSS, concurrency_key=HOSTILE, key=acme_key)
    [made] = [fire(app, "evil")]
    pages = {"/admin/schedules", f"/admin/schedules/{acme}/evil",
             f"/admin/schedules/{acme}/{quote(HOSTILE_NAME, safe='')}",
             "/admin/jobs", "/admin/jobs?" + urlencode({"concurrency_key": HOSTILE}), f"/admin/jobs/{job}",
             f"/admin/jobs/{made}", "/admin/workflows"}
    for path in pages:
        r = browser.get(path)
        assert r.status == 200, path
        body = r.body.decode()
        assert "<script>alert" not in body and "<img src=x" not in body, path
    listing = browser.get("/admin/schedules").body.decode()
    assert f'<span title="{acme}">&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;</span>' in listing  # the key's
    assert "&quot;&gt;&lt;img src=x onerror=alert(4)&gt;</a>" in listing  # the schedule's
    assert f"/admin/schedules/{acme}/{quote(HOSTILE_NAME, safe='')}" in listing
    detail = browser.get(f"/admin/schedules/{acme}/evil").body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail and f'href="/admin/jobs/{made}"' in detail
    jobs = browser.get("/admin/jobs?" + urlencode({"concurrency_key": HOSTILE})).body.decode()
    assert listed(jobs) == [job] and 'value="&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in jobs
    assert "&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in browser.get(f"/admin/jobs/{job}").body.decode()
    # And the hostile one can be paused and deleted like any other.
    csrf = browser.csrf()
    target = f"/admin/schedules/{acme}/{quote(HOSTILE_NAME, safe='')}"
    assert browser.post(target + "/pause", {"csrf": csrf}).status == 303
    assert app.services.schedules.get(acme, HOSTILE_NAME)["paused"] is True
    assert browser.post(target + "/delete", {"csrf": csrf}).status == 303
    assert app.services.schedules.get(acme, HOSTILE_NAME) is None
