"""The job engine, driven step by step: a fake clock, no sleeps, no threads."""

import io
import os
import re
import threading
import time

import pytest

import engine
from support import STORES, KEY, Client, FakeClock, job_store, make_app, store_env, wait_until  # noqa: F401


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, level):
        return lambda msg, **fields: self.lines.append((level, msg, fields))

    def __getattr__(self, level):
        return self._add(level)


# Every test here runs once on each job store: the same suite, not a copy.
STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request, tmp_path):
    STORE.update(kind=request.param, path=tmp_path)
    return request.param


def new_store(clock):
    return job_store(STORE["kind"], STORE["path"], aging=60, clock=clock)


def app_for(tmp_path, **env):
    return make_app(tmp_path, **store_env(STORE["kind"]), **env)


def make_engine(registry=None, clock=None, **options):
    clock = clock or FakeClock()
    store = new_store(clock)
    eng = engine.Engine(store, registry or engine.Registry(), Log(), clock=clock,
                        rng=__import__("random").Random(7), **options)
    return eng, clock


def submit(eng, workflow="w", priority="normal", payload=None):
    job, _ = eng.submit(eng.new_job(workflow, payload or {}, priority, None, "k"))
    return job["job_id"]


def claim_order(eng, workflows=("w",)):
    order = []
    while True:
        job = eng.claim(list(workflows), 60)
        if job is None:
            return order
        order.append(job["job_id"])


# -- the queue ------------------------------------------------------------------------


def test_high_before_normal_before_low_and_fifo_within_a_priority():
    eng, clock = make_engine()
    ids = {}
    for name, priority in [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"),
                           ("h2", "high"), ("l2", "low")]:
        ids[submit(eng, priority=priority)] = name
        clock.advance(0.001)
    assert [ids[i] for i in claim_order(eng)] == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_a_waiting_low_job_overtakes_fresh_high_ones():
    eng, clock = make_engine()
    old_low = submit(eng, priority="low")
    clock.advance(121)  # two aging steps of 60 s: it now outranks any new high job
    fresh_high = submit(eng, priority="high")
    assert claim_order(eng) == [old_low, fresh_high]


def test_low_does_not_starve_under_a_steady_stream_of_high():
    eng, clock = make_engine()
    low = submit(eng, priority="low")
    served = []
    for _ in range(400):  # a new high job every second, one job served per second
        submit(eng, priority="high")
        clock.advance(1)
        served.append(eng.claim(["w"], 60)["job_id"])
        if served[-1] == low:
            break
    assert served[-1] == low and len(served) <= 125


def test_claim_only_takes_the_named_workflows():
    eng, _ = make_engine()
    a = submit(eng, workflow="a")
    assert eng.claim(["b"], 60) is None
    assert eng.claim(["b", "a"], 60)["job_id"] == a


# -- in-process runs ------------------------------------------------------------------------


def test_a_registered_workflow_runs_and_succeeds():
    reg = engine.Registry()
    reg.register("add", lambda p, ctx: {"sum": p["a"] + p["b"], "attempt": ctx.attempt})
    eng, _ = make_engine(reg)
    job_id = submit(eng, "add", payload={"a": 2, "b": 3})
    assert eng.run_next() is True
    job = eng.get(job_id)
    assert job["status"] == "succeeded" and job["result"] == {"sum": 5, "attempt": 1}
    assert job["attempts"] == 1 and job["finished_at"] is not None
    assert eng.run_next() is False


def test_pool_threads_waiting_to_claim_get_jobs_claimed_for_them_in_one_claim():
    together = threading.Barrier(4, timeout=10)  # passes only if all four run at once
    reg = engine.Registry()
    reg.register("w", lambda p, ctx: {"n": p["n"], "together": together.wait() >= 0})
    eng, _ = make_engine(reg, threads=4)
    ids = [submit(eng, payload={"n": n}) for n in range(4)]
    claims = []
    claim_many = eng.store.claim_many
    eng.store.claim_many = lambda *args: claims.append(len(args[3])) or claim_many(*args)
    ran = []
    with eng._claiming:  # one claiming: the other three wait their turn
        threads = [threading.Thread(target=lambda: ran.append(eng.run_next())) for _ in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: eng._wanting == 4, 10)
    for t in threads:
        t.join(15)
    assert ran == [True] * 4 and claims == [4]  # one claim, a job for each thread
    assert [eng.get(i)["result"] for i in ids] == [{"n": n, "together": True} for n in range(4)]
    assert [eng.get(i)["attempts"] for i in ids] == [1] * 4 and not eng._handed
    assert eng.run_next() is False


# The pool's fast runner (Engine.run_next): a thread whose jobs return quickly
# claims a batch at once and runs it, while the other threads stand aside.

