"""Durable steps, in-process on every job store: steps recorded once and
replayed, durable sleeps, waiting for events, external workers' steps,
their money, and the hostile cases. (Real gunicorn, kill -9 and two
PostgreSQL hosts: test_steps_e2e.py.)"""

import datetime
import decimal
import json
import time

import pytest

import engine
import llm
from support import KEY, NEXT_KEY, STORES, Client, make_app, store_env

STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request):
    STORE["kind"] = request.param
    return request.param


def counted(path, name, value=None):
    """A step body that notes each run in a file (what a test counts)."""
    def run():
        with open(path, "a") as f:
            f.write(name + "\n")
        return value if value is not None else name
    return run


def runs(path):
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def calls(tmp_path):
    return tmp_path / "calls.txt"


def registry(calls):
    reg = engine.registry.copy()

    def three(payload, ctx):
        one = ctx.step("fetch", counted(calls, "fetch", {"doc": "text"}))

        def summarise():
            ctx.charge(0.02, "model A")
            return counted(calls, "summarise", "short")()
        two = ctx.step("summarise", summarise)

        def review():
            ctx.charge(0.03, "model B")
            counted(calls, "review")()
            if runs(calls).count("review") == 1:  # its first run ever fails
                raise RuntimeError("the second model timed out")
            return "fine"
        three = ctx.step("review", review)
        return {"fetch": one, "summary": two, "review": three}
    reg.register("three", three, backoff=0, max_cost=1_000_000)
    reg.register("three.once", three, max_attempts=1, max_cost=1_000_000)

    def twice(payload, ctx):
        ctx.step("a", lambda: 1)
        ctx.step("a", lambda: 2)
    reg.register("twice", twice)
    reg.register("not.json", lambda p, ctx: ctx.step("s", lambda: {1, 2}))
    reg.register("many", lambda p, ctx: [ctx.step(f"s{i}", lambda: i) for i in range(p["n"])])
    reg.register("big", lambda p, ctx: [ctx.step(f"s{i}", lambda: "x" * 400_000) for i in range(3)])

    def sleeper(payload, ctx):
        before = ctx.step("before", counted(calls, "before"))
        ctx.sleep_for(payload["seconds"])
        return {"before": before, "after": ctx.step("after", counted(calls, "after"))}
    reg.register("sleeper", sleeper)

    def approval(payload, ctx):
        ctx.step("draft", counted(calls, "draft"))
        try:
            answer = ctx.wait_for_event("approved", match={"doc": payload["doc"]},
                                        timeout=payload.get("timeout"))
        except engine.EventTimeout:
            return {"approved": None}
        return {"approved": answer}
    reg.register("approval", approval)

    def until(payload, ctx):
        ctx.sleep_until(datetime.datetime.fromtimestamp(payload["at"], datetime.timezone.utc))
        return ctx.step("woke", lambda: time.time())
    reg.register("until", until)

    def swallow(payload, ctx):
        try:
            ctx.sleep_for(30)
        except Exception:  # a broad except must not swallow the suspension
            return "swallowed"
    reg.register("swallow", swallow)
    return reg


@pytest.fixture
def app(tmp_path, calls):
    application = make_app(tmp_path, API_KEYS=f"{KEY},{NEXT_KEY}", registry=registry(calls),
                           JOB_BACKOFF=0, **store_env(STORE["kind"]))
    yield application
    application.stop()


@pytest.fixture
def c(app):
    return Client(app)


def submit(c, workflow, payload=None, key=KEY, **body):
    r = c.post("/api/v1/intake", {"workflow": workflow, "payload": payload or {}, **body}, key=key)
    assert r.status == 202, r
    return r.json()["job_id"]


def status(c, job_id):
    return c.get(f"/api/v1/status/{job_id}", key=KEY).json()


def run_all(app):
    eng = app.services.engine
    for _ in range(50):  # bounded
        eng.tick()
        if not eng.run_next():
            return


def charges(app, job_id):
    return app.services.db.query("SELECT step, amount FROM ledger WHERE job_id = :j AND kind = 'charge'"
                                 " ORDER BY id", {"j": job_id})


# -- steps ---------------------------------------------------------------------------------------


