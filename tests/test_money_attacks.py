"""Attacks on the money rules: spend the ledger never saw, concurrent cost
reports and retries, caps that restart, one tenant taking the whole day,
and budgets that refuse for too long or too soon."""

import http.server
import json
import threading

import pytest
import requests

import engine
import levqor
import storage
from costs import utc_day
from support import KEY, Client, FakeClock, Server, make_app

DAY = 86_400


def money_app(tmp_path, clock=None, registry=None, **env):
    env.setdefault("RATE_BURST", 10_000)
    env.setdefault("RATE_GLOBAL", 10_000)
    app = make_app(tmp_path, registry=registry, API_KEYS=KEY, **env)
    if clock is not None:
        app.services.engine.now = clock
        app.services.ledger.clock = app.services.guardrails.clock = clock
        app.services.jobs.clock = clock
    return app


def intake(c, key=KEY, workflow="ext", **body):
    return c.post("/api/v1/intake", {"workflow": workflow, "payload": {}, **body}, key=key)


def claim(c, workflow="ext"):
    return c.post("/api/v1/jobs/claim", {"workflows": [workflow]}, key=KEY).json()["job"]


def reserved(app, job_id):
    rows = app.services.db.query("SELECT reserved FROM ledger_jobs WHERE job_id = ?", (job_id,))
    return rows[0]["reserved"] if rows else 0


def at_once(n, call):
    """Run call(i) on n threads released together; their results in order."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        barrier.wait(10)
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# -- a provider that bills by the character ---------------------------------------------


class BillingOpenAI:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that bills one
    prompt token per character of each message's role and content, and
    ``completion(max_tokens)`` completion tokens. ``seen`` is called as each
    request arrives (to look at the ledger while the call is under way)."""

    def __init__(self, completion=lambda max_tokens: max_tokens, seen=None):
        self.requests = []
        self.billed = []  # (prompt, completion) tokens per answer
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if seen is not None:
                    seen(body)
                prompt = sum(len(m["role"]) + len(m["content"]) for m in body["messages"])
                usage = (prompt, completion(body["max_tokens"]))
                fake.billed.append(usage)
                data = json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def env(self, tmp_path):
        prices = tmp_path / "prices.json"
        # $100 per million tokens: exactly 100 micro-dollars a token, either way.
        prices.write_text(json.dumps({"big-model": {"input": 100, "output": 100}}))
        return {"OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": "sk-test", "MODEL_PRICES": str(prices)}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat(c, content, max_tokens=200, **body):
    payload = {"model": "big-model", "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": content}]}
    return c.post("/api/v1/intake", {"workflow": "llm.chat", "payload": payload, **body}, key=KEY)


@pytest.mark.parametrize("content, called", [
    ("字" * 4000, False),       # 4,204 tokens billed: $0.42 against a $0.35 cap
    ("😀" * 3500, False),       # 3,704 tokens: $0.37
    ("é" * 3400 + "字" * 200, False),
    ("字" * 900, True),         # 2,700 bytes: the worst case fits, the call costs $0.11
    ("hello " * 500, True),
])
def test_llm_chat_never_calls_when_a_cjk_or_emoji_prompt_could_pass_the_cap(tmp_path, content, called):
    fake = BillingOpenAI()
    app = money_app(tmp_path, **fake.env(tmp_path))
    try:
        c = Client(app)
        job_id = chat(c, content, max_cost=0.35).json()["job_id"]
        app.services.engine.run_next()
        view = c.get(f"/api/v1/status/{job_id}").json()
        assert bool(fake.requests) == called
        if called:
            (prompt, completion), = fake.billed
            billed = 100 * (prompt + completion)
            assert billed <= 350_000 and view["status"] == "succeeded", view
            assert app.services.ledger.spent(job_id) == billed
        else:
            assert view["status"] == "failed" and view["error"]["type"] == "budget_exceeded"
            assert view["cost"]["spent"] == 0
    finally:
        app.stop()
        fake.close()