class Batch:
    """An engine whose pool thread, fast so far, has claimed a batch: ``before``
    quick jobs, a slow one (running until ``gate`` is set), and ``after``
    quick jobs, not started yet."""

    def __init__(self, threads=2, before=0, after=3):
        self.gate, self.started, self.ran, self.claims, self.writes = (
            threading.Event(), threading.Event(), [], [], [])
        reg = engine.Registry()
        reg.register("slow", self._slow)
        reg.register("w", lambda p, ctx: self.ran.append(p["n"]) or {"n": p["n"]})
        self.eng, _ = make_engine(reg, threads=threads)
        self.first = [submit(self.eng, priority="high", payload={"n": -1 - n}) for n in range(before)]
        self.slow = submit(self.eng, "slow", priority="high")
        self.ids = [submit(self.eng, payload={"n": n}) for n in range(after)]
        store = self.eng.store
        claim_many, update_many = store.claim_many, store.update_many
        store.claim_many = lambda *args: self.claims.append(len(args[3])) or claim_many(*args)
        store.update_many = lambda updates: self.writes.append(len(updates)) or update_many(updates)
        self.thread = threading.Thread(target=self._runner)
        self.thread.start()
        assert self.started.wait(10)

    def _slow(self, payload, ctx):
        self.started.set()
        opened = self.gate.wait(10)
        time.sleep(engine.Engine.FAST * 5)  # slow however soon the gate opens
        return {"opened": opened}

    def _runner(self):
        self.eng._local.fast = True  # as after a job that returned within Engine.FAST
        while self.eng.run_next():  # its batch's jobs, then no more (the pool takes none)
            if not self.eng._handed:
                return

    def status(self, *ids):
        return [self.eng.get(i)["status"] for i in ids]

    def finish(self):
        self.gate.set()
        self.thread.join(10)


def test_a_fast_runner_claims_a_batch_and_the_pool_runs_what_a_slow_job_holds_up():
    batch = Batch(before=1)
    eng = batch.eng
    try:
        assert batch.claims == [engine.Engine.BATCH]  # one claim took them all
        assert batch.status(*batch.first, *batch.ids) == ["running"] * 4  # the first's end not stored yet
        eng.start()  # the pool's threads take over: they do not wait for the slow one
        assert wait_until(lambda: batch.status(*batch.first, *batch.ids) == ["succeeded"] * 4, 10)
        assert batch.status(batch.slow) == ["running"] and sorted(batch.ran) == [-1, 0, 1, 2]
        assert [eng.get(i)["attempts"] for i in batch.first + batch.ids] == [1] * 4
    finally:
        batch.finish()
        eng.stop(grace=5)
    assert batch.status(batch.slow) == ["succeeded"]


def test_a_fast_runners_jobs_are_ended_in_one_write_each_once():
    ended = []
    batch = Batch(before=3, after=0)
    batch.eng.on_finish.append(lambda job: ended.append(job["job_id"]))
    batch.finish()
    assert batch.writes == [3]  # the three quick ones, stored together
    assert batch.status(*batch.first, batch.slow) == ["succeeded"] * 4
    assert sorted(ended) == sorted(batch.first + [batch.slow])  # each end followed up once
    assert not batch.eng._contexts and not batch.eng._unwritten


def test_a_pool_of_one_thread_claims_one_job_at_a_time():
    # No other thread could take over what a slow job would hold up.
    batch = Batch(threads=1)
    batch.finish()
    assert batch.claims == [1] and batch.status(*batch.ids) == ["queued"] * 3


@pytest.mark.parametrize("why", ["stopping", "waited too long"])
def test_jobs_claimed_but_not_started_go_back_to_the_queue_uncounted(why):
    batch = Batch(before=1)
    eng = batch.eng
    try:
        if why == "stopping":
            eng.stopping()
        else:
            eng.HAND_BACK = 0  # each sweep puts back what waited longer than this
            eng.tick()
        for job in map(eng.get, batch.ids):
            assert (job["status"], job["attempts"], job["lease_token"], job["runner"]) \
                == ("queued", 0, None, None)
        # What ran before the slow job is stored as ended, not left running.
        assert batch.status(*batch.first, batch.slow) == ["succeeded", "running"]
        assert not eng._handed
    finally:
        batch.finish()
    assert batch.status(batch.slow) == ["succeeded"] and batch.ran == [-1]
    while eng.run_next():  # put back as they were: each runs once, its first attempt
        pass
    assert [(job["status"], job["attempts"]) for job in map(eng.get, batch.ids)] \
        == [("succeeded", 1)] * 3


def test_a_job_canceled_while_it_waits_in_a_batch_ends_canceled_without_running():
    batch = Batch(after=2)
    batch.eng.cancel(batch.ids[0])
    batch.finish()
    while batch.eng.run_next():
        pass
    assert batch.status(*batch.ids) == ["canceled", "succeeded"]
    assert batch.ran == [1] and not batch.eng._contexts


def test_a_job_canceled_after_it_ran_but_before_its_end_was_stored_ends_canceled():
    batch = Batch(before=1, after=0)
    batch.eng.cancel(batch.first[0])  # it has returned; its end waits for the batch's
    batch.finish()
    assert batch.status(batch.first[0], batch.slow) == ["canceled", "succeeded"]
    assert batch.ran == [-1] and not batch.eng._contexts



