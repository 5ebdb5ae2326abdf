"""Cost guardrails, the ledger, managed keys and usage, and llm.chat against
a fake OpenAI-compatible server on loopback."""

import decimal
import http.server
import json
import threading
import time

import pytest
import requests

import costs
import engine
import ledger
import levqor
import storage
import wsgi_routes
from support import STORES, KEY, Client, FakeClock, Server, make_app, store_env

DAY = 86_400
STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request):
    """Every guardrail test runs on each store: the money is in the SQLite
    file beside memory or SQLite jobs, or in PostgreSQL with them."""
    STORE["kind"] = request.param
    return request.param


def money_app(tmp_path, clock=None, **env):
    app = make_app(tmp_path, API_KEYS=KEY, **{**store_env(STORE["kind"]), **env})
    if clock is not None:
        for part in (app.services.engine, app.services.ledger, app.services.guardrails):
            setattr(part, "now" if part is app.services.engine else "clock", clock)
        app.services.jobs.clock = clock
    return app


def intake(c, key=KEY, **body):
    return c.post("/api/v1/intake", {"workflow": "ext", "payload": {}, **body}, key=key)


# -- exact money ------------------------------------------------------------------------


@pytest.mark.parametrize("usd, micro", [(0.35, 350_000), ("10", 10_000_000), (0.1 + 0.2, 300_000),
                                        (1e-6, 1), (0, 0), (123456.789012, 123_456_789_012)])
def test_dollars_become_exact_micro_dollars(usd, micro):
    assert costs.to_micro(usd) == micro


def test_charges_round_up_never_down():
    assert costs.to_micro(0.0000001, decimal.ROUND_CEILING) == 1


@pytest.mark.parametrize("bad", [-1, "nan", "inf", "abc"])
def test_bad_amounts_are_refused(bad):
    with pytest.raises((ValueError, decimal.InvalidOperation)):
        costs.to_micro(bad)


def test_ten_thousand_small_charges_add_up_exactly(tmp_path):
    book = ledger.Ledger(storage.Database(str(tmp_path / "l.db")))
    job = {"job_id": "j" * 32, "key_id": "k", "workflow": "w"}
    book.reserve(job, costs.to_micro(1), [("service", None, costs.to_micro(10))])
    for _ in range(10_000):
        book.charge(job, costs.to_micro(0.0001, decimal.ROUND_CEILING))
    assert book.spent(job["job_id"]) == 1_000_000  # $1.000000 exactly: 0.0001 is not a binary float
    # Past the reservation a charge is still recorded, in full: that money was spent.
    assert book.charge(job, 1) == (1_000_001, None)
    assert book.settle(job["job_id"], "done") == 1_000_001
    assert book.used_today() == 1_000_001
    # The running totals agree with the rows they summarise.
    rows = book.db.query("SELECT SUM(amount) AS s FROM ledger")[0]["s"]
    assert rows == 1_000_001


# -- per-job caps ------------------------------------------------------------------------


def test_max_cost_over_the_global_cap_is_422(tmp_path):
    app = money_app(tmp_path, MAX_COST_PER_JOB="0.5")
    r = intake(Client(app), max_cost=0.51)
    assert r.status == 422 and r.json()["error"] == "cost_cap_exceeded"
    assert intake(Client(app), max_cost=0.5).status == 202
    app.stop()


def test_a_charge_past_the_cap_is_recorded_in_full_and_fails_the_job(tmp_path):
    reg = engine.Registry()

    def spender(payload, ctx):
        for i in range(100):
            ctx.charge(0.07, f"step {i}")
        return "never"

    reg.register("spender", spender)
    app = make_app(tmp_path, API_KEYS=KEY, registry=reg)
    c = Client(app)
    job_id = c.post("/api/v1/intake", {"workflow": "spender", "payload": {}, "max_cost": 0.3},
                    key=KEY).json()["job_id"]
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "cost_cap_exceeded"
    assert view["error"]["attempts"] == 1  # no retry
    # Four charges of 0.07 fit; the fifth passed the cap, and was spent all the same.
    assert view["cost"] == {"max": 0.3, "spent": 0.35}
    assert app.services.ledger.spent(job_id) == 350_000
    assert app.services.ledger.used_today() == 350_000  # nothing is left reserved
    app.stop()


