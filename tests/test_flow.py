"""Flow control through the API, in-process, on every job store: delayed
jobs, schedules, workflow limits, dependencies, search and bulk actions,
and the hostile input each of them refuses. (Real gunicorn with several
workers and hosts: test_flow_e2e.py.)"""

import datetime
import time

import pytest

import engine
import schedules
from support import NEXT_KEY, KEY, STORES, Client, FakeClock, make_app, store_env, wait_until

STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request):
    STORE["kind"] = request.param
    return request.param


def registry():
    reg = engine.registry.copy()
    reg.register("collect", lambda payload, ctx: ctx.parents)
    reg.register("boom", lambda payload, ctx: ctx.fail("boom"))
    return reg


@pytest.fixture
def app(tmp_path):
    application = make_app(tmp_path, API_KEYS=f"{KEY},{NEXT_KEY}", registry=registry(),
                           **store_env(STORE["kind"]))
    yield application
    application.stop()


@pytest.fixture
def c(app):
    return Client(app)


def intake(c, workflow="echo", payload=None, key=KEY, **body):
    return c.post("/api/v1/intake", {"workflow": workflow, "payload": payload or {}, **body}, key=key)


def status(c, job_id, key=KEY):
    return c.get(f"/api/v1/status/{job_id}", key=key).json()


def run_all(app):
    """Run every in-process job that is ready, and what they release."""
    eng = app.services.engine
    for _ in range(500):  # bounded: a test makes far fewer jobs
        eng.tick()
        if not eng.run_next():
            return