def test_report_many_applies_each_as_report_would_and_stores_plain_results_together():
    eng, _ = make_engine(engine.Registry())
    for n in range(5):
        submit(eng, "ext", payload={"n": n})
    plain, costly, failing, canceled, stale = eng.claim_many(["ext"], 60, max_jobs=5)
    eng.cancel(canceled["job_id"])
    writes = []
    update_many = eng.store.update_many
    eng.store.update_many = lambda updates: writes.append(len(updates)) or update_many(updates)
    done = eng.report_many([
        (plain["job_id"], plain["lease_token"], {"result": {"n": 0}}, None),
        (costly["job_id"], costly["lease_token"], {"result": 1}, 0.0),
        (failing["job_id"], failing["lease_token"], {"error": "no", "retryable": False}, None),
        (canceled["job_id"], canceled["lease_token"], {"result": 3}, None),
        (stale["job_id"], "0" * 32, {"result": 4}, None),
        (plain["job_id"], plain["lease_token"], {"result": "again"}, None),
    ])
    assert [d["status"] if isinstance(d, dict) else d.code for d in done] == \
        ["succeeded", "budget_exceeded", "failed", "canceled", "lease_lost", "lease_lost"]
    # (A cost goes through report, which charges it: this engine has no budget.)
    assert writes == [2]  # the plain result, and its repeat (refused), in one call
    assert eng.get(plain["job_id"])["result"] == {"n": 0} and eng.get(stale["job_id"])["status"] == "running"

def test_unregistered_workflows_wait_for_external_workers():
    eng, _ = make_engine(engine.Registry())
    job_id = submit(eng, "elsewhere")
    assert eng.run_next() is False
    assert eng.get(job_id)["status"] == "queued"


def test_exceptions_are_retried_with_exponential_backoff_then_fail():
    reg = engine.Registry()
    calls = []

    def flaky(payload, ctx):
        calls.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    reg.register("flaky", flaky, max_attempts=3, backoff=2.0)
    eng, clock = make_engine(reg)
    job_id = submit(eng, "flaky")
    delays = []
    for attempt in (1, 2):
        assert eng.run_next()
        job = eng.get(job_id)
        assert job["status"] == "queued" and job["error"]["attempts"] == attempt
        delay = job["not_before"] - clock()
        delays.append(delay)
        base = 2.0 * 2 ** (attempt - 1)
        assert base / 2 <= delay <= base  # equal jitter: between half and all of it
        assert eng.run_next() is False  # not before its time
        clock.advance(delay)
    assert eng.run_next()
    job = eng.get(job_id)
    assert job["status"] == "failed" and calls == [1, 2, 3]
    assert job["error"] == {"type": "RuntimeError", "message": "boom 3", "attempts": 3}
    assert "Traceback" not in str(job["error"])


def test_backoff_is_capped():
    eng, _ = make_engine(backoff=2.0, backoff_cap=10.0)
    assert all(5.0 <= eng.backoff_delay("w", 20) <= 10.0 for _ in range(50))


def test_permanent_failure_skips_retries():
    reg = engine.Registry()
    reg.register("strict", lambda p, ctx: ctx.fail("bad input, will never work"))
    eng, _ = make_engine(reg)
    job_id = submit(eng, "strict")
    eng.run_next()
    job = eng.get(job_id)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["type"] == "permanent_failure"


def test_a_result_that_is_not_json_fails_permanently():
    reg = engine.Registry()
    reg.register("odd", lambda p, ctx: {"when": object()})
    eng, _ = make_engine(reg)
    job_id = submit(eng, "odd")
    eng.run_next()
    assert eng.get(job_id)["error"]["type"] == "invalid_result"