@pytest.mark.parametrize("max_cost", [{"max_cost": 0.35}, {}], ids=["declared", "undeclared"])
def test_a_provider_billing_past_max_tokens_is_recorded_in_full(tmp_path, max_cost):
    fake = BillingOpenAI(completion=lambda max_tokens: 20 * max_tokens)  # a liar
    app = money_app(tmp_path, MAX_COST_PER_DAY="2.00", **fake.env(tmp_path))
    try:
        c = Client(app)
        job_id = chat(c, "Say hello", max_tokens=1000, **max_cost).json()["job_id"]
        app.services.engine.run_next()
        (prompt, completion), = fake.billed
        billed = 100 * (prompt + completion)  # $2.0013: all of it was spent
        view = c.get(f"/api/v1/status/{job_id}").json()
        assert view["status"] == "failed" and view["error"]["type"] == "cost_cap_exceeded"
        assert view["cost"] == {"max": 0.35, "spent": billed / 1e6}
        usage = c.get("/api/v1/usage", key=KEY).json()
        assert usage["totals"] == {"spend": billed / 1e6, "reserved": 0}
        assert app.services.ledger.used_today() == billed
        # The excess counts against the day at once: new work that needs it is refused.
        r = intake(c, max_cost=0.01)
        assert r.status == 429 and r.json()["error"] == "budget_exceeded"
        assert intake(c).status == 429  # nothing left for a job charged as it spends either
        assert intake(c, max_cost=0).status == 202  # a job that spends nothing is not held back
    finally:
        app.stop()
        fake.close()


def test_llm_chat_without_a_declared_cost_reserves_its_worst_case_before_calling(tmp_path):
    held = []
    fake = BillingOpenAI(seen=lambda body: held.append(app.services.ledger.used_today()))
    app = money_app(tmp_path, MAX_COST_PER_DAY="0.20", **fake.env(tmp_path))
    try:
        c = Client(app)
        first = chat(c, "Say hello", max_tokens=1000).json()["job_id"]  # worst case: $0.1037
        app.services.engine.run_next()
        assert c.get(f"/api/v1/status/{first}").json()["status"] == "succeeded"
        assert held == [103_700]  # the day held the worst case while the call was made
        (prompt, completion), = fake.billed
        assert app.services.ledger.used_today() == 100 * (prompt + completion)
        # $0.1013 spent of $0.20: a second worst case of $0.1037 does not fit the day.
        second = chat(c, "Say hello", max_tokens=1000).json()["job_id"]
        app.services.engine.run_next()
        view = c.get(f"/api/v1/status/{second}").json()
        assert view["status"] == "failed" and view["error"]["type"] == "budget_exceeded"
        assert len(fake.requests) == 1 and view["cost"]["spent"] == 0
        assert app.services.ledger.used_today() == 101_300  # its failed reservation is gone
    finally:
        app.stop()
        fake.close()


