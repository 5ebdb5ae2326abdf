"""Attacks on the money rules: spend the ledger never saw, concurrent cost
reports and retries, caps that restart, one tenant taking the whole day,
and budgets that refuse for too long or too soon."""

import http.server
import json
import threading

import pytest
import requests

import engine
from support import KEY, Client, Server, make_app


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


@pytest.mark.parametrize("max_cost", [{"max_cost": 0.35}], ids=["declared"])
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


def test_llm_chat_refuses_message_fields_the_estimate_cannot_see(tmp_path):
    app = money_app(tmp_path)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x" * 10_000}]}
    r = Client(app).post("/api/v1/intake", {"workflow": "llm.chat", "payload": payload}, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed"
    app.stop()


# -- spend is recorded, whoever reports it ------------------------------------------------


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