def test_timeout_fails_the_job_sets_canceled_and_discards_the_late_result():
    reg = engine.Registry()
    started, release = threading.Event(), threading.Event()
    seen = {}

    def slow(payload, ctx):
        started.set()
        release.wait(10)
        seen["canceled"] = ctx.canceled
        return {"late": True}

    reg.register("slow", slow, timeout=5)
    eng, clock = make_engine(reg)
    job_id = submit(eng, "slow")
    runner = threading.Thread(target=eng.run_next)
    runner.start()
    assert started.wait(10)
    clock.advance(4.9)
    eng.tick()
    assert eng.get(job_id)["status"] == "running"
    clock.advance(0.2)
    eng.tick()
    job = eng.get(job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"
    release.set()
    runner.join(10)
    assert seen["canceled"] is True
    job = eng.get(job_id)
    assert job["status"] == "failed" and job["result"] is None


def test_a_local_attempt_renews_its_lease_while_it_runs():
    reg = engine.Registry()
    started, release = threading.Event(), threading.Event()
    reg.register("long", lambda p, ctx: started.set() or release.wait(10) and "done", timeout=100)
    eng, clock = make_engine(reg, local_lease=10)
    job_id = submit(eng, "long")
    runner = threading.Thread(target=eng.run_next)
    runner.start()
    assert started.wait(10)
    for _ in range(5):  # 40 s: four leases' worth, renewed on each sweep
        clock.advance(8)
        eng.tick()
        assert eng.get(job_id)["status"] == "running"
    release.set()
    runner.join(10)
    assert eng.get(job_id)["status"] == "succeeded"


def test_a_local_attempt_whose_process_died_comes_back_by_lease():
    reg = engine.Registry()
    reg.register("long", lambda p, ctx: "done", timeout=100)
    eng, clock = make_engine(reg, local_lease=10)
    job_id = submit(eng, "long")
    # The attempt starts in a process that then dies: nobody renews its lease.
    eng.store.claim(["long"], *eng._start_attempt("local", None, ["long"]))
    survivor = engine.Engine(eng.store, reg, Log(), clock=clock, local_lease=10)
    clock.advance(9)
    survivor.tick()
    assert survivor.get(job_id)["status"] == "running"
    clock.advance(2)
    survivor.tick()
    job = survivor.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 1
    assert job["error"]["type"] == "lease_expired"
    assert survivor.run_next() and survivor.get(job_id)["status"] == "succeeded"


def test_progress_is_reported():
    reg = engine.Registry()
    reg.register("steps", lambda p, ctx: ctx.progress(0.5, "half way") or "done")
    eng, _ = make_engine(reg)
    job_id = submit(eng, "steps")
    eng.run_next()
    assert eng.get(job_id)["progress"] == {"fraction": 1.0, "note": "half way"}


# -- cancellation and retry ------------------------------------------------------------------


def test_cancel_a_queued_job_at_once():
    eng, _ = make_engine()
    job_id = submit(eng)
    assert eng.cancel(job_id)["status"] == "canceled"
    assert eng.claim(["w"], 60) is None
    with pytest.raises(engine.JobError) as err:
        eng.cancel(job_id)
    assert err.value.code == "conflict"


def test_cancel_a_running_job_ends_it_when_the_handler_notices():
    reg = engine.Registry()
    started = threading.Event()
    reg.register("sleepy", lambda p, ctx: started.set() or ctx.sleep(30) or "finished")
    eng, _ = make_engine(reg)
    job_id = submit(eng, "sleepy")
    runner = threading.Thread(target=eng.run_next)
    runner.start()
    assert started.wait(10)
    assert eng.cancel(job_id)["cancel_requested"] is True
    runner.join(10)
    assert not runner.is_alive()
    assert eng.get(job_id)["status"] == "canceled"


def test_cancel_a_running_job_that_ignores_it_ends_at_its_timeout():
    eng, clock = make_engine()
    job_id = submit(eng)
    job = eng.claim(["w"], 30)
    eng.cancel(job_id)
    clock.advance(31)
    eng.tick()
    assert eng.get(job_id)["status"] == "canceled"
    with pytest.raises(engine.JobError):
        eng.report(job_id, job["lease_token"], result=1)


def test_retry_requeues_failed_and_canceled_jobs_only():
    eng, _ = make_engine()
    job_id = submit(eng)
    with pytest.raises(engine.JobError):
        eng.retry(job_id)  # still queued
    eng.cancel(job_id)
    job = eng.retry(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert eng.claim(["w"], 60)["job_id"] == job_id


# -- leases ---------------------------------------------------------------------------------


def test_lease_expiry_requeues_then_fails_after_the_last_attempt():
    eng, clock = make_engine(max_attempts=2)
    job_id = submit(eng)
    first = eng.claim(["w"], 10)
    clock.advance(11)
    eng.tick()
    job = eng.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 1
    assert job["error"]["type"] == "lease_expired"
    second = eng.claim(["w"], 10)
    assert second["attempts"] == 2
    # The first lease's token can no longer touch the job.
    with pytest.raises(engine.JobError) as err:
        eng.report(job_id, first["lease_token"], result="stale")
    assert err.value.code == "lease_lost"
    clock.advance(11)
    eng.tick()
    assert eng.get(job_id)["status"] == "failed"


def test_heartbeats_keep_a_lease_alive():
    eng, clock = make_engine()
    job_id = submit(eng)
    job = eng.claim(["w"], 10)
    for _ in range(5):
        clock.advance(8)
        eng.heartbeat(job_id, job["lease_token"], progress={"fraction": 0.2})
        eng.tick()
    assert eng.get(job_id)["status"] == "running"
    assert eng.report(job_id, job["lease_token"], result={"ok": 1})["status"] == "succeeded"


def test_a_worker_failure_is_retried_unless_not_retryable():
    eng, clock = make_engine()
    job_id = submit(eng)
    job = eng.claim(["w"], 10)
    assert eng.report(job_id, job["lease_token"], error="flaky upstream")["status"] == "queued"
    clock.advance(10)
    job = eng.claim(["w"], 10)
    done = eng.report(job_id, job["lease_token"], error="bad data", retryable=False)
    assert done["status"] == "failed" and done["error"]["message"] == "bad data"


# -- over HTTP --------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    app = app_for(tmp_path, API_KEYS=KEY)
    clock = FakeClock()
    app.services.engine.now = clock
    app.services.jobs.clock = clock
    app.clock = clock
    yield app
    app.stop()


def post(client, path, body=None, **kw):
    return client.post(path, body if body is not None else {}, key=KEY, **kw)


def test_seed_flow_ends_succeeded_with_demo_flow(api):
    c = Client(api)
    job_id = post(c, "/api/v1/intake", {"workflow": "demo.flow",
                                       "payload": {"title": "Hello world", "n": 3}}).json()["job_id"]
    assert api.services.engine.run_next()
    status = c.get(f"/api/v1/status/{job_id}").json()
    assert status["status"] == "succeeded" and status["attempts"] == 1
    assert status["result"]["keys"] == ["n", "title"]
    assert status["result"]["fields"]["title"] == {"type": "string", "json_bytes": 13,
                                                   "words": 2, "chars": 11}


def test_echo_and_sleep_payload_schema(api):
    c = Client(api)
    r = post(c, "/api/v1/intake", {"workflow": "sleep", "payload": {"seconds": 61}})
    assert r.status == 400 and r.json()["field"] == "payload/seconds"
    job_id = post(c, "/api/v1/intake", {"workflow": "echo", "payload": {"x": [1]}}).json()["job_id"]
    api.services.engine.run_next()
    assert c.get(f"/api/v1/status/{job_id}").json()["result"] == {"x": [1]}


def test_external_worker_protocol(api):
    c = Client(api)
    assert post(c, "/api/v1/jobs/claim", {"workflows": ["ext"]}).status == 204
    job_id = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {"q": 1}}).json()["job_id"]
    r = post(c, "/api/v1/jobs/claim", {"workflows": ["ext"], "lease_seconds": 30})
    assert r.status == 200
    job = r.json()["job"]
    assert job["job_id"] == job_id and job["payload"] == {"q": 1} and job["attempt"] == 1
    assert job["lease_expires_at"] == pytest.approx(api.clock() + 30)
    token = job["lease_token"]
    assert c.get(f"/api/v1/status/{job_id}").json()["status"] == "running"
    r = post(c, f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token,
                                                    "progress": {"fraction": 0.5, "note": "half"}})
    assert r.status == 200 and r.json()["cancel_requested"] is False
    assert c.get(f"/api/v1/status/{job_id}").json()["progress"] == {"fraction": 0.5, "note": "half"}
    r = post(c, f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": "0" * 32})
    assert r.status == 409 and r.json()["error"] == "lease_lost"
    r = post(c, f"/api/v1/jobs/{job_id}/complete", {"lease_token": token, "result": {"a": 42}})
    assert r.status == 200 and r.json()["job"]["status"] == "succeeded"
    r = post(c, f"/api/v1/jobs/{job_id}/complete", {"lease_token": token, "result": {"a": 43}})
    assert r.status == 409 and r.json()["error"] == "lease_lost"
    assert c.get(f"/api/v1/status/{job_id}").json()["result"] == {"a": 42}
    r = post(c, f"/api/v1/jobs/{'0' * 32}/complete", {"lease_token": token, "result": 1})
    assert r.status == 404


def test_worker_protocol_errors(api):
    c = Client(api)
    job_id = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {}}).json()["job_id"]
    for body in ({}, {"workflows": []}, {"workflows": "ext"}, {"workflows": ["ext"], "lease_seconds": 0},
                 {"workflows": ["ext"], "lease_seconds": 3601}, {"workflows": ["ext", "ext"]}):
        assert post(c, "/api/v1/jobs/claim", body).json()["error"] == "validation_failed", body
    token = post(c, "/api/v1/jobs/claim", {"workflows": ["ext"]}).json()["job"]["lease_token"]
    r = post(c, f"/api/v1/jobs/{job_id}/fail", {"lease_token": token})
    assert r.status == 400 and r.json()["field"] == "error"
    r = post(c, f"/api/v1/jobs/{job_id}/fail", {"lease_token": token, "error": "nope",
                                               "retryable": False})
    assert r.json()["job"]["status"] == "failed"
    assert c.post("/api/v1/jobs/claim", {"workflows": ["ext"]}).status == 401