def test_llm_chat_refuses_message_fields_the_estimate_cannot_see(tmp_path):
    app = money_app(tmp_path)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x" * 10_000}]}
    r = Client(app).post("/api/v1/intake", {"workflow": "llm.chat", "payload": payload}, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed"
    app.stop()


# -- spend is recorded, whoever reports it ------------------------------------------------


def test_an_in_process_charge_past_a_day_budget_is_recorded_and_blocks_new_work(tmp_path):
    reg = engine.Registry()

    def spender(payload, ctx):  # declares no cost: charged as it spends
        for _ in range(5):
            ctx.charge(0.06, "step")
        return "never"

    reg.register("spender", spender)
    app = money_app(tmp_path, registry=reg, MAX_COST_PER_DAY="0.10")
    c = Client(app)
    job_id = intake(c, workflow="spender").json()["job_id"]
    assert app.services.ledger.used_today() == 0  # nothing reserved
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "budget_exceeded"
    assert view["cost"]["spent"] == 0.12 and app.services.ledger.used_today() == 120_000
    assert intake(c, max_cost=0.01).status == 429
    app.stop()


def test_a_workers_cost_past_the_cap_is_recorded_and_answered_409(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    job_id = intake(c, max_cost=0.1).json()["job_id"]
    token = claim(c)["lease_token"]
    r = c.post(f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token, "cost": 0.25}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "cost_cap_exceeded"
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "cost_cap_exceeded"
    assert view["cost"] == {"max": 0.1, "spent": 0.25}
    assert c.get("/api/v1/usage", key=KEY).json()["totals"] == {"spend": 0.25, "reserved": 0}
    app.stop()


# -- concurrent reports and retries -----------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_sixteen_heartbeats_reporting_one_total_charge_it_once(tmp_path, store):
    app = money_app(tmp_path, JOB_STORE=store)
    c = Client(app)
    for _ in range(5):  # a race is a matter of luck: give it several chances
        job_id = intake(c, max_cost=0.35).json()["job_id"]
        token = claim(c)["lease_token"]
        statuses = at_once(16, lambda i: c.post(f"/api/v1/jobs/{job_id}/heartbeat",
                                                {"lease_token": token, "cost": 0.10}, key=KEY).status)
        assert statuses == [200] * 16
        view = c.get(f"/api/v1/status/{job_id}").json()
        assert view["status"] == "running" and view["cost"] == {"max": 0.35, "spent": 0.1}
        assert app.services.ledger.spent(job_id) == 100_000
    app.stop()


@pytest.mark.server
def test_heartbeats_to_two_gunicorn_workers_charge_a_total_once(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, JOB_STORE="sqlite", WEB_CONCURRENCY=2,
                 RATE_BURST=100_000, RATE_GLOBAL=100_000, RATE_WORKER=100_000).start()
    try:
        headers = {"X-Api-Key": KEY}
        job_id = requests.post(srv.url + "/api/v1/intake", headers=headers, timeout=10, json={
            "workflow": "ext", "payload": {}, "max_cost": 0.35}).json()["job_id"]
        token = requests.post(srv.url + "/api/v1/jobs/claim", headers=headers, timeout=10,
                              json={"workflows": ["ext"]}).json()["job"]["lease_token"]
        statuses = at_once(16, lambda i: requests.post(
            f"{srv.url}/api/v1/jobs/{job_id}/heartbeat", headers=headers, timeout=30,
            json={"lease_token": token, "cost": 0.10}).status_code)
        assert statuses == [200] * 16
        view = requests.get(f"{srv.url}/api/v1/status/{job_id}", timeout=10).json()
        assert view["status"] == "running" and view["cost"] == {"max": 0.35, "spent": 0.1}
    finally:
        srv.stop()


def test_concurrent_retries_of_one_failed_job_reserve_once(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    jobs = []
    for n in range(3):  # a race is a matter of luck: give it several chances
        job_id = intake(c, workflow=f"ext{n}", max_cost=0.2).json()["job_id"]
        token = claim(c, f"ext{n}")["lease_token"]
        c.post(f"/api/v1/jobs/{job_id}/fail", {"lease_token": token, "error": "boom",
                                               "retryable": False, "cost": 0.04}, key=KEY)
        assert app.services.ledger.used_today() == len(jobs) * 200_000 + 40_000
        statuses = at_once(10, lambda i: c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY).status)
        assert sorted(statuses) == [200] + [409] * 9
        assert c.get(f"/api/v1/status/{job_id}").json()["status"] == "queued"
        assert reserved(app, job_id) == 160_000  # what is left of its cap
        jobs.append(job_id)
        # The day holds exactly what was spent and what the queued jobs hold.
        assert app.services.ledger.used_today() == len(jobs) * (40_000 + 160_000)
    app.stop()


def test_a_jobs_cap_covers_all_its_attempts(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    job_id = intake(c, max_cost=0.35).json()["job_id"]
    token = claim(c)["lease_token"]
    c.post(f"/api/v1/jobs/{job_id}/fail", {"lease_token": token, "error": "boom", "retryable": False,
                                           "cost": 0.30}, key=KEY)
    assert c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY).status == 200
    assert reserved(app, job_id) == 50_000  # only what the cap has left
    assert app.services.ledger.used_today() == 350_000
    token = claim(c)["lease_token"]
    # The worker's running total counts every attempt: 0.40 in all passes the 0.35 cap.
    r = c.post(f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token, "cost": 0.40}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "cost_cap_exceeded"
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["status"] == "failed" and view["error"]["type"] == "cost_cap_exceeded"
    assert view["cost"] == {"max": 0.35, "spent": 0.4}
    assert app.services.ledger.used_today() == 400_000
    app.stop()


def test_an_in_process_retry_spends_only_what_the_cap_has_left(tmp_path):
    reg = engine.Registry()

    def spender(payload, ctx):
        ctx.charge(0.2, "attempt")
        ctx.fail("boom")

    reg.register("spender", spender, max_cost=300_000)
    app = money_app(tmp_path, registry=reg)
    c = Client(app)
    job_id = intake(c, workflow="spender").json()["job_id"]
    app.services.engine.run_next()
    assert c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY).status == 200
    app.services.engine.run_next()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["error"]["type"] == "cost_cap_exceeded" and view["cost"] == {"max": 0.3, "spent": 0.4}
    app.stop()


# -- tenants and budgets -------------------------------------------------------------------


def test_one_tenant_cannot_spend_the_whole_day_nor_see_the_services_figures(tmp_path):
    clock = FakeClock()
    app = money_app(tmp_path, clock, MAX_COST_PER_DAY="1.00", MAX_COST_PER_JOB="1.00")
    c = Client(app)
    a, b = (c.post("/api/v1/keys", {"name": n, "role": "client"}, key=KEY).json()["key"] for n in "ab")
    assert intake(c, key=a, max_cost=0.25).status == 202  # a quarter of the day: all a key gets
    r = intake(c, key=a, max_cost=0.01)
    assert r.status == 429 and r.json()["budget"] == {
        "scope": "key", "day": utc_day(clock()), "limit": 0.25, "used": 0.25, "requested": 0.01,
        "resets_in": r.json()["budget"]["resets_in"]}
    assert intake(c, key=b, max_cost=0.1).status == 202  # a could not lock b out
    assert intake(c, max_cost=0.65).status == 202  # the operator's key: the service's day only
    r = intake(c, key=b, max_cost=0.01)
    assert r.status == 429 and r.json()["error"] == "budget_exceeded"
    assert r.json()["budget"] == {"scope": "service", "resets_in": r.json()["budget"]["resets_in"]}
    r = intake(c, max_cost=0.01)
    assert r.status == 429 and r.json()["budget"]["limit"] == 1.0 and r.json()["budget"]["used"] == 1.0
    app.stop()


def test_a_managed_keys_spend_counts_against_its_own_day(tmp_path):
    app = money_app(tmp_path, MAX_COST_PER_DAY="1.00")
    c = Client(app)
    a = c.post("/api/v1/keys", {"name": "a", "role": "client"}, key=KEY).json()["key"]
    job_id = intake(c, key=a).json()["job_id"]  # no declared cost: charged as it spends
    token = claim(c)["lease_token"]
    r = c.post(f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token, "cost": 0.3}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "budget_exceeded"  # past a's $0.25
    assert intake(c, key=a).status == 429 and intake(c).status == 202
    app.stop()


def test_the_keys_listing_shows_the_budget_that_applies(tmp_path):
    app = money_app(tmp_path, MAX_COST_PER_DAY="10")
    c = Client(app)
    for name, role, budget in (("c", "client", None), ("w", "worker", None), ("own", "client", 0.5)):
        body = {"name": name, "role": role, **({"daily_budget": budget} if budget else {})}
        assert c.post("/api/v1/keys", body, key=KEY).json()["daily_budget"] == (budget or 2.5)
    listed = {k["name"]: k["daily_budget"] for k in c.get("/api/v1/keys", key=KEY).json()["keys"]}
    assert listed == {"c": 2.5, "w": 2.5, "own": 0.5}
    app.stop()
    app = money_app(tmp_path, KEY_DAILY_BUDGET="0.4")
    listed = {k["name"]: k["daily_budget"] for k in Client(app).get("/api/v1/keys", key=KEY).json()["keys"]}
    assert listed == {"c": 0.4, "w": 0.4, "own": 0.5}
    app.stop()
    with pytest.raises(levqor.ConfigError, match="KEY_DAILY_BUDGET"):
        make_app(tmp_path, KEY_DAILY_BUDGET="lots")


def test_retry_after_is_short_while_reservations_would_make_room(tmp_path):
    clock = FakeClock(1_800_000_000 - 1_800_000_000 % DAY + DAY - 3600)  # 23:00 UTC
    app = money_app(tmp_path, clock, MAX_COST_PER_DAY="1.00", MAX_COST_PER_JOB="1.00")
    c = Client(app)
    ids = [intake(c, max_cost=0.25).json()["job_id"] for _ in range(4)]
    r = intake(c, max_cost=0.5)
    assert r.status == 429 and r.headers["retry-after"] == "30"  # reservations end well before midnight
    for _ in ids[:2]:  # two jobs spend all they reserved
        job = claim(c)
        c.post(f"/api/v1/jobs/{job['job_id']}/complete",
               {"lease_token": job["lease_token"], "result": 1, "cost": 0.25}, key=KEY)
    assert intake(c, max_cost=0.5).headers["retry-after"] == "30"  # what is reserved would do
    r = intake(c, max_cost=0.51)  # it would not: only midnight makes room
    assert r.status == 429 and r.headers["retry-after"] == "3600"
    assert r.json()["budget"]["resets_in"] == 3600
    app.stop()


def test_a_hundred_jobs_without_a_declared_cost_are_all_accepted(tmp_path):
    app = money_app(tmp_path)  # the default $0.35 a job and $10 a day
    c = Client(app)
    statuses = at_once(100, lambda i: intake(c, workflow="ext.unregistered").status)
    assert statuses == [202] * 100
    assert app.services.ledger.used_today() == 0
    job = claim(c, "ext.unregistered")
    assert c.get(f"/api/v1/status/{job['job_id']}").json()["cost"] == {"max": 0.35, "spent": 0}
    c.post(f"/api/v1/jobs/{job['job_id']}/heartbeat", {"lease_token": job["lease_token"], "cost": 0.2},
           key=KEY)
    assert app.services.ledger.used_today() == 200_000  # charged as it spends
    app.stop()


# -- money that outlives its job ------------------------------------------------------------


def test_a_release_that_failed_when_the_job_ended_is_made_by_the_sweeper(tmp_path):
    clock = FakeClock()
    app = money_app(tmp_path, clock)
    c = Client(app)
    job_id = intake(c, max_cost=0.2).json()["job_id"]
    ledger, real_settle = app.services.ledger, app.services.ledger.settle
    ledger.settle = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("database hiccup"))
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", {}, key=KEY).status == 200
    ledger.settle = real_settle
    assert reserved(app, job_id) == 200_000
    assert c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY).status == 409  # still held
    app.services.engine.housekeeping()  # within the grace minute: left alone
    assert reserved(app, job_id) == 200_000
    clock.advance(61)
    app.services.engine.housekeeping()
    assert reserved(app, job_id) == 0 and app.services.ledger.used_today() == 0
    assert c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY).status == 200