def test_a_retry_resumes_after_the_last_finished_step_and_pays_once(app, c, calls):
    job_id = submit(c, "three", max_cost=0.3)
    run_all(app)
    job = status(c, job_id)
    assert job["status"] == "succeeded", job
    assert job["result"] == {"fetch": {"doc": "text"}, "summary": "short", "review": "fine"}
    # Steps one and two ran once; three ran on both attempts (it failed the first).
    assert runs(calls) == ["fetch", "summarise", "review", "review"]
    assert job["attempts"] == 2
    assert [(s["name"], s["state"], s["cost"]) for s in job["steps"]] == [
        ("fetch", "done", 0.0), ("summarise", "done", 0.02), ("review", "done", 0.03)]
    assert all(s["duration"] >= 0 and s["finished_at"] >= s["started_at"] for s in job["steps"])
    # Every charge is in the ledger once, in its step's name: review's
    # failed first attempt really spent its money, so it is there twice.
    assert [(r["step"], r["amount"]) for r in charges(app, job_id)] == [
        ("summarise", 20_000), ("review", 30_000), ("review", 30_000)]
    assert job["cost"]["spent"] == pytest.approx(0.08)
    by_step = c.get("/api/v1/usage?group_by=step", key=KEY).json()
    spend = {g["step"]: g["spend"] for g in by_step["groups"]}
    assert spend["summarise"] == pytest.approx(0.02) and spend["review"] == pytest.approx(0.06)


def test_a_manual_retry_resumes_after_the_recorded_steps(app, c, calls):
    job_id = submit(c, "three.once", max_cost=0.3)
    run_all(app)
    assert status(c, job_id)["status"] == "failed"  # review failed its only attempt
    assert c.post(f"/api/v1/jobs/{job_id}/retry", key=KEY).status == 200
    run_all(app)
    assert status(c, job_id)["status"] == "succeeded"
    assert runs(calls) == ["fetch", "summarise", "review", "review"]


@pytest.mark.parametrize("workflow, payload, message", [
    ("twice", {}, "step 'a' is used twice in one run"),
    ("not.json", {}, "step 's' returned something that is not JSON"),
    ("many", {"n": 1001}, "recorded 1000 steps, the most it may"),
    ("big", {}, "recorded step results passed 1048576 bytes"),
])
def test_hostile_steps_fail_the_job_clearly(app, c, workflow, payload, message):
    job_id = submit(c, workflow, payload)
    run_all(app)
    job = status(c, job_id)
    assert job["status"] == "failed" and message in job["error"]["message"], job["error"]
    assert job["attempts"] == 1  # permanent: no retry mends the workflow's code


# -- durable sleeps ------------------------------------------------------------------------------


def test_a_durable_sleep_frees_the_thread_and_resumes_after_it(app, c, calls):
    job_id = submit(c, "sleeper", {"seconds": 0.5})
    eng = app.services.engine
    assert eng.run_next()
    job = status(c, job_id)
    assert job["status"] == "waiting" and job["waiting_for"]["until"] > time.time()
    assert job["attempts"] == 0  # a sleep spends no attempt
    other = submit(c, "echo", {"x": 1})
    assert eng.run_next()  # the thread runs another job meanwhile
    assert status(c, other)["status"] == "succeeded"
    eng.tick()
    assert not eng.run_next() and status(c, job_id)["status"] == "waiting"  # not yet
    time.sleep(0.6)
    run_all(app)
    job = status(c, job_id)
    assert job["status"] == "succeeded" and job["result"] == {"before": "before", "after": "after"}
    assert runs(calls) == ["before", "after"]
    assert [s["kind"] for s in job["steps"]] == ["step", "sleep", "step"]


def test_sleep_until_a_datetime(app, c):
    at = time.time() + 0.4
    job_id = submit(c, "until", {"at": at})
    run_all(app)
    assert status(c, job_id)["waiting_for"] == {"until": pytest.approx(at)}
    time.sleep(0.5)
    run_all(app)
    job = status(c, job_id)
    assert job["status"] == "succeeded" and job["result"] >= at


def test_a_broad_except_cannot_swallow_a_durable_sleep(app, c):
    job_id = submit(c, "swallow")
    run_all(app)
    assert status(c, job_id)["status"] == "waiting"