def test_cancel_and_retry_endpoints(api):
    c = Client(api)
    job_id = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {}}).json()["job_id"]
    r = post(c, f"/api/v1/jobs/{job_id}/cancel")
    assert r.status == 200 and r.json()["job"]["status"] == "canceled"
    r = post(c, f"/api/v1/jobs/{job_id}/cancel")
    assert r.status == 409 and r.json()["error"] == "conflict"
    r = post(c, f"/api/v1/jobs/{job_id}/retry")
    assert r.status == 200 and r.json()["job"]["status"] == "queued"
    assert post(c, f"/api/v1/jobs/{job_id}/retry").status == 409
    assert post(c, f"/api/v1/jobs/{'a' * 32}/cancel").status == 404
    assert post(c, "/api/v1/jobs/not-an-id/retry").status == 404


def test_cancel_running_external_job_is_reported_on_heartbeat(api):
    c = Client(api)
    job_id = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {}}).json()["job_id"]
    token = post(c, "/api/v1/jobs/claim", {"workflows": ["ext"]}).json()["job"]["lease_token"]
    assert post(c, f"/api/v1/jobs/{job_id}/cancel").json()["job"]["status"] == "running"
    assert post(c, f"/api/v1/jobs/{job_id}/heartbeat", {"lease_token": token}).json()["cancel_requested"]
    r = post(c, f"/api/v1/jobs/{job_id}/complete", {"lease_token": token, "result": 1})
    assert r.json()["job"]["status"] == "canceled"


# -- idempotency ------------------------------------------------------------------------------


def test_idempotent_replay_and_mismatch(api):
    c = Client(api)
    body = {"workflow": "ext", "payload": {"n": 1}}
    first = post(c, "/api/v1/intake", body, headers={"Idempotency-Key": "order-42"})
    again = post(c, "/api/v1/intake", {"payload": {"n": 1}, "workflow": "ext"},
                 headers={"Idempotency-Key": "order-42"})
    assert first.status == again.status == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    r = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {"n": 2}},
             headers={"Idempotency-Key": "order-42"})
    assert r.status == 422 and r.json()["error"] == "idempotency_key_reused"
    assert len(api.services.jobs) == 1
    api.clock.advance(86_401)  # a day later the key is free again
    assert post(c, "/api/v1/intake", body, headers={"Idempotency-Key": "order-42"}).json()[
        "job_id"] != first.json()["job_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\xe9", "tab\there"])
def test_bad_idempotency_keys_are_refused(api, key):
    r = post(Client(api), "/api/v1/intake", {"workflow": "ext", "payload": {}},
             headers={"Idempotency-Key": key})
    assert r.status == 400 and r.json()["error"] == "invalid_idempotency_key"


