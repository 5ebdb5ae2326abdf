"""Batches and blocking claims through the API, in-process, on every job
store: POST /api/v1/intake/batch, claims of several jobs, claims that wait
for a job, and the next job taken with a worker's report; the hostile input
each refuses. (Real gunicorn across processes: test_e2e.py.)"""

import json
import threading
import time

import pytest

from support import KEY, STORES, Client, make_app, store_env, wait_until

STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request):
    STORE["kind"] = request.param
    return request.param


def start(tmp_path, **env):
    return make_app(tmp_path, API_KEYS=KEY, **{**store_env(STORE["kind"]), **env})


@pytest.fixture
def app(tmp_path):
    application = start(tmp_path)
    yield application
    application.stop()


@pytest.fixture
def c(app):
    return Client(app)


def job(workflow="ext.work", **body):
    return {"workflow": workflow, "payload": {"n": 1}, **body}


def batch(c, jobs, **kw):
    return c.post("/api/v1/intake/batch", {"jobs": jobs}, key=KEY, **kw)


def claim(c, **body):
    return c.post("/api/v1/jobs/claim", {"workflows": ["ext.work"], **body}, key=KEY)


def listed(c):
    return c.get("/api/v1/jobs?limit=100", key=KEY).json()["jobs"]


def audit_paths(app):
    app.services.recorder.flush()
    return [r["path"] for r in app.services.db.query("SELECT path FROM audit_log ORDER BY id")]


# -- batch intake -------------------------------------------------------------------------------


def test_a_batch_is_accepted_in_order_with_a_row_of_audit_per_job(app, c):
    r = batch(c, [job(priority="low"), job(delay=60), job("echo", payload={"x": 1})])
    assert r.status == 202, r
    jobs = r.json()["jobs"]
    assert [j["status"] for j in jobs] == ["queued", "scheduled", "queued"]
    for sent, got in zip(("low", "normal", "normal"), jobs):
        assert c.get(f"/api/v1/status/{got['job_id']}", key=KEY).json()["priority"] == sent
    assert audit_paths(app) == [f"/api/v1/intake/batch#{j['job_id']}" for j in jobs]
    assert app.services.engine.counts()["by_status"]["queued"] == 2
    # Counted as three jobs, in the day's figures and in the Prometheus counters.
    assert c.get("/public/metrics").json()["jobs_today"] == 3
    scrape = c.get("/metrics", key=KEY).body.decode()
    assert 'levqor_jobs_enqueued_total{workflow="ext.work"} 2' in scrape, scrape


@pytest.mark.parametrize("bad, field, code", [
    ({"workflow": "ext.work"}, "jobs/3/payload", "validation_failed"),
    (job(priority="urgent"), "jobs/3/priority", "validation_failed"),
    (job(workflow="bad\nname"), "jobs/3/workflow", "validation_failed"),
    (job(idempotency_key="k\n"), "jobs/3/idempotency_key", "validation_failed"),
    (job(callback_url="http://127.0.0.1/hook"), "jobs/3/callback_url", "validation_failed"),
    (job(run_at="2020-01-01T00:00:00Z", delay=1), "jobs/3/run_at", "validation_failed"),
    (job(depends_on=["f" * 32]), "jobs/3/depends_on", "validation_failed"),
    (job(max_cost=99), "jobs/3/max_cost", "cost_cap_exceeded"),
    ("not an object", "jobs/3", "validation_failed"),
])
def test_one_bad_job_refuses_the_whole_batch_and_names_it(app, c, bad, field, code):
    r = batch(c, [job(), job(), job(), bad, {"payload": {}}])
    assert r.status in (400, 422), r
    body = r.json()
    assert (body["error"], body["index"], body["field"]) == (code, 3, field)
    assert body["message"].startswith("jobs/3")
    assert listed(c) == []


