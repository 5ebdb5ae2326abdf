"""Flow control end to end, against real gunicorn: delayed jobs, recurring
schedules, workflow limits (concurrency, per key, rate), dependencies,
search and bulk actions, and some hostile input, each checked

- on SQLite (JOB_STORE=sqlite) with two worker processes on one host, and
- on PostgreSQL, with two hosts (two gunicorn masters) on one database.

Requests go to the hosts in turn, each on a fresh connection, so work
submitted through one process is run, claimed or canceled through another.
The in-process tests of the same features are in test_flow.py."""

import collections
import datetime
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest
import requests

from support import KEY, Server, postgres_url, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Every request comes from 127.0.0.1: the rate limits and budgets are out of the way.
SETTINGS = {"API_KEYS": KEY, "RATE_BURST": 100_000, "RATE_GLOBAL": 100_000, "RATE_READ": 100_000,
            "RATE_WORKER": 100_000, "MAX_COST_PER_DAY": 1_000_000, "WORKER_THREADS": 4}
FINAL = ("succeeded", "failed", "canceled")
LIMITS_SETTLE = 1.2  # seconds: every process rereads the limits at least once a second
# A job's started_at is stamped just before the claim that starts it, so it
# may read a few milliseconds before the end of the job whose slot it took.
STAMP_SLACK = 0.1


# ---------------------------------------------------------------------------
# The hosts under test, shared by the tests of one store
# ---------------------------------------------------------------------------