def test_idempotency_is_scoped_to_the_api_key(tmp_path):
    app = app_for(tmp_path, API_KEYS=f"{KEY},other-key-0123456789abcdef")
    c = Client(app)
    body = {"workflow": "ext", "payload": {}}
    a = c.post("/api/v1/intake", body, key=KEY, headers={"Idempotency-Key": "k1"}).json()
    b = c.post("/api/v1/intake", body, key="other-key-0123456789abcdef",
               headers={"Idempotency-Key": "k1"}).json()
    assert a["job_id"] != b["job_id"]
    app.stop()


def test_concurrent_identical_requests_make_one_job(api):
    c = Client(api)
    barrier = threading.Barrier(20)
    ids, statuses = [], []

    def go():
        barrier.wait()
        r = post(c, "/api/v1/intake", {"workflow": "ext", "payload": {"v": 1}},
                 headers={"Idempotency-Key": "race"})
        statuses.append(r.status)
        ids.append(r.json()["job_id"])

    threads = [threading.Thread(target=go) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [202] * 20 and len(set(ids)) == 1 and len(api.services.jobs) == 1


# -- listing ----------------------------------------------------------------------------------


def test_listing_is_newest_first_paginated_and_per_key(tmp_path):
    other = "other-key-0123456789abcdef"
    app = app_for(tmp_path, API_KEYS=f"{KEY},{other}")
    c = Client(app)
    mine = [c.post("/api/v1/intake", {"workflow": "ext" if i % 2 else "w", "payload": {}},
                   key=KEY).json()["job_id"] for i in range(7)]
    c.post("/api/v1/intake", {"workflow": "ext", "payload": {}}, key=other)
    seen, cursor = [], None
    while True:
        r = c.get("/api/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else ""), key=KEY)
        assert r.status == 200
        seen += [j["job_id"] for j in r.json()["jobs"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == mine[::-1]
    r = c.get("/api/v1/jobs?workflow=ext", key=KEY).json()
    assert [j["job_id"] for j in r["jobs"]] == [mine[5], mine[3], mine[1]]
    assert c.get("/api/v1/jobs?status=running", key=KEY).json() == {"jobs": [], "next_cursor": None}
    assert len(c.get("/api/v1/jobs", key=other).json()["jobs"]) == 1
    for bad in ("limit=0", "limit=101", "limit=x", "status=done", "cursor=%%%", "cursor=YWJj"):
        assert c.get(f"/api/v1/jobs?{bad}", key=KEY).status == 400, bad
    assert c.get("/api/v1/jobs").status == 401
    app.stop()


def test_metrics_and_ops_health_reflect_the_engine(api):
    c = Client(api)
    for priority in ("high", "high", "low"):
        post(c, "/api/v1/intake", {"workflow": "ext", "payload": {}, "priority": priority})
    job_id = post(c, "/api/v1/intake", {"workflow": "echo", "payload": {}}).json()["job_id"]
    api.services.engine.run_next()
    assert c.get(f"/api/v1/status/{job_id}").json()["status"] == "succeeded"
    metrics = c.get("/public/metrics").json()
    assert metrics["queue_depth"] == {"high": 2, "normal": 0, "low": 1}
    assert metrics["running"] == 0 and metrics["finished_today"] == 1 and metrics["jobs_today"] == 4
    ops = c.get("/api/v1/ops/health", key=KEY).json()
    assert ops["jobs"]["succeeded"] == 1 and ops["queue_depth"]["high"] == 2
    assert {"echo", "sleep", "demo.flow"} <= set(ops["workflows"])


def test_operator_workflow_modules_are_imported(tmp_path, monkeypatch):
    (tmp_path / "my_flows.py").write_text(
        "import engine\n"
        "@engine.workflow('my.double')\n"
        "def double(payload, ctx):\n"
        "    return payload['n'] * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_for(tmp_path, LEVQOR_WORKFLOWS="my_flows")
    c = Client(app)
    job_id = c.post("/api/v1/intake", {"workflow": "my.double", "payload": {"n": 21}}).json()["job_id"]
    app.services.engine.run_next()
    assert c.get(f"/api/v1/status/{job_id}").json()["result"] == 42
    app.stop()


def test_unimportable_workflow_module_refuses_to_start(tmp_path):
    import levqor
    with pytest.raises(levqor.ConfigError, match="LEVQOR_WORKFLOWS"):
        app_for(tmp_path, LEVQOR_WORKFLOWS="no_such_module_anywhere")


def test_pool_threads_run_jobs_and_stop_cleanly(tmp_path):
    log = io.StringIO()
    app = app_for(tmp_path, log=log, WORKER_THREADS=2)
    c = Client(app)
    ids = [c.post("/api/v1/intake", {"workflow": "echo", "payload": {"i": i}}).json()["job_id"]
           for i in range(10)]
    wait_until(lambda: all(c.get(f"/api/v1/status/{i}").json()["status"] == "succeeded" for i in ids),
               10, 0.02)
    assert all(c.get(f"/api/v1/status/{i}").json()["result"] == {"i": n} for n, i in enumerate(ids))
    app.stop(grace=5)
    assert "job engine stopped" in log.getvalue()


def test_a_cancel_made_through_another_process_stops_the_running_workflow():
    """The canceling process cannot reach the thread running the job; the
    running process's sweep passes the cancel on."""
    stopped = threading.Event()

    def long(payload, ctx):
        if ctx.sleep(10):
            stopped.set()
        return "finished"

    reg = engine.Registry()
    reg.register("long", long, timeout=100)
    eng, clock = make_engine(reg)
    other = engine.Engine(eng.store, reg, Log(), clock=clock)
    job_id = submit(eng, "long")
    runner = threading.Thread(target=eng.run_next)
    runner.start()
    assert wait_until(lambda: eng.get(job_id)["status"] == "running", 5)
    assert other.cancel(job_id)["cancel_requested"]
    eng.tick()
    runner.join(5)
    assert stopped.is_set() and eng.get(job_id)["status"] == "canceled"


def test_a_worker_thread_outlives_a_database_that_fails_between_jobs():
    """Between jobs the thread asks the store when to look again; a
    database that is away then must not end the thread."""
    eng, clock = make_engine(engine.Registry(), threads=1)
    fails = {"left": 3}
    real = eng.store.next_due

    def flaky():
        if fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("the database is unavailable")
        return real()

    eng.store.next_due = flaky
    eng.start()
    try:
        assert wait_until(lambda: fails["left"] == 0, 10)
        assert eng.running, "every pool thread is still alive"
    finally:
        eng.stop(grace=2)


def test_tokens_are_unique_across_threads_and_in_a_forked_child():
    # Tokens are cut from a buffer of random bytes: two threads never get
    # the same slice, and a child forked with part of the buffer unread
    # does not hand out what its parent will.
    engine.new_token()  # the parent holds a partly used buffer
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tokens, then out without cleanup
        os.close(read)
        os.write(write, " ".join(engine.new_token() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    made = []
    threads = [threading.Thread(target=lambda: made.extend(engine.new_token() for _ in range(2000)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parent = [engine.new_token() for _ in range(8)]
    assert len(child) == 8 and all(len(t) == 32 and int(t, 16) >= 0 for t in child + parent)
    assert not set(child) & set(parent + made)
    assert len(set(made)) == len(made) == 8000


def test_job_ids_are_32_hex_digits_that_sort_in_the_order_jobs_were_made():
    """The first 12 digits are the time in milliseconds (ids then go in at
    the end of a store's index); the other 20 are random, so ids made in
    the same millisecond still differ and none can be guessed from another."""
    eng, _ = make_engine(engine.Registry())
    ids = []
    for _ in range(3):
        ids += [eng.new_job("ext", {}, "normal", None, "k")["job_id"] for _ in range(500)]
        time.sleep(0.002)
    assert all(re.fullmatch(r"[0-9a-f]{32}", job_id) for job_id in ids)
    assert len(set(ids)) == len(ids)
    assert ids[0] < ids[500] < ids[1000]  # a later millisecond sorts later
    assert abs(int(ids[-1][:12], 16) / 1000 - time.time()) < 5
    assert len({job_id[12:] for job_id in ids}) == len(ids)  # the random part alone is unique


def test_news_of_another_processs_jobs_wakes_only_what_waits_for_their_workflow():
    """The store's watch names the workflows whose jobs another process
    queued (or ended): jobs for external workers wake the claims waiting
    for them, never this process's pool, which would look and find
    nothing (on an idle SQLite host, its threads looked about 200 times a
    second while the other process took intakes); a job of a workflow the
    pool runs wakes the pool."""
    reg = engine.Registry()
    reg.register("here", lambda payload, ctx: {"ok": True})
    eng, _ = make_engine(reg, threads=1)
    looks = []
    real_claim_many = eng.store.claim_many

    def claim_many(*args, **kwargs):
        if threading.current_thread().name.startswith("levqor-job"):
            looks.append(time.monotonic())
        return real_claim_many(*args, **kwargs)

    eng.store.claim_many = claim_many
    eng.start()
    try:
        assert wait_until(lambda: looks, 5)  # the pool's first look; the next is a second away
        time.sleep(0.1)  # and it waits again
        looks.clear()
        for _ in range(20):
            eng._heard("ext")
            eng._heard("ext", True)
        time.sleep(0.3)
        assert looks == []  # not one look for the external workers' jobs
        eng._heard("here")
        assert wait_until(lambda: looks, 0.5)

        out = {}
        waiting = threading.Thread(target=lambda: out.update(jobs=eng.claim_many(["ext"], 60, wait=10)))
        waiting.start()
        time.sleep(0.2)
        eng.store.add(eng.new_job("ext", {}, "normal", None, "k"))  # as another process does
        told = time.monotonic()
        eng._heard("ext")
        waiting.join(10)
        assert len(out["jobs"]) == 1
        assert time.monotonic() - told < engine.Engine.CLAIM_POLL / 2  # woken, not its next look
    finally:
        eng.stop()


def waiting_claim(eng, **options):
    """A claim for "ext" waiting in a thread: (thread, its answer's dict),
    once it waits."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(jobs=eng.claim_many(["ext"], 60, wait=10,
                                                                            **options)))
    thread.start()
    assert wait_until(lambda: eng._takers, 5)
    return thread, out


def test_a_job_queued_while_a_claim_waits_is_handed_to_it_claimed_in_its_intake():
    """No claim transaction after the intake: the job is stored claimed for
    the waiting claim, which answers with it as a claim would have."""
    eng, _ = make_engine(engine.Registry())
    thread, out = waiting_claim(eng)
    looks = []
    real_claim_many = eng.store.claim_many
    eng.store.claim_many = lambda *a, **k: looks.append(1) or real_claim_many(*a, **k)
    (job, created), = eng.submit_many([eng.new_job("ext", {"n": 1}, "normal", None, "k")],
                                      idempotency=[("k", "once", "body", 3600)])
    thread.join(5)
    handed, = out["jobs"]
    assert created and job["status"] == "running"
    assert handed["job_id"] == job["job_id"] and handed["attempts"] == 1 and handed["payload"] == {"n": 1}
    assert eng.get(job["job_id"])["lease_token"] == handed["lease_token"]
    assert looks == []  # taken in the intake, not by a claim after it
    assert eng.claim_many(["ext"], 60) == []
    # Its replay hands nothing: a claim waiting then goes on waiting, for the next new job.
    thread, out = waiting_claim(eng)
    (again, created), = eng.submit_many([eng.new_job("ext", {"n": 1}, "normal", None, "k")],
                                        idempotency=[("k", "once", "body", 3600)])
    assert not created and again["job_id"] == job["job_id"]
    time.sleep(0.2)
    assert thread.is_alive() and eng._takers
    fresh = submit(eng, "ext")
    thread.join(5)
    assert [j["job_id"] for j in out["jobs"]] == [fresh]


def test_a_job_stored_for_a_waiting_claim_whose_intake_then_fails_goes_to_that_claim():
    """A commit whose answer is lost (a dropped PostgreSQL connection): the
    intake fails, but the job is stored claimed for the waiting claim, which
    answers with it, not left running under a lease nobody holds."""
    eng, _ = make_engine(engine.Registry())
    thread, out = waiting_claim(eng)
    real_add_many = eng.store.add_many

    def add_many(*args, **kwargs):
        real_add_many(*args, **kwargs)
        raise ConnectionError("the connection dropped after COMMIT")

    eng.store.add_many = add_many
    job = eng.new_job("ext", {}, "normal", None, "k")
    with pytest.raises(ConnectionError):
        eng.submit(job)
    thread.join(5)
    assert [j["job_id"] for j in out["jobs"]] == [job["job_id"]]
    assert eng.get(job["job_id"])["lease_token"] == out["jobs"][0]["lease_token"]


def test_a_pick_that_fails_before_the_store_leaves_the_claim_waiting():
    """Nothing between the pick and the store can leave the claim marked
    picked (it would wait for its job forever)."""
    eng, _ = make_engine(engine.Registry())
    thread, out = waiting_claim(eng)
    real_start = eng._start_attempt
    eng._start_attempt = lambda *a, **k: (_ for _ in ()).throw(MemoryError())
    with pytest.raises(MemoryError):
        eng.submit(eng.new_job("ext", {}, "normal", None, "k"))
    eng._start_attempt = real_start
    job_id = submit(eng, "ext")  # the failed intake stored nothing
    thread.join(5)
    assert [j["job_id"] for j in out["jobs"]] == [job_id]


def test_a_claim_under_limits_or_whose_caller_hung_up_is_handed_nothing():
    """A job of a workflow with limits is queued, for the claims to count
    (the waiting one takes it so); and a claim whose caller has hung up is
    never handed one (its job would wait for its lease to run out)."""
    eng, _ = make_engine(engine.Registry())
    eng.set_limits("ext", {"max_concurrency": 1})
    thread, out = waiting_claim(eng)
    job_id = submit(eng, "ext")
    thread.join(5)
    assert [j["job_id"] for j in out["jobs"]] == [job_id]
    eng.set_limits("ext", None)
    hung_up = threading.Event()
    thread, out = waiting_claim(eng, gone=hung_up.is_set)
    hung_up.set()
    job_id = submit(eng, "ext")
    thread.join(5)
    assert out["jobs"] == [] and eng.get(job_id)["status"] == "queued"


def test_a_status_read_waits_for_an_end_after_one_read_of_the_job():
    """One read, then the wait (it read the job twice before): the read is
    taken after the count of ends it compares with, so an end between the
    two is never slept through."""
    eng, _ = make_engine(engine.Registry())
    job_id = submit(eng, "ext")
    claimed = eng.claim(["ext"], 60)
    out, reads = {}, []
    real_get = eng.store.get
    eng.store.get = lambda job_id: reads.append(1) or real_get(job_id)
    waiting = threading.Thread(target=lambda: out.update(job=eng.wait_for_end(job_id, 10)))
    waiting.start()
    time.sleep(0.2)
    assert len(reads) == 1
    eng.report(job_id, claimed["lease_token"], result={"n": 7})
    waiting.join(5)
    assert out["job"]["status"] == "succeeded" and out["job"]["result"] == {"n": 7}


def test_a_waiting_claim_hears_its_caller_hang_up_at_once_and_takes_nothing():
    """A worker that stops half-closes its waiting claim and waits for the
    answer: the claim must end within HANGUP_POLL, not at its next look
    for jobs (CLAIM_POLL, a second)."""
    eng, _ = make_engine(engine.Registry())
    hung_up = threading.Event()
    threading.Timer(0.2, hung_up.set).start()
    started = time.monotonic()
    assert eng.claim_many(["ext"], 60, max_jobs=5, wait=10, gone=hung_up.is_set) == []
    assert time.monotonic() - started < 0.2 + engine.Engine.CLAIM_POLL * 0.6
    submit(eng, "ext")
    assert len(eng.claim_many(["ext"], 60, max_jobs=5)) == 1  # it took nothing