@pytest.mark.parametrize("body", [
    {}, {"jobs": []}, {"jobs": {}}, {"jobs": [job()], "extra": 1}, [job()], "jobs",
    {"jobs": [job()] * 1001},
])
def test_a_malformed_batch_is_a_400(c, body):
    r = c.post("/api/v1/intake/batch", body, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed", r
    assert listed(c) == []


def test_a_batch_body_has_a_size_limit_of_its_own(tmp_path):
    app = start(tmp_path, MAX_CONTENT_LENGTH=2048, MAX_BATCH_CONTENT_LENGTH=65536)
    try:
        c = Client(app)
        jobs = [job(payload={"pad": "x" * 40}) for _ in range(200)]  # ~16 KB: past one intake's cap
        assert batch(c, jobs).status == 202
        r = batch(c, [job(payload={"pad": "x" * 1000}) for _ in range(100)])
        assert r.status == 413 and r.json()["error"] == "payload_too_large"
        assert c.post("/api/v1/intake", job(payload={"pad": "x" * 4000}), key=KEY).status == 413
    finally:
        app.stop()


def test_deeply_nested_or_invalid_json_is_a_clear_400(c):
    deep = b'{"jobs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    r = c.request("POST", "/api/v1/intake/batch", body=deep, key=KEY)
    assert r.status == 400 and r.json()["error"] == "invalid_json"
    r = c.request("POST", "/api/v1/intake/batch", body=b'{"jobs": [', key=KEY)
    assert r.status == 400 and r.json()["error"] == "invalid_json"


def test_idempotency_keys_replay_each_job_of_a_batch(c):
    first = batch(c, [job(idempotency_key="a"), job(idempotency_key="b"), job()]).json()["jobs"]
    again = batch(c, [job(idempotency_key="b"), job(idempotency_key="a"), job()]).json()["jobs"]
    assert again[0]["job_id"] == first[1]["job_id"] and again[1]["job_id"] == first[0]["job_id"]
    assert again[2]["job_id"] != first[2]["job_id"]  # no key: a new job
    assert len(listed(c)) == 4
    r = batch(c, [job(), job(payload={"other": 1}, idempotency_key="a")])
    assert r.status == 422 and r.json()["error"] == "idempotency_key_reused" and r.json()["index"] == 1
    r = batch(c, [job(idempotency_key="c"), job(idempotency_key="c")])
    assert r.status == 400 and r.json()["index"] == 1
    assert len(listed(c)) == 4  # neither refused batch left a job


def test_a_batch_with_a_key_of_its_own_is_made_once_and_replayed_whole(c):
    first = c.post("/api/v1/intake/batch", {"jobs": [job(), job()], "idempotency_key": "b-1"}, key=KEY)
    assert first.status == 202 and "idempotent-replayed" not in first.headers
    # The same batch again: its jobs, in order, answered as the first call was.
    again = c.post("/api/v1/intake/batch", {"idempotency_key": "b-1", "jobs": [job(), job()]}, key=KEY)
    assert again.status == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and len(listed(c)) == 2
    # The header names it as well (and may repeat the body's).
    header = batch(c, [job(), job()], headers={"Idempotency-Key": "b-1"})
    assert header.status == 202 and header.json() == first.json()
    both = c.post("/api/v1/intake/batch", {"jobs": [job(), job()], "idempotency_key": "b-1"}, key=KEY,
                  headers={"Idempotency-Key": "b-1"})
    assert both.json() == first.json() and len(listed(c)) == 2
    # Another body under the key is refused whole, and leaves nothing.
    r = c.post("/api/v1/intake/batch", {"jobs": [job(), job(), job()], "idempotency_key": "b-1"}, key=KEY)
    assert r.status == 422 and r.json()["error"] == "idempotency_key_reused" and "index" not in r.json()
    assert len(listed(c)) == 2


@pytest.mark.parametrize("body, headers, field", [
    ({"jobs": [job()], "idempotency_key": 7}, {}, "idempotency_key"),
    ({"jobs": [job()], "idempotency_key": ""}, {}, "idempotency_key"),
    ({"jobs": [job()], "idempotency_key": "k\n"}, {}, "idempotency_key"),
    ({"jobs": [job()], "idempotency_key": "x" * 256}, {}, "idempotency_key"),
    ({"jobs": [job()], "idempotency_key": "a"}, {"Idempotency-Key": "b"}, "idempotency_key"),
    ({"jobs": [job(), job(idempotency_key="j")], "idempotency_key": "a"}, {}, "jobs/1/idempotency_key"),
    ({"jobs": [job(), job(idempotency_key="j")]}, {"Idempotency-Key": "a"}, "jobs/1/idempotency_key"),
])
def test_a_bad_or_doubled_batch_key_is_a_400_and_makes_nothing(c, body, headers, field):
    r = c.post("/api/v1/intake/batch", body, key=KEY, headers=headers)
    assert r.status == 400 and r.json()["error"] == "validation_failed" and r.json()["field"] == field, r
    assert listed(c) == []


def test_replays_reserve_nothing_and_are_answered_when_the_budget_could_not_hold_them_again(tmp_path):
    app = start(tmp_path, MAX_COST_PER_DAY="1", MAX_COST_PER_JOB="0.3")
    try:
        c = Client(app)
        body = {"jobs": [job(max_cost=0.3), job(max_cost=0.3)], "idempotency_key": "paid"}
        first = c.post("/api/v1/intake/batch", body, key=KEY)
        one = c.post("/api/v1/intake", job(max_cost=0.3), key=KEY, headers={"Idempotency-Key": "one"})
        each = batch(c, [job(max_cost=0.05, idempotency_key="e")])
        assert (first.status, one.status, each.status) == (202, 202, 202)
        for _ in range(3):  # a retry whose answer was lost is answered, not refused with 429
            assert c.post("/api/v1/intake/batch", body, key=KEY).json() == first.json()
            assert c.post("/api/v1/intake", job(max_cost=0.3), key=KEY,
                          headers={"Idempotency-Key": "one"}).json() == one.json()
            assert batch(c, [job(max_cost=0.05, idempotency_key="e")]).json() == each.json()
        assert c.get("/api/v1/usage", key=KEY).json()["totals"]["reserved"] == pytest.approx(0.95)
        # Anything new past the budget is still refused, replays among it or not.
        r = batch(c, [job(max_cost=0.05, idempotency_key="e"), job(max_cost=0.3)])
        assert r.status == 429 and r.json()["error"] == "budget_exceeded"
        assert len(listed(c)) == 4
    finally:
        app.stop()


def test_a_batch_past_the_budget_reserves_nothing_and_stores_nothing(tmp_path):
    app = start(tmp_path, MAX_COST_PER_DAY="1", MAX_COST_PER_JOB="0.3")
    try:
        c = Client(app)
        r = batch(c, [job(max_cost=0.3) for _ in range(4)])  # 1.2 > 1: the fourth is refused
        assert r.status == 429 and r.json()["error"] == "budget_exceeded" and r.json()["index"] == 3
        assert listed(c) == []
        assert c.get("/api/v1/usage", key=KEY).json()["totals"]["reserved"] == 0
        r = batch(c, [job(max_cost=0.3) for _ in range(3)])
        assert r.status == 202
        assert c.get("/api/v1/usage", key=KEY).json()["totals"]["reserved"] == pytest.approx(0.9)
    finally:
        app.stop()


def test_a_batch_that_does_not_fit_the_queue_stores_nothing(tmp_path):
    app = start(tmp_path, MAX_JOBS=5)
    try:
        c = Client(app)
        assert batch(c, [job() for _ in range(3)]).status == 202
        r = batch(c, [job() for _ in range(3)])
        assert r.status == 503 and r.json()["error"] == "queue_full"
        assert len(listed(c)) == 3
        assert batch(c, [job() for _ in range(2)]).status == 202
    finally:
        app.stop()


def test_batched_in_process_jobs_all_run(app, c):
    r = batch(c, [job("echo", payload={"i": i}) for i in range(50)])
    eng = app.services.engine
    for _ in range(60):
        if not eng.run_next():
            break
    results = [c.get(f"/api/v1/status/{j['job_id']}", key=KEY).json() for j in r.json()["jobs"]]
    assert [res["result"] for res in results] == [{"i": i} for i in range(50)]


# -- claims of several jobs, and the next job with a report --------------------------------------


def test_a_claim_takes_up_to_max_jobs_in_queue_order(app, c):
    ids = [j["job_id"] for j in batch(c, [job(priority=p) for p in ("low", "high", "normal")]).json()["jobs"]]
    r = claim(c, max_jobs=2)
    assert r.status == 200
    got = r.json()["jobs"]
    assert [j["job_id"] for j in got] == [ids[1], ids[2]]
    assert len({j["lease_token"] for j in got}) == 2
    assert [j["job_id"] for j in claim(c, max_jobs=100).json()["jobs"]] == [ids[0]]
    assert claim(c, max_jobs=5).json() == {"jobs": []}
    assert claim(c).status == 204  # without max_jobs: the answer as before


def test_an_empty_claim_leaves_no_audit_row_and_a_taking_one_does(app, c):
    claim(c, max_jobs=10)
    claim(c)
    assert audit_paths(app) == []
    batch(c, [job()])
    audit_before = len(audit_paths(app))
    claim(c, max_jobs=10)
    assert audit_paths(app)[audit_before:] == ["/api/v1/jobs/claim"]


@pytest.mark.parametrize("body", [
    {"max_jobs": 0}, {"max_jobs": 101}, {"max_jobs": 1.5}, {"wait": -1}, {"wait": 31},
    {"wait": "1"}, {"max_jobs": None},
])
def test_claim_bounds_are_checked(c, body):
    r = claim(c, **body)
    assert r.status == 400 and r.json()["error"] == "validation_failed", r


def test_complete_with_claim_next_hands_over_the_next_job(c):
    ids = [j["job_id"] for j in batch(c, [job(), job()]).json()["jobs"]]
    first = claim(c).json()["job"]
    r = c.post(f"/api/v1/jobs/{first['job_id']}/complete",
               {"lease_token": first["lease_token"], "result": {"ok": 1},
                "claim_next": {"workflows": ["ext.work"], "lease_seconds": 30}}, key=KEY)
    assert r.status == 200
    assert r.json()["job"]["status"] == "succeeded"
    nxt = r.json()["next"]
    assert nxt["job_id"] == ids[1] and nxt["lease_expires_at"] > time.time() + 20
    r = c.post(f"/api/v1/jobs/{nxt['job_id']}/fail",
               {"lease_token": nxt["lease_token"], "error": "no", "retryable": False,
                "claim_next": {"workflows": ["ext.work"]}}, key=KEY)
    assert r.status == 200 and r.json()["job"]["status"] == "failed" and r.json()["next"] is None


def test_claim_next_is_refused_for_a_workflow_the_key_may_not_claim(app, c):
    worker = c.post("/api/v1/keys", {"name": "w", "role": "worker", "workflows": ["ext.*"]},
                    key=KEY).json()["key"]
    batch(c, [job()])
    first = c.post("/api/v1/jobs/claim", {"workflows": ["ext.work"]}, key=worker).json()["job"]
    r = c.post(f"/api/v1/jobs/{first['job_id']}/complete",
               {"lease_token": first["lease_token"], "result": 1,
                "claim_next": {"workflows": ["other"]}}, key=worker)
    assert r.status == 403
    assert c.get(f"/api/v1/status/{first['job_id']}", key=KEY).json()["status"] == "succeeded"


def test_a_stale_report_with_claim_next_claims_nothing(c):
    batch(c, [job(), job()])
    first = claim(c).json()["job"]
    r = c.post(f"/api/v1/jobs/{first['job_id']}/complete",
               {"lease_token": "0" * 32, "result": 1, "claim_next": {"workflows": ["ext.work"]}},
               key=KEY)
    assert r.status == 409
    assert len(claim(c, max_jobs=10).json()["jobs"]) == 1  # the other is still there


# -- several reports in one call ---------------------------------------------------------------


def report(c, reports, key=KEY, **body):
    return c.post("/api/v1/jobs/report", {"reports": reports, **body}, key=key)


def test_reports_apply_each_in_order_and_claim_the_next_jobs(app, c):
    batch(c, [job() for _ in range(5)])
    a, b, d = claim(c, max_jobs=3).json()["jobs"]
    r = report(c, [{"job_id": a["job_id"], "lease_token": a["lease_token"], "result": {"n": 1}, "cost": 0},
                   {"job_id": b["job_id"], "lease_token": b["lease_token"], "error": "no",
                    "retryable": False},
                   {"job_id": d["job_id"], "lease_token": d["lease_token"], "result": None}],
               claim_next={"workflows": ["ext.work"], "lease_seconds": 30, "max_jobs": 5})
    assert r.status == 200, r
    assert r.json()["reports"] == [{"job_id": a["job_id"], "status": "succeeded"},
                                   {"job_id": b["job_id"], "status": "failed"},
                                   {"job_id": d["job_id"], "status": "succeeded"}]
    assert c.get(f"/api/v1/status/{a['job_id']}", key=KEY).json()["result"] == {"n": 1}
    nxt = r.json()["next"]
    assert len(nxt) == 2 and all(j["lease_expires_at"] > time.time() + 20 for j in nxt)
    rows = audit_paths(app)[-4:]  # a row per report, and one for the claim that took jobs
    assert rows == [f"/api/v1/jobs/report#{j['job_id']}" for j in (a, b, d)] + ["/api/v1/jobs/report"]
    r = report(c, [{"job_id": j["job_id"], "lease_token": j["lease_token"], "result": 1} for j in nxt],
               claim_next={"workflows": ["ext.work"]})
    assert r.json()["next"] == [] and app.services.engine.counts()["by_status"]["succeeded"] == 4


def test_a_refused_report_leaves_the_others_applied(app, c):
    other = c.post("/api/v1/keys", {"name": "o", "role": "client"}, key=KEY).json()["key"]
    theirs = c.post("/api/v1/intake", job("ext.other"), key=other).json()["job_id"]  # not claimed
    batch(c, [job(), job()])
    a, b = claim(c, max_jobs=2).json()["jobs"]
    r = report(c, [{"job_id": a["job_id"], "lease_token": "0" * 32, "result": 1},   # not its lease
                   {"job_id": "f" * 32, "lease_token": "x", "result": 1},           # no such job
                   {"job_id": "../x", "lease_token": "x", "result": 1},             # not a job id
                   {"job_id": theirs, "lease_token": "x", "error": "e"},            # not its job
                   {"job_id": b["job_id"], "lease_token": b["lease_token"], "result": 2},
                   {"job_id": b["job_id"], "lease_token": b["lease_token"], "result": 3}])  # again
    assert r.status == 200, r
    assert [x.get("error") or x["status"] for x in r.json()["reports"]] == \
        ["lease_lost", "not_found", "not_found", "lease_lost", "succeeded", "lease_lost"]
    assert c.get(f"/api/v1/status/{a['job_id']}", key=KEY).json()["status"] == "running"
    assert c.get(f"/api/v1/status/{b['job_id']}", key=KEY).json()["result"] == 2
    assert c.get(f"/api/v1/status/{theirs}", key=other).json()["status"] == "queued"
    assert "next" not in r.json()


@pytest.mark.parametrize("reports, field", [
    ([], "reports"),
    ([{"job_id": "x", "lease_token": "t", "result": 1}] * 101, "reports"),
    ([{"job_id": "x", "lease_token": "t"}], "reports/0"),                                # neither
    ([{"job_id": "x", "lease_token": "t", "result": 1, "error": "e"}], "reports/0"),     # both
    ([{"job_id": "x", "lease_token": "t", "result": 1, "retryable": True}], "reports/0"),
    ([{"job_id": "x", "lease_token": "t", "error": ""}], "reports/0/error"),
    ([{"job_id": "x", "lease_token": "t", "result": 1, "extra": 1}], "reports/0/extra"),
    ([{"job_id": "x", "lease_token": "t", "result": 1, "cost": -1}], "reports/0/cost"),
    ("not a list", "reports"),
])
def test_malformed_reports_are_a_400_and_apply_nothing(app, c, reports, field):
    batch(c, [job()])
    first = claim(c).json()["job"]
    good = {"job_id": first["job_id"], "lease_token": first["lease_token"], "result": 1}
    sent = [good] + reports if isinstance(reports, list) and 0 < len(reports) <= 99 else reports
    r = report(c, sent)
    assert r.status == 400 and r.json()["error"] == "validation_failed"
    shifted = field.replace("reports/0", "reports/1") if sent is not reports else field
    assert r.json()["field"] == shifted, r.json()
    assert c.get(f"/api/v1/status/{first['job_id']}", key=KEY).json()["status"] == "running"


def test_reports_claiming_a_workflow_the_key_may_not_claim_apply_nothing(app, c):
    worker = c.post("/api/v1/keys", {"name": "w", "role": "worker", "workflows": ["ext.*"]},
                    key=KEY).json()["key"]
    batch(c, [job()])
    first = c.post("/api/v1/jobs/claim", {"workflows": ["ext.work"]}, key=worker).json()["job"]
    r = report(c, [{"job_id": first["job_id"], "lease_token": first["lease_token"], "result": 1}],
               key=worker, claim_next={"workflows": ["other"]})
    assert r.status == 403
    assert c.get(f"/api/v1/status/{first['job_id']}", key=KEY).json()["status"] == "running"


# -- claims that wait ----------------------------------------------------------------------------


def in_thread(call):
    """``call()`` on a thread of its own: (the thread, {"response", "took"} once it is done)."""
    out = {}

    def run():
        started = time.monotonic()
        out["response"] = call()
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def claim_in_thread(c, **body):
    return in_thread(lambda: claim(c, **body))


def test_a_waiting_claim_gets_a_job_queued_while_it_waits(app, c):
    thread, out = claim_in_thread(c, wait=20)
    time.sleep(0.2)
    assert thread.is_alive()  # nothing yet: it waits
    job_id = batch(c, [job()]).json()["jobs"][0]["job_id"]
    thread.join(15)
    assert out["response"].json()["job"]["job_id"] == job_id
    assert out["took"] < 15  # woken, not timed out


def test_a_waiting_claim_ends_empty_when_its_wait_is_over(c):
    thread, out = claim_in_thread(c, wait=0.3, max_jobs=5)
    thread.join(10)
    assert out["response"].json() == {"jobs": []} and out["took"] >= 0.3


@pytest.fixture
def one_waiting(tmp_path):
    """A service where one request may wait (CLAIM_WAITERS=1), and a claim
    already waiting there: (client, that claim's thread)."""
    application = start(tmp_path, CLAIM_WAITERS=1)
    c = Client(application)
    waiting, _ = claim_in_thread(c, wait=20)
    time.sleep(0.2)
    yield c, waiting
    application.stop()


def test_past_the_bound_of_waiting_claims_one_answers_at_once(one_waiting):
    c, waiting = one_waiting
    extra, out = claim_in_thread(c, wait=20)
    extra.join(10)
    assert out["response"].status == 204 and out["took"] < 10
    assert waiting.is_alive()
    batch(c, [job()])
    waiting.join(15)
    assert not waiting.is_alive()


def test_stopping_the_service_ends_a_waiting_claim(tmp_path):
    app = start(tmp_path)
    c = Client(app)
    thread, out = claim_in_thread(c, wait=25)
    # Waiting, not still on its way in (a loaded machine takes its time):
    # it holds one of the engine's slots for waiting requests.
    slots = app.services.engine._wait_slots
    assert wait_until(lambda: slots._value < slots._initial_value, 10)
    app.stop()
    thread.join(15)
    assert not thread.is_alive() and out["response"].status == 204


def test_a_waiting_claim_takes_a_job_whose_retry_backoff_ends(app, c):
    batch(c, [job()])
    first = claim(c).json()["job"]
    c.post(f"/api/v1/jobs/{first['job_id']}/fail", {"lease_token": first["lease_token"],
                                                     "error": "again"}, key=KEY)
    retry_in = c.get(f"/api/v1/status/{first['job_id']}", key=KEY).json()["error"]["retry_in"]
    thread, out = claim_in_thread(c, wait=retry_in + 10)
    thread.join(retry_in + 15)
    assert out["response"].json()["job"]["job_id"] == first["job_id"]
    assert out["took"] < retry_in + 5


# -- status reads that wait for the job's end ------------------------------------------------


def status_in_thread(c, job_id, wait):
    return in_thread(lambda: c.get(f"/api/v1/status/{job_id}?wait={wait}", key=KEY))


def test_a_waiting_status_read_answers_when_the_job_ends(app, c):
    job_id = batch(c, [job()]).json()["jobs"][0]["job_id"]
    thread, out = status_in_thread(c, job_id, 20)
    time.sleep(0.2)
    assert thread.is_alive()  # still queued: it waits
    taken = claim(c).json()["job"]
    time.sleep(0.1)
    assert thread.is_alive()  # running is not an end
    c.post(f"/api/v1/jobs/{job_id}/complete", {"lease_token": taken["lease_token"], "result": {"ok": 1}},
           key=KEY)
    thread.join(15)
    assert out["response"].status == 200 and out["response"].json()["status"] == "succeeded"
    assert out["took"] < 15  # woken, not timed out


def test_a_waiting_status_read_answers_as_the_job_is_when_its_wait_is_over(c):
    job_id = batch(c, [job()]).json()["jobs"][0]["job_id"]
    thread, out = status_in_thread(c, job_id, 1)
    thread.join(10)
    assert out["response"].json()["status"] == "queued" and out["took"] >= 1
    finished = c.post(f"/api/v1/jobs/{job_id}/cancel", key=KEY).json()["job"]["status"]
    thread, out = status_in_thread(c, job_id, 30)  # ended already: at once
    thread.join(10)
    assert out["response"].json()["status"] == finished == "canceled" and out["took"] < 10


@pytest.mark.parametrize("wait", ["abc", "31", "-1", "1.5", "", "1e1"])
def test_a_status_wait_out_of_bounds_is_a_400(c, wait):
    job_id = batch(c, [job()]).json()["jobs"][0]["job_id"]
    r = c.get(f"/api/v1/status/{job_id}?wait={wait}", key=KEY)
    assert r.status == 400 and r.json()["error"] == "invalid_query"


def test_a_status_wait_shares_the_bound_of_waiting_claims(one_waiting):
    c, waiting = one_waiting
    job_id = batch(c, [job(workflow="ext.other")]).json()["jobs"][0]["job_id"]
    thread, out = status_in_thread(c, job_id, 20)  # no room to wait: answered now
    thread.join(10)
    assert out["response"].json()["status"] == "queued" and out["took"] < 10
    assert waiting.is_alive()


def test_a_status_wait_on_another_keys_job_is_a_404_at_once(c):
    other = c.post("/api/v1/keys", {"name": "other", "role": "client"}, key=KEY).json()["key"]
    job_id = batch(c, [job()]).json()["jobs"][0]["job_id"]
    started = time.monotonic()
    r = c.get(f"/api/v1/status/{job_id}?wait=20", key=other)
    assert r.status == 404 and time.monotonic() - started < 10


def test_batch_openapi_and_error_shape(c):
    doc = c.get("/openapi.json").json()
    assert "/api/v1/intake/batch" in doc["paths"]
    r = c.request("POST", "/api/v1/intake/batch", body=json.dumps({"jobs": [job()]}).encode())
    assert r.status == 401 and set(r.json()) >= {"error", "message", "request_id"}