class Cluster:
    """The gunicorn masters of one store; each request goes to the next one."""

    def __init__(self, kind, servers):
        self.kind = kind
        self.servers = servers
        self._turn = itertools.count()

    def request(self, method, path, body=None, key=KEY, host=None):
        """One request on a new connection (so any worker process may take it),
        to ``host`` (an index) or else to the next host in turn."""
        index = next(self._turn) if host is None else host
        url = self.servers[index % len(self.servers)].url
        return requests.request(method, url + path, json=body, headers={"X-Api-Key": key},
                                timeout=10)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        servers = [Server(tmp, JOB_STORE="sqlite", WEB_CONCURRENCY=2, **SETTINGS)]
    else:
        url = postgres_url()
        servers = [Server(tmp, DATABASE_URL=url, WEB_CONCURRENCY=2, **SETTINGS),
                   Server(tmp, DATABASE_URL=url, WEB_CONCURRENCY=1, **SETTINGS)]
    try:
        for srv in servers:
            srv.start(timeout=30)
        yield Cluster(request.param, servers)
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture
def c(cluster):
    """The cluster, with no workflow limits left behind by the test."""
    yield cluster
    for workflow in ("sleep", "demo.flow"):
        cluster.request("PUT", f"/api/v1/workflows/{workflow}/limits",
                        {"max_concurrency": None, "max_concurrency_per_key": None, "rate": None})


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def iso(t):
    """RFC 3339 in UTC, spelt with Z."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def intake(c, workflow, payload=None, key=KEY, host=None, **fields):
    return c.post("/api/v1/intake", {"workflow": workflow, "payload": payload or {}, **fields},
                  key=key, host=host)


def submit(c, workflow, payload=None, **fields):
    """Submit a job; (its id, the status intake answered). Anything but 202 fails."""
    r = intake(c, workflow, payload, **fields)
    assert r.status_code == 202, r.text
    return r.json()["job_id"], r.json()["status"]


def status(c, job_id):
    r = c.get(f"/api/v1/status/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_finished(c, ids, seconds):
    """The status views of ``ids``, in order, once every one has ended;
    fails if any is still going after ``seconds``."""
    done = {}
    deadline = time.monotonic() + seconds
    while len(done) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in done:
                view = status(c, job_id)
                if view["status"] in FINAL:
                    done[job_id] = view
        time.sleep(0.1)
    left = {j: status(c, j)["status"] for j in ids if j not in done}
    assert not left, f"still going after {seconds} s: {left}"
    return [done[j] for j in ids]


def listed(c, **filters):
    """Every job GET /api/v1/jobs finds with ``filters``, page after page."""
    found, cursor = [], None
    for _ in range(50):  # bounded: far more pages than any test makes
        query = dict(filters, limit=100, **({"cursor": cursor} if cursor else {}))
        r = c.get("/api/v1/jobs?" + urlencode(query))
        assert r.status_code == 200, r.text
        found += r.json()["jobs"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("too many pages")


def set_limits(c, workflow, **limits):
    """Replace the workflow's limits (those not given: none), and wait until
    every process has read them."""
    body = {name: limits.get(name) for name in ("max_concurrency", "max_concurrency_per_key", "rate")}
    r = c.request("PUT", f"/api/v1/workflows/{workflow}/limits", body)
    assert r.status_code == 200, r.text
    time.sleep(LIMITS_SETTLE)


def claim(c, workflow, host=None):
    """The job an external worker is handed, or None."""
    r = c.post("/api/v1/jobs/claim", {"workflows": [workflow], "lease_seconds": 60}, host=host)
    assert r.status_code in (200, 204), r.text
    return r.json()["job"] if r.status_code == 200 else None


def claim_all(c, workflow, claimers=4):
    """Claim every queued job of ``workflow`` from several threads, on every
    host at once, until none is left; the claims made."""
    claims, lock = [], threading.Lock()

    def claimer(i):
        for _ in range(100):  # bounded: more than enough tries for any test here
            job = claim(c, workflow, host=i)
            if job is None:
                return
            with lock:
                claims.append(job)

    with ThreadPoolExecutor(claimers) as pool:
        list(pool.map(claimer, range(claimers)))
    return claims


def report(c, job, **outcome):
    """Complete (``result=``) or fail (``error=``, ``retryable=``) a claimed job."""
    action = "complete" if "result" in outcome else "fail"
    r = c.post(f"/api/v1/jobs/{job['job_id']}/{action}", {"lease_token": job["lease_token"], **outcome})
    assert r.status_code == 200, r.text
    return r.json()["job"]


def most_at_once(intervals, slack=0.0):
    """The most of the (start, end) intervals that hold one same instant,
    each shortened by ``slack`` at its start."""
    events = sorted([(start + slack, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:  # at one instant an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


class RunningSampler:
    """Samples a workflow's running count (GET /api/v1/workflows) from a
    thread of its own, from every host in turn, until stopped."""

    def __init__(self, c, workflow):
        self.c, self.workflow = c, workflow
        self.seen = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for _ in range(10_000):  # bounded, whatever happens to the test
            if self._stop.is_set():
                return
            r = self.c.get("/api/v1/workflows")
            counts = {w["name"]: w["counts"] for w in r.json()["workflows"]}
            self.seen.append(counts.get(self.workflow, {}).get("running", 0))
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


def intervals(views):
    return [(v["started_at"], v["finished_at"]) for v in views]


# ---------------------------------------------------------------------------
# Delayed jobs and schedules
# ---------------------------------------------------------------------------


def test_delayed_jobs_wait_for_their_time_and_past_ones_run_now(c):
    delayed, answered = submit(c, "echo", {"n": 1}, delay=1.5)
    assert answered == "scheduled"
    at, answered = submit(c, "echo", {"n": 2}, run_at=iso(time.time() + 2))
    assert answered == "scheduled"
    dropped, _ = submit(c, "echo", {"n": 3}, delay=1)
    past, answered = submit(c, "echo", {"n": 4}, run_at=iso(time.time() - 3600))
    assert answered == "queued"

    scheduled = {j["job_id"] for j in listed(c, status="scheduled")}
    assert {delayed, at, dropped} <= scheduled
    echo = {w["name"]: w for w in c.get("/api/v1/workflows").json()["workflows"]}["echo"]
    assert echo["counts"]["scheduled"] >= 3
    assert c.post(f"/api/v1/jobs/{dropped}/cancel").json()["job"]["status"] == "canceled"

    # The job whose time has passed runs at once, the others at their time.
    assert wait_finished(c, [past], 5)[0]["status"] == "succeeded"
    for view in wait_finished(c, [delayed, at], 10):
        assert view["status"] == "succeeded" and view["attempts"] == 1
        assert view["run_at"] <= view["started_at"] < view["run_at"] + 2, view
    time.sleep(0.3)
    view = status(c, dropped)
    assert view["status"] == "canceled" and view["started_at"] is None


def test_an_every_second_schedule_fires_once_per_fire_time(c):
    made = c.post("/api/v1/schedules", {"name": "each-second", "workflow": "echo",
                                        "payload": {"tick": True}, "every": 1}, host=0)
    assert made.status_code == 201, made.text
    created = made.json()["schedule"]["created_at"]
    try:
        listed_names = [s["name"] for s in c.get("/api/v1/schedules", host=1).json()["schedules"]]
        assert "each-second" in listed_names
        time.sleep(max(0.0, created + 6.5 - time.time()))
        paused = c.request("PATCH", "/api/v1/schedules/each-second", {"paused": True}, host=1)
        assert paused.status_code == 200 and paused.json()["schedule"]["paused"], paused.text
        time.sleep(1.0)  # a tick that found it due just before the pause makes its job
        jobs = sorted(listed(c, schedule="each-second"), key=lambda j: j["created_at"])
        assert 6 <= len(jobs) <= 7, [j["created_at"] - created for j in jobs]
        assert all(j["schedule"] == "each-second" and j["workflow"] == "echo" for j in jobs)
        # Fire times are created + 1, + 2, ...: the n-th job follows the n-th fire
        # within a second, so no fire was missed and none made two jobs.
        for n, job in enumerate(jobs, start=1):
            assert created + n <= job["created_at"] < created + n + 1, \
                [round(j["created_at"] - created, 3) for j in jobs]
        gaps = [b["created_at"] - a["created_at"] for a, b in zip(jobs, jobs[1:])]
        assert min(gaps) > 0.4, gaps
        for view in wait_finished(c, [j["job_id"] for j in jobs], 10):
            assert view["status"] == "succeeded" and view["result"] == {"tick": True}
        assert len(listed(c, schedule="each-second")) == len(jobs), "paused, it made no more"
    finally:
        c.request("DELETE", "/api/v1/schedules/each-second")


# ---------------------------------------------------------------------------
# Workflow limits
# ---------------------------------------------------------------------------


def test_max_concurrency_two_never_runs_more_than_two(c):
    set_limits(c, "sleep", max_concurrency=2)
    with RunningSampler(c, "sleep") as sampler:
        ids = [submit(c, "sleep", {"seconds": 0.5})[0] for _ in range(20)]
        views = wait_finished(c, ids, 30)
    assert all(v["status"] == "succeeded" for v in views)
    assert len(sampler.seen) > 50 and max(sampler.seen) == 2, collections.Counter(sampler.seen)
    assert most_at_once(intervals(views), STAMP_SLACK) == 2
    assert sum(v["finished_at"] - v["started_at"] for v in views) >= 20 * 0.5


def test_max_concurrency_per_key_runs_one_of_each_key_at_a_time(c):
    set_limits(c, "sleep", max_concurrency_per_key=1)
    with RunningSampler(c, "sleep") as sampler:
        ids = [submit(c, "sleep", {"seconds": 0.6}, concurrency_key=key)[0]
               for _ in range(4) for key in ("a", "b", "c")]
        views = wait_finished(c, ids, 30)
    assert all(v["status"] == "succeeded" for v in views)
    assert max(sampler.seen) == 3, collections.Counter(sampler.seen)
    assert most_at_once(intervals(views), STAMP_SLACK) == 3
    for key in ("a", "b", "c"):
        mine = [v for v in views if v["concurrency_key"] == key]
        assert len(mine) == 4 and most_at_once(intervals(mine), STAMP_SLACK) == 1, key
    found = listed(c, concurrency_key="b", workflow="sleep")
    assert {j["job_id"] for j in found} >= {v["job_id"] for v in views if v["concurrency_key"] == "b"}
    assert {j["concurrency_key"] for j in found} == {"b"}


def test_a_rate_of_five_per_two_seconds_holds_over_twenty_jobs(c):
    set_limits(c, "demo.flow", rate={"count": 5, "per": 2})
    ids = [submit(c, "demo.flow", {"i": i})[0] for i in range(20)]
    views = wait_finished(c, ids, 30)
    assert all(v["status"] == "succeeded" and v["attempts"] == 1 for v in views)
    starts = sorted(v["started_at"] for v in views)
    # No window of (nearly) two seconds holds six starts...
    crowded = [round(b - a, 3) for a, b in zip(starts, starts[5:]) if b - a < 2 - STAMP_SLACK]
    assert not crowded, [round(s - starts[0], 3) for s in starts]
    # ...and the rate is used: the first five start at once, and all in four windows or so.
    assert starts[4] - starts[0] < 1.5 and starts[-1] - starts[0] < 10, \
        [round(s - starts[0], 3) for s in starts]


def test_a_job_held_back_by_a_limit_holds_back_no_other_workflow(c):
    set_limits(c, "sleep", max_concurrency=1)
    sleeps = [submit(c, "sleep", {"seconds": 3})[0] for _ in range(3)]
    assert wait_until(lambda: any(status(c, j)["status"] == "running" for j in sleeps), 5, 0.1)
    started = time.time()
    echoes = [submit(c, "echo", {"i": i})[0] for i in range(10)]
    views = wait_finished(c, echoes, 3)
    assert all(v["status"] == "succeeded" for v in views)
    assert max(v["finished_at"] for v in views) < started + 2.5
    waiting = [status(c, j)["status"] for j in sleeps]
    assert sorted(waiting) == ["queued", "queued", "running"], waiting

    # Bulk cancel takes the two queued at once and flags the running one (which
    # ends canceled at the latest when its three seconds are up).
    r = c.post("/api/v1/jobs/cancel", {"workflow": "sleep", "status": "queued,running",
                                       "created_after": iso(started - 30)})
    assert r.status_code == 200 and r.json() == {"matched": 3, "changed": 3}, r.text
    views = wait_finished(c, sleeps, 6)
    assert [v["status"] for v in views] == ["canceled"] * 3
    assert sum(v["started_at"] is None for v in views) == 2


# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------


def test_fan_out_then_fan_in_hands_the_last_job_every_result(c):
    # The root waits a second, so every job below it is surely still waiting at intake.
    root, answered = submit(c, "echo", {"n": 0}, delay=1)
    assert answered == "scheduled"
    middle = []
    for i in range(1, 11):
        job_id, answered = submit(c, "echo", {"n": i}, depends_on=[root])
        assert answered == "waiting"
        middle.append(job_id)
    last, answered = submit(c, "ext.collect", {"fan": "in"}, depends_on=middle)
    assert answered == "waiting"
    assert claim(c, "ext.collect") is None, "not before all its parents have ended"

    assert wait_until(lambda: status(c, last)["status"] == "queued", 15, 0.1), status(c, last)
    for view in wait_finished(c, [root, *middle], 1):
        assert view["status"] == "succeeded"
    job = claim(c, "ext.collect")
    assert job["job_id"] == last and job["payload"] == {"fan": "in"}
    assert job["parents"] == {job_id: {"n": i} for i, job_id in enumerate(middle, start=1)}
    report(c, job, result={"total": sum(p["n"] for p in job["parents"].values())})
    view = status(c, last)
    assert view["status"] == "succeeded" and view["result"] == {"total": 55}
    assert view["depends_on"] == middle


def test_a_failed_parent_cancels_its_children_and_theirs(c):
    parent, _ = submit(c, "ext.parent", {})
    children = [submit(c, "echo", {"i": i}, depends_on=[parent])[0] for i in range(3)]
    external, _ = submit(c, "ext.child", {}, depends_on=[parent])
    grandchild, answered = submit(c, "echo", {}, depends_on=[external, children[0]])
    assert answered == "waiting"
    job = claim(c, "ext.parent")
    assert job["job_id"] == parent
    failed = report(c, job, error="the upstream is gone", retryable=False)
    assert failed["status"] == "failed"
    for view in wait_finished(c, [*children, external, grandchild], 10):
        assert view["status"] == "canceled" and view["started_at"] is None, view
        assert view["error"]["code"] == "dependency_failed", view
    assert claim(c, "ext.child") is None


# ---------------------------------------------------------------------------
# Bulk retry
# ---------------------------------------------------------------------------


def test_bulk_retry_reruns_each_failed_job_exactly_once(c):
    ids = {submit(c, "ext.bulk", {"i": i})[0] for i in range(8)}
    for job in claim_all(c, "ext.bulk"):
        report(c, job, error="broken", retryable=False)
    assert {j["job_id"] for j in listed(c, workflow="ext.bulk", status="failed")} == ids

    r = c.post("/api/v1/jobs/retry", {"status": "failed", "workflow": "ext.bulk"})
    assert r.status_code == 200 and r.json() == {"matched": 8, "changed": 8}, r.text
    assert c.post("/api/v1/jobs/retry", {"status": "failed", "workflow": "ext.bulk"}).json() == \
        {"matched": 0, "changed": 0}
    claims = claim_all(c, "ext.bulk")
    assert sorted(j["job_id"] for j in claims) == sorted(ids), "each job claimed exactly once"
    assert all(j["attempt"] == 1 for j in claims), "a retry starts with fresh attempts"

    # Again, with two bulk retries racing on different hosts (or processes).
    for job in claims:
        report(c, job, error="broken again", retryable=False)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda host: c.post("/api/v1/jobs/retry", {"workflow": "ext.bulk"},
                                                     host=host).json(), range(2)))
    assert sum(a["changed"] for a in answers) == 8, answers
    claims = claim_all(c, "ext.bulk")
    assert sorted(j["job_id"] for j in claims) == sorted(ids) and all(j["attempt"] == 1 for j in claims)
    for job in claims:
        report(c, job, result={"ok": True})
    for view in wait_finished(c, sorted(ids), 5):
        assert view["status"] == "succeeded" and view["attempts"] == 1


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------


def refused(r, status_code, field=None):
    assert r.status_code == status_code, r.text
    if field is not None:
        assert r.json()["field"].startswith(field), r.text
    return True


def test_hostile_flow_input_is_refused_through_the_server(c):
    assert refused(intake(c, "echo", run_at=iso(time.time() + 2 * 366 * 86_400)), 400, "run_at")
    assert refused(intake(c, "echo", run_at="tomorrow"), 400, "run_at")
    assert refused(intake(c, "echo", delay=-1), 400, "delay")
    assert refused(intake(c, "echo", depends_on=[f"{i:032x}" for i in range(101)]), 400, "depends_on")
    assert refused(intake(c, "echo", depends_on=["0" * 32]), 400, "depends_on")

    def schedule(**fields):
        return c.post("/api/v1/schedules", {"name": "bad", "workflow": "echo", "payload": {}, **fields})

    assert refused(schedule(cron="61 * * * *"), 400, "cron")
    assert refused(schedule(cron="* * *"), 400, "cron")
    assert refused(schedule(every=0), 400, "every")
    assert refused(schedule(cron="0 * * * *", every=60), 400, "cron")
    assert c.get("/api/v1/schedules/bad").status_code == 404

    made = c.post("/api/v1/keys", {"name": "flow-client", "role": "client"})
    assert made.status_code == 201, made.text
    client = made.json()["key"]
    r = c.request("PUT", "/api/v1/workflows/sleep/limits", {"max_concurrency": 1}, key=client)
    assert refused(r, 403)
    limits = {w["name"]: w["limits"] for w in c.get("/api/v1/workflows").json()["workflows"]}
    assert limits["sleep"]["max_concurrency"] is None, "the refused change was not made"
    assert refused(c.request("PUT", "/api/v1/workflows/sleep/limits", {"max_concurrency": 0}), 400)
    # Another key's job cannot be a parent, nor be found or bulk-retried by the client.
    theirs, _ = submit(c, "echo", {})
    assert refused(intake(c, "echo", key=client, depends_on=[theirs]), 400, "depends_on")
    assert c.post("/api/v1/jobs/retry", {"workflow": "echo"}, key=client).json() == \
        {"matched": 0, "changed": 0}
    assert c.get("/api/v1/jobs?workflow=echo", key=client).json()["jobs"] == []