def test_a_sleeping_job_can_be_canceled_and_counts_toward_max_jobs(tmp_path, calls):
    app = make_app(tmp_path, API_KEYS=KEY, registry=registry(calls), MAX_JOBS=1,
                   **store_env(STORE["kind"]))
    try:
        c = Client(app)
        job_id = submit(c, "sleeper", {"seconds": 60})
        run_all(app)
        assert status(c, job_id)["status"] == "waiting"
        r = c.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key=KEY)
        assert r.status == 503 and r.json()["error"] == "queue_full"
        assert c.post(f"/api/v1/jobs/{job_id}/cancel", key=KEY).json()["job"]["status"] == "canceled"
    finally:
        app.stop()


# -- events --------------------------------------------------------------------------------------


def event(c, name, data, key=KEY):
    r = c.post("/api/v1/events", {"name": name, "data": data}, key=key)
    assert r.status == 200, r
    return r.json()["resumed"]


def test_an_event_resumes_only_the_jobs_it_matches(app, c, calls):
    a = submit(c, "approval", {"doc": "a"})
    b = submit(c, "approval", {"doc": "b"})
    run_all(app)
    assert status(c, a)["waiting_for"] == {"event": "approved", "match": {"doc": "a"}, "until": None}
    assert event(c, "approved", {"doc": "c"}) == 0
    assert event(c, "rejected", {"doc": "a"}) == 0
    assert event(c, "approved", {"doc": "a", "by": "ada"}) == 1
    run_all(app)
    assert status(c, a)["result"] == {"approved": {"doc": "a", "by": "ada"}}
    assert status(c, b)["status"] == "waiting"
    assert runs(calls) == ["draft", "draft"]  # a's resumed run replayed its draft
    assert event(c, "approved", {"doc": "a"}) == 0  # a is done: nothing waits


def test_an_event_reaches_only_the_senders_jobs_unless_admin(tmp_path, calls):
    app = make_app(tmp_path, API_KEYS=KEY, registry=registry(calls), **store_env(STORE["kind"]))
    try:
        c = Client(app)
        keys = [c.post("/api/v1/keys", {"name": n, "role": "client"}, key=KEY).json()["key"]
                for n in ("alice", "bob")]
        mine = submit(c, "approval", {"doc": "x"}, key=keys[0])
        run_all(app)
        assert event(c, "approved", {"doc": "x"}, key=keys[1]) == 0  # bob's event: not alice's job
        assert status(c, mine)["status"] == "waiting"
        assert event(c, "approved", {"doc": "x"}, key=keys[0]) == 1
        run_all(app)
        theirs = submit(c, "approval", {"doc": "y"}, key=keys[1])
        run_all(app)
        assert event(c, "approved", {"doc": "y"}) == 1  # an admin key reaches every key's jobs
        run_all(app)
        assert status(c, theirs)["status"] == "succeeded"
    finally:
        app.stop()