def test_an_intake_the_store_refuses_keeps_nothing_reserved(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    jobs = app.services.jobs
    real_add = jobs.add_many
    jobs.add_many = lambda *a, **k: (_ for _ in ()).throw(storage.StorageError("busy", "locked"))
    assert intake(c, max_cost=0.05).status == 503
    jobs.add_many = real_add
    assert app.services.ledger.used_today() == 0


def test_a_job_that_spent_its_whole_cap_is_not_retried(tmp_path):
    app = money_app(tmp_path)
    c = Client(app)
    job_id = intake(c, max_cost=0.1).json()["job_id"]
    lease = claim(c)
    r = c.post(f"/api/v1/jobs/{job_id}/fail", {"lease_token": lease["lease_token"], "error": "x",
                                                "retryable": False, "cost": 0.1}, key=KEY)
    assert r.status == 200
    r = c.post(f"/api/v1/jobs/{job_id}/retry", {}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "cost_cap_exceeded"


def test_a_claim_says_what_earlier_attempts_spent(tmp_path):
    clock = FakeClock()
    app = money_app(tmp_path, clock)
    c = Client(app)
    job_id = intake(c, max_cost=0.35).json()["job_id"]
    first = claim(c)
    assert first["cost_spent"] == 0
    c.post(f"/api/v1/jobs/{job_id}/fail", {"lease_token": first["lease_token"], "error": "x",
                                            "cost": 0.3}, key=KEY)
    clock.advance(3600)
    second = claim(c)
    assert second["cost_spent"] == 0.3
    # Reporting that plus this attempt's own 0.2 passes the cap: recorded, refused.
    r = c.post(f"/api/v1/jobs/{job_id}/complete", {"lease_token": second["lease_token"],
                                                    "result": {}, "cost": 0.5}, key=KEY)
    assert r.status == 409 and r.json()["error"] == "cost_cap_exceeded"
    assert c.get(f"/api/v1/status/{job_id}", key=KEY).json()["cost"]["spent"] == 0.5