def iso(t):
    """RFC 3339 in UTC, spelt with Z (a "+" in a query string would mean a space)."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- delayed jobs ------------------------------------------------------------------------------


def test_a_delayed_job_is_scheduled_until_due_then_runs(app, c):
    r = intake(c, delay=0.4)
    assert r.status == 202 and r.json()["status"] == "scheduled"
    job_id = r.json()["job_id"]
    seen = status(c, job_id)
    assert seen["status"] == "scheduled" and seen["run_at"] > time.time()
    run_all(app)
    assert status(c, job_id)["status"] == "scheduled"
    time.sleep(0.45)
    run_all(app)
    assert status(c, job_id)["status"] == "succeeded"


def test_run_at_in_the_past_runs_now_and_a_far_future_one_is_refused(app, c):
    past = intake(c, run_at=iso(time.time() - 3600))
    assert past.status == 202 and past.json()["status"] == "queued"
    assert intake(c, run_at=iso(time.time() + 2 * 365 * 86400)).status == 400
    for bad in ("tomorrow", "2026-13-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01"):
        r = intake(c, run_at=bad)
        assert r.status == 400 and r.json()["field"] == "run_at", bad
    both = intake(c, run_at=iso(time.time() + 60), delay=5)
    assert both.status == 400 and "not both" in both.json()["message"]
    assert intake(c, delay=-1).status == 400 and intake(c, delay=31_536_001).status == 400


def test_a_scheduled_job_can_be_canceled_and_releases_its_reservation(app, c):
    job_id = intake(c, "ext.w", delay=600, max_cost=0.3).json()["job_id"]
    assert app.services.ledger.used_today() == 300_000
    r = c.post(f"/api/v1/jobs/{job_id}/cancel", key=KEY)
    assert r.status == 200 and r.json()["job"]["status"] == "canceled"
    assert app.services.ledger.used_today() == 0


def test_a_scheduled_job_counts_towards_max_jobs(tmp_path):
    app = make_app(tmp_path, API_KEYS=KEY, MAX_JOBS=2, **store_env(STORE["kind"]))
    try:
        c = Client(app)
        assert intake(c, delay=600).status == 202 and intake(c, delay=600).status == 202
        assert intake(c).status == 503
    finally:
        app.stop()


# -- dependencies --------------------------------------------------------------------------------


def test_fan_out_then_fan_in_sees_every_result(app, c):
    root = intake(c, payload={"n": 0}).json()["job_id"]
    middle = [intake(c, payload={"n": i}, depends_on=[root]).json()["job_id"] for i in range(1, 11)]
    assert all(status(c, j)["status"] == "waiting" for j in middle)
    last = intake(c, "collect", depends_on=middle)
    assert last.json()["status"] == "waiting"
    run_all(app)
    done = status(c, last.json()["job_id"])
    assert done["status"] == "succeeded"
    assert done["result"] == {j: {"n": i} for i, j in enumerate(middle, start=1)}


def test_a_failed_parent_cancels_its_children_and_releases_their_money(app, c):
    parent = intake(c, "boom").json()["job_id"]
    child = intake(c, "ext.w", depends_on=[parent], max_cost=0.25).json()["job_id"]
    grandchild = intake(c, "ext.w", depends_on=[child], max_cost=0.25).json()["job_id"]
    assert app.services.ledger.used_today() == 500_000
    run_all(app)
    for job_id in (child, grandchild):
        seen = status(c, job_id)
        assert seen["status"] == "canceled" and seen["error"]["code"] == "dependency_failed"
    assert app.services.ledger.used_today() == 0


def test_a_job_that_depends_on_finished_ones_starts_at_once(app, c):
    parent = intake(c).json()["job_id"]
    run_all(app)
    r = intake(c, "ext.w", depends_on=[parent])
    assert r.json()["status"] == "queued"
    claimed = c.post("/api/v1/jobs/claim", {"workflows": ["ext.w"]}, key=KEY).json()["job"]
    assert claimed["parents"] == {parent: {}}


@pytest.mark.parametrize("depends_on, why", [
    (["0" * 32], "unknown"),
    ([f"{i:032x}" for i in range(101)], "more than 100"),
    (["not-a-job-id"], "malformed"),
])
def test_depends_on_refuses_what_cannot_be_a_parent(c, depends_on, why):
    r = intake(c, depends_on=depends_on)
    assert r.status == 400 and r.json()["field"].startswith("depends_on"), why


def test_depends_on_refuses_another_keys_job(app, c):
    other = c.post("/api/v1/keys", {"name": "other", "role": "client"}, key=KEY).json()["key"]
    theirs = intake(c, key=other).json()["job_id"]
    mine = c.post("/api/v1/keys", {"name": "mine", "role": "client"}, key=KEY).json()["key"]
    r = intake(c, key=mine, depends_on=[theirs])
    assert r.status == 400 and r.json()["field"] == "depends_on"


# -- limits ---------------------------------------------------------------------------------------


def claim(c, workflow="ext.w"):
    r = c.post("/api/v1/jobs/claim", {"workflows": [workflow]}, key=KEY)
    return r.json()["job"] if r.status == 200 else None


def test_limits_are_set_by_admins_listed_and_removed_with_null(app, c):
    client = c.post("/api/v1/keys", {"name": "c", "role": "client"}, key=KEY).json()["key"]
    assert c.request("PUT", "/api/v1/workflows/ext.w/limits", json={"max_concurrency": 2},
                     key=client).status == 403
    r = c.request("PUT", "/api/v1/workflows/ext.w/limits", key=KEY,
                  json={"max_concurrency": 2, "rate": {"count": 5, "per": 2}})
    assert r.status == 200 and r.json()["limits"] == {
        "max_concurrency": 2, "max_concurrency_per_key": None, "rate": {"count": 5, "per": 2}}
    r = c.request("PUT", "/api/v1/workflows/ext.w/limits", json={"rate": None}, key=KEY)
    assert r.json()["limits"]["rate"] is None and r.json()["limits"]["max_concurrency"] == 2
    for _ in range(3):
        intake(c, "ext.w")
    claim(c)
    listed = {w["name"]: w for w in c.get("/api/v1/workflows", key=KEY).json()["workflows"]}
    assert listed["ext.w"]["counts"] == {"scheduled": 0, "queued": 2, "running": 1}
    assert listed["ext.w"]["limits"]["max_concurrency"] == 2 and listed["echo"]["in_process"]
    for bad in ({"max_concurrency": 0}, {"rate": {"count": 5}}, {"max_concurrency": "2"}, {},
                {"rate": {"count": 1, "per": 0}}, {"burst": 3}):
        assert c.request("PUT", "/api/v1/workflows/ext.w/limits", json=bad, key=KEY).status == 400, bad


def test_a_job_held_back_by_a_limit_holds_back_no_other_workflow(app, c):
    c.request("PUT", "/api/v1/workflows/ext.w/limits", json={"max_concurrency": 1}, key=KEY)
    first, second = (intake(c, "ext.w", priority="high").json()["job_id"] for _ in range(2))
    other = intake(c, "ext.v", priority="low").json()["job_id"]
    assert claim(c)["job_id"] == first and claim(c) is None
    assert claim(c, "ext.v")["job_id"] == other
    assert status(c, second)["status"] == "queued"


def test_max_concurrency_per_key_runs_one_per_customer(app, c):
    c.request("PUT", "/api/v1/workflows/ext.w/limits", json={"max_concurrency_per_key": 1}, key=KEY)
    for customer in ("a", "a", "b", "b", "c"):
        intake(c, "ext.w", concurrency_key=customer)
    taken = [claim(c) for _ in range(4)]
    assert [status(c, t["job_id"])["concurrency_key"] for t in taken if t] == ["a", "b", "c"]
    assert intake(c, "ext.w", concurrency_key="x" * 201).status == 400


# -- schedules ------------------------------------------------------------------------------------


def schedule(c, key=KEY, **body):
    return c.post("/api/v1/schedules", {"name": "tick", "workflow": "echo", "payload": {"n": 1},
                                        "every": 60, **body}, key=key)


def test_schedules_are_created_listed_changed_paused_and_deleted(app, c):
    made = schedule(c, cron="*/5 * * * *", every=None)
    assert made.status == 400  # every: null is not a number
    made = c.post("/api/v1/schedules", {"name": "nightly", "workflow": "echo", "payload": {},
                                        "cron": "30 2 * * mon-fri", "timezone": "Europe/Paris"},
                  key=KEY)
    assert made.status == 201 and made.json()["schedule"]["next_fire"] > time.time()
    assert schedule(c).status == 201
    assert schedule(c).status == 409
    names = [s["name"] for s in c.get("/api/v1/schedules", key=KEY).json()["schedules"]]
    assert names == ["nightly", "tick"]
    r = c.request("PATCH", "/api/v1/schedules/tick", json={"paused": True, "every": 5}, key=KEY)
    assert r.status == 200 and r.json()["schedule"]["paused"] and r.json()["schedule"]["every"] == 5
    r = c.request("PATCH", "/api/v1/schedules/nightly", json={"every": 30}, key=KEY)
    assert r.json()["schedule"]["cron"] is None and r.json()["schedule"]["timezone"] is None
    assert c.request("DELETE", "/api/v1/schedules/tick", key=KEY).status == 200
    assert c.get("/api/v1/schedules/tick", key=KEY).status == 404


def test_another_keys_schedules_are_invisible(app, c):
    schedule(c)
    other = c.post("/api/v1/keys", {"name": "o", "role": "client"}, key=KEY).json()["key"]
    assert c.get("/api/v1/schedules/tick", key=other).status == 404
    assert c.get("/api/v1/schedules", key=other).json()["schedules"] == []
    assert schedule(c, key=other).status == 201, "names are per key"


@pytest.mark.parametrize("body, field", [
    ({"cron": "61 * * * *", "every": None}, "cron"),
    ({"cron": "* * *"}, "cron"),
    ({"cron": "0 0 30 2 *"}, "cron"),
    ({"cron": "@fortnightly"}, "cron"),
    ({"every": 0}, "every"),
    ({"every": 1.5}, "every"),
    ({"timezone": "Mars/Olympus", "cron": "0 * * * *", "every": None}, "timezone"),
    ({"cron": "0 * * * *"}, "cron"),  # and every: both
    ({"name": "no spaces"}, "name"),
])
def test_malformed_schedules_are_refused_naming_the_field(c, body, field):
    body = {"name": "s", "workflow": "echo", "payload": {}, "every": 60, **body}
    body = {k: v for k, v in body.items() if v is not None}
    r = c.post("/api/v1/schedules", body, key=KEY)
    assert r.status == 400 and r.json()["field"] == field, r.json()


def test_each_fire_makes_one_job_and_missed_fires_collapse_into_one(app, c):
    schedule(c, every=10)
    services = app.services
    clock = FakeClock(time.time())
    ticking = [schedules.Scheduler(services.schedules, services.engine, services.key_store,
                                   services.log, clock=clock) for _ in range(3)]
    clock.advance(10.5)
    for scheduler in ticking:  # three processes find it due at once
        scheduler.tick()
    made = c.get("/api/v1/jobs?schedule=tick", key=KEY).json()["jobs"]
    assert len(made) == 1 and made[0]["schedule"] == "tick"
    clock.advance(95)  # down for nine and a half fires
    for scheduler in ticking:
        scheduler.tick()
    assert len(c.get("/api/v1/jobs?schedule=tick", key=KEY).json()["jobs"]) == 2
    view = c.get("/api/v1/schedules/tick", key=KEY).json()["schedule"]
    assert view["next_fire"] > clock() and view["last_fire"] <= clock()


def test_a_paused_schedule_makes_nothing(app, c):
    schedule(c, every=1, paused=True)
    clock = FakeClock(time.time() + 30)
    services = app.services
    schedules.Scheduler(services.schedules, services.engine, services.key_store, services.log,
                        clock=clock).tick()
    assert c.get("/api/v1/jobs?schedule=tick", key=KEY).json()["jobs"] == []


# -- search and bulk ------------------------------------------------------------------------------


def test_jobs_are_found_by_status_workflow_key_and_time(app, c):
    start = time.time()
    a = intake(c, "ext.a", concurrency_key="acme").json()["job_id"]
    b = intake(c, "ext.b").json()["job_id"]
    claim(c, "ext.b")
    ids = lambda q: [j["job_id"] for j in c.get("/api/v1/jobs?" + q, key=KEY).json()["jobs"]]  # noqa
    assert ids("status=queued,running") == [b, a]
    assert ids("status=running") == [b]
    assert ids("concurrency_key=acme") == [a]
    assert ids("workflow=ext.a") == [a]
    assert ids(f"created_after={iso(start - 1)}&created_before={iso(time.time() + 1)}") == [b, a]
    assert ids(f"created_after={iso(time.time() + 1)}") == []
    for bad in ("status=done", "status=", "created_after=yesterday", "workflow=a%20b", "limit=0"):
        assert c.get("/api/v1/jobs?" + bad, key=KEY).status == 400, bad


def test_bulk_cancel_and_retry_by_filter_touch_only_the_callers_jobs(app, c):
    other = c.post("/api/v1/keys", {"name": "o", "role": "client"}, key=KEY).json()["key"]
    mine = [intake(c, "ext.w").json()["job_id"] for _ in range(3)]
    theirs = intake(c, "ext.w", key=other).json()["job_id"]
    assert c.post("/api/v1/jobs/cancel", {}, key=KEY).status == 400  # a filter is required
    r = c.post("/api/v1/jobs/cancel", {"workflow": "ext.w"}, key=KEY)
    assert r.json() == {"matched": 3, "changed": 3}
    assert status(c, theirs, other)["status"] == "queued"
    r = c.post("/api/v1/jobs/retry", {"workflow": "ext.w"}, key=KEY)
    assert r.json() == {"matched": 3, "changed": 3}
    assert all(status(c, j)["status"] == "queued" for j in mine)
    again = c.post("/api/v1/jobs/retry", {"workflow": "ext.w"}, key=KEY)
    assert again.json() == {"matched": 0, "changed": 0}, "only failed and canceled jobs are retried"


def test_bulk_retry_reruns_each_failed_job_once(app, c):
    failed = [intake(c, "boom").json()["job_id"] for _ in range(4)]
    run_all(app)
    assert all(status(c, j)["status"] == "failed" for j in failed)
    assert c.post("/api/v1/jobs/retry", {"status": "failed"}, key=KEY).json() == \
        {"matched": 4, "changed": 4}
    assert wait_until(lambda: all(status(c, j)["status"] == "queued" for j in failed), 2)
    run_all(app)
    assert all(status(c, j)["status"] == "failed" and status(c, j)["attempts"] == 1 for j in failed)