def test_a_zero_cap_job_reserves_nothing_and_may_spend_nothing(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    job_id = intake(c, max_cost=0).json()["job_id"]
    assert app.services.ledger.used_today() == 0
    token = c.post("/api/v1/jobs/claim", {"workflows": ["ext"]}, key=KEY).json()["job"]["lease_token"]
    r = c.post(f"/api/v1/jobs/{job_id}/complete", {"lease_token": token, "result": 1, "cost": 0.01}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "cost_cap_exceeded"
    assert c.get(f"/api/v1/status/{job_id}").json()["status"] == "failed"
    assert app.services.ledger.used_today() == 10_000  # spent all the same: recorded
    app.stop()


def test_external_workers_report_a_running_total(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    job_id = intake(c, max_cost=0.2).json()["job_id"]
    token = c.post("/api/v1/jobs/claim", {"workflows": ["ext"]}, key=KEY).json()["job"]["lease_token"]
    for total in (0.05, 0.05, 0.12):  # a repeated total charges nothing twice
        assert c.post(f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token, "cost": total},
                      key=KEY).status == 200
    r = c.post(f"/api/v1/jobs/{job_id}/complete", {"lease_token": token, "result": {}, "cost": 0.15}, key=KEY)
    assert r.json()["job"]["cost"] == {"max": 0.2, "spent": 0.15}
    assert app.services.ledger.used_today() == 150_000
    app.stop()


def test_builtin_workflows_reserve_nothing(tmp_path):
    app = money_app(tmp_path, MAX_COST_PER_DAY="0.01")
    c = Client(app)
    assert all(c.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key=KEY).status == 202
               for _ in range(20))
    app.stop()


# -- daily budgets ----------------------------------------------------------------------


def test_daily_budget_at_the_boundary_then_release_then_midnight(tmp_path):
    clock = FakeClock(1_800_000_000 - 1_800_000_000 % DAY + DAY - 3600)  # 23:00 UTC
    app = money_app(tmp_path, clock, MAX_COST_PER_DAY="1.00")
    c = Client(app)
    ids = [intake(c, max_cost=0.25).json()["job_id"] for _ in range(4)]  # exactly $1.00 reserved
    r = intake(c, max_cost=0.01)
    assert r.status == 429 and r.json()["error"] == "budget_exceeded"
    assert int(r.headers["retry-after"]) == 30  # all of it is reservations: soon, not midnight
    assert r.json()["budget"] == {"scope": "service", "day": costs.utc_day(clock()), "limit": 1.0,
                                  "used": 1.0, "requested": 0.01, "resets_in": 3600}
    # A job that spends 0.10 and ends gives back the other 0.15 of its reservation.
    token = c.post("/api/v1/jobs/claim", {"workflows": ["ext"]}, key=KEY).json()["job"]
    c.post(f"/api/v1/jobs/{token['job_id']}/complete",
           {"lease_token": token["lease_token"], "result": 1, "cost": 0.10}, key=KEY)
    assert intake(c, max_cost=0.15).status == 202
    assert intake(c, max_cost=0.000001).status == 429
    clock.advance(3600)  # midnight UTC: a new day, a new budget
    assert intake(c, max_cost=0.25).status == 202
    assert len(ids) == 4
    app.stop()


def test_a_managed_keys_daily_budget(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    secret = c.post("/api/v1/keys", {"name": "tenant", "role": "client", "daily_budget": 0.5},
                    key=KEY).json()["key"]
    assert intake(c, key=secret, max_cost=0.3).status == 202
    r = intake(c, key=secret, max_cost=0.3)
    assert r.status == 429 and r.json()["budget"]["scope"] == "key"
    assert intake(c, max_cost=0.3).status == 202  # the admin key is not held to it
    app.stop()


@pytest.mark.server
def test_a_thousand_concurrent_intakes_against_a_budget_for_ten(tmp_path, store_kind):
    if store_kind == "memory":
        pytest.skip("several workers need their jobs in a database")
    srv = Server(tmp_path, API_KEYS=KEY, **store_env(store_kind), WEB_CONCURRENCY=2, MAX_COST_PER_DAY="1.00",
                 RATE_BURST=100_000, RATE_GLOBAL=100_000).start()
    try:
        statuses = []
        lock = threading.Lock()

        def fire(n):
            s = requests.Session()
            for _ in range(n):
                r = s.post(srv.url + "/api/v1/intake", headers={"X-Api-Key": KEY}, timeout=30,
                           json={"workflow": "ext", "payload": {}, "max_cost": 0.1})
                with lock:
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=fire, args=(50,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(statuses) == 1000
        assert statuses.count(202) == 10 and statuses.count(429) == 990
    finally:
        srv.stop()


# -- usage and the ledger ----------------------------------------------------------------


def test_usage_equals_the_ledger(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    client_key = c.post("/api/v1/keys", {"name": "c", "role": "client"}, key=KEY).json()
    spends = [(KEY, "ext", 0.1), (client_key["key"], "ext", 0.05), (client_key["key"], "other", 0.02)]
    for key, workflow, spend in spends:
        job_id = c.post("/api/v1/intake", {"workflow": workflow, "payload": {}, "max_cost": 0.2},
                        key=key).json()["job_id"]
        job = c.post("/api/v1/jobs/claim", {"workflows": [workflow]}, key=KEY).json()["job"]
        c.post(f"/api/v1/jobs/{job_id}/complete", {"lease_token": job["lease_token"], "result": 1,
                                                  "cost": spend}, key=KEY)
    intake(c, max_cost=0.2)  # still running: reserved, not spent
    app.services.recorder.flush()
    rows = app.services.db.query("SELECT kind, CAST(SUM(amount) AS BIGINT) AS s FROM ledger GROUP BY kind")
    ledger = {r["kind"]: r["s"] for r in rows}
    body = c.get("/api/v1/usage?group_by=workflow", key=KEY).json()
    assert body["totals"] == {"spend": costs.to_usd(ledger["charge"]),
                              "reserved": costs.to_usd(ledger["reserve"] + ledger["release"])}
    assert body["totals"] == {"spend": 0.17, "reserved": 0.2}
    by_workflow = {g["workflow"]: g for g in body["groups"]}
    assert by_workflow["ext"]["spend"] == 0.15 and by_workflow["ext"]["jobs"] == {"succeeded": 2}
    mine = c.get("/api/v1/usage?group_by=key", key=client_key["key"]).json()
    assert [g["key"] for g in mine["groups"]] == [client_key["id"]] and mine["totals"]["spend"] == 0.07
    for bad in ("from=2026-13-01", "from=yesterday", "group_by=month", "to=2026-1-1"):
        assert c.get(f"/api/v1/usage?{bad}", key=KEY).status == 400, bad
    empty = c.get("/api/v1/usage?from=2026-02-01&to=2026-01-01", key=KEY).json()
    assert empty["groups"] == [] and empty["totals"] == {"spend": 0, "reserved": 0}
    app.stop()


# -- managed keys and roles ---------------------------------------------------------------


def test_keys_are_created_listed_and_revoked(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    r = c.post("/api/v1/keys", {"name": "ci worker", "role": "worker", "rate_per_minute": 100}, key=KEY)
    assert r.status == 201
    created = r.json()
    secret = created["key"]
    assert secret.startswith("lq_") and len(secret) >= 43 and created["prefix"] == secret[:11]
    listed = c.get("/api/v1/keys", key=KEY).json()["keys"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert listed[0]["revoked"] is False and listed[0]["spend_today"] == 0
    for stored in tmp_path.glob("levqor.db*"):  # the database, its WAL and shm (not the wake folder)
        assert not stored.is_file() or secret.encode() not in stored.read_bytes()
    assert c.post("/api/v1/jobs/claim", {"workflows": ["x"]}, key=secret).status == 204
    assert c.request("DELETE", f"/api/v1/keys/{created['id']}", key=KEY).json()["revoked"] is True
    r = c.post("/api/v1/jobs/claim", {"workflows": ["x"]}, key=secret)
    assert r.status == 403 and r.json()["error"] == "forbidden"
    assert c.request("DELETE", "/api/v1/keys/key_nope", key=KEY).status == 404
    for body in ({"name": "x", "role": "admin"}, {"name": "", "role": "client"}, {"role": "client"},
                 {"name": "x", "role": "client", "daily_budget": -1}):
        assert c.post("/api/v1/keys", body, key=KEY).status == 400, body
    app.stop()


def test_every_keyed_route_checks_the_role(tmp_path):
    app = money_app(tmp_path, RATE_BURST=10_000, RATE_GLOBAL=10_000)
    c = Client(app)
    keys = {role: c.post("/api/v1/keys", {"name": role, "role": role}, key=KEY).json()["key"]
            for role in ("client", "worker")}
    keys["admin"] = KEY
    checked = 0
    # JOB_READ is keyed in production only; this app runs in development.
    unkeyed = (wsgi_routes.PUBLIC, wsgi_routes.JOB_READ)
    for method, pattern, _, access, flags in wsgi_routes.ROUTES:
        if access in unkeyed:
            continue
        path = pattern.replace("<job_id>", "0" * 32).replace("<user_id>", "0" * 32) \
            .replace("<key_id>", "key_0")
        allowed = {"admin"} | ({"worker"} if "worker" in flags else
                               set() if "admin" in flags else {"client"})
        for role, key in keys.items():
            r = c.request(method, path, json={} if method in ("POST", "PATCH") else None, key=key)
            forbidden = r.status == 403 and r.json()["message"].startswith(f"a {role} key")
            assert forbidden == (role not in allowed), (method, pattern, role, r)
            checked += 1
    assert checked == 3 * sum(1 for r in wsgi_routes.ROUTES if r[3] not in unkeyed)


def test_a_write_refused_for_its_role_is_audited(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    worker = c.post("/api/v1/keys", {"name": "w", "role": "worker"}, key=KEY).json()
    assert intake(c, key=worker["key"]).status == 403
    app.services.recorder.flush()
    rows = app.services.db.query("SELECT key_id, path, status FROM audit_log WHERE key_id = :id",
                                 {"id": worker["id"]})
    assert rows == [{"key_id": worker["id"], "path": "/api/v1/intake", "status": 403}]
    app.stop()


def test_clients_cannot_touch_each_others_jobs(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    a, b = (c.post("/api/v1/keys", {"name": n, "role": "client"}, key=KEY).json()["key"] for n in "ab")
    job_id = intake(c, key=a, max_cost=0).json()["job_id"]
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", {}, key=b).status == 404
    assert c.get("/api/v1/jobs", key=b).json()["jobs"] == []
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", {}, key=a).status == 200
    app.stop()


def test_a_keys_rate_per_minute_applies(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    secret = c.post("/api/v1/keys", {"name": "slow", "role": "client", "rate_per_minute": 2},
                    key=KEY).json()["key"]
    statuses = [c.get("/api/v1/jobs", key=secret).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert c.get("/api/v1/jobs", key=KEY).status == 200
    app.stop()


# -- llm.chat ---------------------------------------------------------------------------------


class FakeOpenAI:
    """An OpenAI-compatible /chat/completions on 127.0.0.1."""

    def __init__(self):
        self.requests = []
        self.answers = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, self.headers.get("Authorization"), body))
                status, answer, *headers = fake.answers.pop(0) if fake.answers else (200, {
                    "choices": [{"message": {"role": "assistant", "content": "Hello!"}}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 500}})
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def openai(tmp_path):
    fake = FakeOpenAI()
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"tiny-model": {"input": 0.5, "output": 1.5}}))
    fake.env = {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-test", "MODEL_PRICES": str(prices)}
    yield fake
    fake.close()


def chat(c, max_cost=0.35, **payload):
    body = {"model": "tiny-model", "messages": [{"role": "user", "content": "Say hello"}], **payload}
    return c.post("/api/v1/intake", {"workflow": "llm.chat", "payload": body, "max_cost": max_cost}, key=KEY)


def test_llm_chat_charges_what_the_call_cost(tmp_path, openai):
    app = money_app(tmp_path, **openai.env)
    c = Client(app)
    job_id = chat(c, max_tokens=600).json()["job_id"]
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "succeeded", view
    # 1000 tokens in at $0.5/M and 500 out at $1.5/M: $0.00125 exactly
    assert view["result"]["cost"] == 0.00125 and view["cost"]["spent"] == 0.00125
    assert view["result"]["message"]["content"] == "Hello!"
    path, auth, sent = openai.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and sent["max_tokens"] == 600
    assert app.services.ledger.used_today() == 1250
    app.stop()


def test_llm_chat_refuses_before_calling_when_the_worst_case_does_not_fit(tmp_path, openai):
    app = money_app(tmp_path, **openai.env)
    c = Client(app)
    # 100,000 output tokens at $1.5/M could cost $0.15: more than the $0.01 cap.
    job_id = chat(c, max_cost=0.01, max_tokens=100_000).json()["job_id"]
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "budget_exceeded"
    assert openai.requests == [] and view["cost"]["spent"] == 0
    app.stop()


def test_llm_chat_refuses_a_model_without_a_price(tmp_path, openai):
    app = money_app(tmp_path, **openai.env)
    c = Client(app)
    job_id = chat(c, model="unpriced").json()["job_id"]
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and "no price" in view["error"]["message"]
    assert openai.requests == []
    app.stop()


def test_llm_chat_retries_transient_errors(tmp_path, openai):
    clock = FakeClock()
    app = money_app(tmp_path, clock, **openai.env)
    c = Client(app)
    openai.answers = [(429, {"error": "slow down"}), (503, {"error": "busy"})]
    job_id = chat(c).json()["job_id"]
    for _ in range(3):
        app.services.engine.run_next()
        clock.advance(600)
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "succeeded" and view["attempts"] == 3 and len(openai.requests) == 3
    app.stop()


def test_llm_chat_payload_is_validated_at_intake(tmp_path, openai):
    app = money_app(tmp_path, **openai.env)
    r = Client(app).post("/api/v1/intake", {"workflow": "llm.chat", "payload": {"model": "tiny-model"}},
                         key=KEY)
    assert r.status == 400 and r.json()["field"] == "payload/messages"
    app.stop()


@pytest.mark.parametrize("content", ['{"m": {"input": "x", "output": 1}}', "[]", "{nope"])
def test_malformed_price_files_refuse_to_start(tmp_path, content):
    import levqor
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(levqor.ConfigError, match="MODEL_PRICES"):
        make_app(tmp_path, OPENAI_API_KEY="sk", MODEL_PRICES=str(path))


def test_llm_chat_charges_the_worst_case_when_the_answer_is_lost_or_unreadable(tmp_path, openai):
    # A 200 whose body is no usable answer may have been billed all the same.
    clock = FakeClock()
    app = money_app(tmp_path, clock, **openai.env)
    c = Client(app)
    worst = 1555  # 37 prompt tokens at 0.5 and 1024 completion tokens at 1.5 per million
    openai.answers = [(200, ["not", "an", "object"]),
                      (200, {"choices": [{"message": {"role": "assistant", "content": "x"}}],
                             "usage": {"prompt_tokens": float("inf"), "completion_tokens": 1}})]
    job_id = chat(c).json()["job_id"]
    for _ in range(3):
        app.services.engine.run_next()
        clock.advance(600)
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "succeeded" and len(openai.requests) == 2 and view["attempts"] == 2
    # The lost answer (retried) and the answer with unreadable usage (kept)
    # each cost the worst case.
    assert view["cost"]["spent"] == 2 * worst / 1e6
    app.stop()


def test_a_provider_429_with_retry_after_waits_without_spending_an_attempt(tmp_path, openai):
    app = money_app(tmp_path, **openai.env)
    c = Client(app)
    openai.answers.append((429, {"error": "slow down"}, {"Retry-After": "7"}))
    job_id = chat(c).json()["job_id"]
    before = time.time()
    app.services.engine.run_next()
    job = app.services.jobs.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["error"]["type"] == "rate_limited" and 6.5 <= job["not_before"] - before <= 7.5
    assert app.services.ledger.spent(job_id) == 0
    app.stop()


def test_llm_limits_cap_requests_a_minute_across_the_service(tmp_path, openai):
    env = dict(openai.env, LLM_LIMITS=json.dumps({"tiny-model": {"rpm": 2, "tpm": 100_000}}))
    app = money_app(tmp_path, **env)
    other = money_app(tmp_path / "other", **env, DATABASE_URL=app.services.settings.database_url) \
        if STORE["kind"] == "postgres" else None
    # The count is per calendar minute: one clock for both hosts, held
    # mid-minute, so a run that straddles a minute's end starts no new count.
    mid_minute = time.time() // 60 * 60 + 30
    for host in filter(None, (app, other)):
        host.services.engine.llm_limits.clock = lambda: mid_minute
    try:
        c = Client(app)
        ids = [chat(c, max_tokens=10).json()["job_id"] for _ in range(3)]
        for _ in range(3):
            app.services.engine.run_next()
        views = [c.get(f"/api/v1/status/{j}").json() for j in ids]
        assert [v["status"] for v in views] == ["succeeded", "succeeded", "queued"]
        assert views[2]["error"]["type"] == "rate_limited" and views[2]["attempts"] == 0
        assert len(openai.requests) == 2
        if other is not None:  # another host shares the minute's count
            assert other.services.engine.llm_limits.take("tiny-model", 10) is not None
    finally:
        app.stop()
        if other is not None:
            other.stop()


def test_a_request_larger_than_a_minutes_tokens_fails_at_once(tmp_path, openai):
    app = money_app(tmp_path, **openai.env, LLM_LIMITS=json.dumps({"tiny-model": {"tpm": 50}}))
    c = Client(app)
    job_id = chat(c, max_tokens=100).json()["job_id"]
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and "LLM_LIMITS" in view["error"]["message"]
    assert openai.requests == []
    app.stop()


@pytest.mark.parametrize("raw", ['{"m": {"rpm": 0}}', '{"m": {"rps": 1}}', "[]", "{nope",
                                 '{"m": {"tpm": 1.5}}'])
def test_malformed_llm_limits_refuse_to_start(raw):
    with pytest.raises(levqor.ConfigError):
        levqor.Settings.from_env({"LLM_LIMITS": raw})