def test_a_wait_for_an_event_times_out(app, c):
    job_id = submit(c, "approval", {"doc": "a", "timeout": 0.3})
    run_all(app)
    assert status(c, job_id)["status"] == "waiting"
    time.sleep(0.4)
    run_all(app)
    job = status(c, job_id)
    assert job["result"] == {"approved": None}
    assert [s["state"] for s in job["steps"]] == ["done", "timed_out"]
    assert event(c, "approved", {"doc": "a"}) == 0


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x", "data": []}, {"name": "x", "extra": 1}, {"name": "x" * 201},
])
def test_a_malformed_event_is_a_400(c, body):
    r = c.post("/api/v1/events", body, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed"


def test_a_deeply_nested_event_body_is_a_clear_400(c):
    deep = b'{"name": "x", "data": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    r = c.request("POST", "/api/v1/events", body=deep, key=KEY)
    assert r.status == 400 and r.json()["error"] == "invalid_json"


def test_an_event_needs_a_key(c):
    r = c.request("POST", "/api/v1/events", body=b'{"name": "x"}')
    assert r.status == 401


# -- external workers ----------------------------------------------------------------------------


def claim(c, lease=60):
    r = c.post("/api/v1/jobs/claim", {"workflows": ["ext.steps"], "lease_seconds": lease}, key=KEY)
    return r.json()["job"] if r.status == 200 else None


def record(c, job, name, result, cost=None, token=None):
    body = {"lease_token": token or job["lease_token"], "name": name, "result": result}
    if cost is not None:
        body["cost"] = cost
    return c.post(f"/api/v1/jobs/{job['job_id']}/steps", body, key=KEY)


def test_an_external_worker_s_steps_outlive_its_lease(app, c):
    job_id = submit(c, "ext.steps", max_cost=0.2)
    first = claim(c, lease=1)
    assert first["steps"] == {}
    r = record(c, first, "fetch", {"rows": 3}, cost=0.01)
    assert r.status == 200 and r.json()["recorded"] is True
    assert record(c, first, "summarise", "short", cost=0.02).json()["recorded"] is True
    again = record(c, first, "fetch", {"rows": 99}, cost=0.01)  # a repeat: kept as it was, not charged
    assert again.status == 200 and again.json()["recorded"] is False
    time.sleep(1.1)
    app.services.engine.tick()  # the lease ran out: queued again
    second = claim(c)
    assert second["job_id"] == job_id and second["attempt"] == 2
    assert second["steps"] == {"fetch": {"rows": 3}, "summarise": "short"}
    r = record(c, first, "late", 1)  # the first lease's token no longer counts
    assert r.status == 409 and r.json()["error"] == "lease_lost"
    assert [(x["step"], x["amount"]) for x in charges(app, job_id)] == [("fetch", 10_000), ("summarise", 20_000)]
    steps = status(c, job_id)["steps"]
    assert [(s["name"], s["cost"]) for s in steps] == [("fetch", 0.01), ("summarise", 0.02)]


@pytest.mark.parametrize("body, code", [
    ({"name": "x", "result": 1}, 400),                           # no token
    ({"lease_token": "t", "name": "", "result": 1}, 400),
    ({"lease_token": "t", "name": "x"}, 400),                    # no result
    ({"lease_token": "t", "name": "x", "result": 1, "cost": -1}, 400),
    ({"lease_token": "t", "name": "x", "result": 1, "more": 1}, 400),
])
def test_malformed_steps_are_refused(app, c, body, code):
    job_id = submit(c, "ext.steps")
    claim(c)
    r = c.post(f"/api/v1/jobs/{job_id}/steps", body, key=KEY)
    assert r.status == code and r.json()["error"] == "validation_failed"


def test_an_external_step_past_the_limits_is_a_422(app, c):
    job_id = submit(c, "ext.steps")
    job = claim(c)
    assert record(c, job, "one", "x" * 400_000).status == 200
    assert record(c, job, "two", "x" * 400_000).status == 200
    r = record(c, job, "three", "x" * 400_000)
    assert r.status == 422 and r.json()["error"] == "step_limit"
    assert [s["name"] for s in status(c, job_id)["steps"]] == ["one", "two"]


# -- llm.chat inside a step ----------------------------------------------------------------------


def test_llm_chat_is_a_function_a_step_can_call(app, c, monkeypatch):
    class Fake:
        prices = {"m": (decimal.Decimal(1), decimal.Decimal(2))}  # dollars per million tokens

        def complete(self, body):
            return {"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    app.services.engine.llm = Fake()
    reg = app.services.engine.registry
    reg.register("chain", lambda p, ctx: ctx.step("ask", llm.chat, ctx, "m",
                                                  [{"role": "user", "content": "hello"}], 600))
    job_id = submit(c, "chain", max_cost=0.1)
    run_all(app)
    job = status(c, job_id)
    assert job["status"] == "succeeded" and job["result"]["message"]["content"] == "hi"
    assert [r["step"] for r in charges(app, job_id)] == ["ask"]
    assert job["steps"][0]["cost"] == job["cost"]["spent"] > 0
    reg.register("bad.chat", lambda p, ctx: llm.chat(ctx, "m", "not a list"))
    job_id = submit(c, "bad.chat", max_cost=0.1)
    run_all(app)
    assert "llm.chat" in status(c, job_id)["error"]["message"]
    assert json.dumps(status(c, job_id))  # and the status stays JSON
