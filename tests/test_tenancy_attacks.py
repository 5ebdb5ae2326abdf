"""Attacks from a security review of production mode (LEVQOR_ENV=production,
managed keys, JOB_STORE=sqlite, several gunicorn workers): each test
replays one, in-process where it is about HTTP and real gunicorn where it
is about processes."""

import base64
import concurrent.futures
import json
import os
import signal
import sqlite3

import pytest
import requests

from support import KEY, Client, Server, children, make_app, wait_until

INTAKE = "/api/v1/intake"
CLAIM = "/api/v1/jobs/claim"
HEADERS = {"X-Api-Key": KEY}
SECRET = "whsec_" + base64.b64encode(b"levqor-tenancy-secret-0123456789").decode()
FAST = {"API_KEYS": KEY, "JOB_STORE": "sqlite", "RATE_BURST": 100_000, "RATE_GLOBAL": 100_000,
        "RATE_READ": 100_000, "RATE_WORKER": 100_000, "MAX_COST_PER_DAY": 1_000_000}


# -- MAX_JOBS holds exactly across processes -----------------------------------------------


@pytest.mark.server
def test_max_jobs_is_exact_under_concurrent_intakes_across_workers(tmp_path):
    srv = Server(tmp_path, WEB_CONCURRENCY=2, MAX_JOBS=10, THREADS=8, **FAST).start()
    try:
        def submit(i):
            r = requests.post(srv.url + INTAKE, headers=HEADERS, timeout=30,
                              json={"workflow": "ext.flood", "payload": {"i": i}, "max_cost": 0})
            return r.status_code, r.json()["error"] if r.status_code != 202 else None

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(submit, range(100)))
        assert answers.count((202, None)) == 10, answers
        assert answers.count((503, "queue_full")) == 90, answers
        conn = sqlite3.connect(tmp_path / "levqor.db")
        try:
            assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 10
        finally:
            conn.close()
    finally:
        srv.stop()


# -- one unreadable job row does not stop the service ---------------------------------------


def _store(path, **options):
    import jobstore
    import storage
    return jobstore.SqliteJobStore(storage.Database(str(path)), **options)


def _job(job_id, **fields):
    import engine
    eng = engine.Engine(None, engine.Registry(), None)
    job = eng.new_job("ext.poison", {"x": 1}, "normal", None, "k")
    job.update(job_id=job_id, **fields)
    return job


def test_non_finite_numbers_are_never_written_to_a_job_row(tmp_path):
    store = _store(tmp_path / "jobs.db")
    with pytest.raises(ValueError):
        store.add(_job("a" * 32, payload={"x": float("inf")}))
    store.add(_job("b" * 32))
    with pytest.raises(ValueError):
        store.update("b" * 32, result={"y": float("nan")})
    conn = sqlite3.connect(tmp_path / "jobs.db")
    try:
        rows = conn.execute("SELECT job_id FROM jobs WHERE NOT json_valid(data)").fetchall()
    finally:
        conn.close()
    assert rows == [] and len(store) == 1


def test_a_callback_body_is_never_written_with_non_finite_numbers(tmp_path):
    import callbacks
    import engine
    store = _store(tmp_path / "jobs.db")
    job, _ = store.add(_job("c" * 32, callback_url="http://hooks.example.com/x"))
    store.update(job["job_id"], status="succeeded", finished_at=1.0)
    cbs = callbacks.Callbacks(store, None, (SECRET,), view=lambda j: {"result": float("inf")})
    with pytest.raises(ValueError):
        cbs.on_finish(store.get(job["job_id"]))
    assert store.get(job["job_id"])["callback"] is None


def poison(path):
    """A job store holding one good job and one whose JSON has Infinity in
    it (as a payload of {"x": 1e400} was stored before intake refused it),
    finished with its callback still to send, which start-up scans."""
    store = _store(path)
    good, _ = store.add(_job("1" * 32))
    bad, _ = store.add(_job("2" * 32, callback_url="http://hooks.example.com/x"))
    store.update(bad["job_id"], status="succeeded", finished_at=store.clock(),
                 callback_id="msg_1", callback_body="{}",
                 callback={"state": "pending", "attempts": 0, "last_status": None,
                           "last_error": None, "next_attempt_at": store.clock()})
    store.db.close()
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE jobs SET data = replace(data, '\"x\":1', '\"x\":Infinity')"
                         " WHERE job_id = ?", (bad["job_id"],))
        assert conn.execute("SELECT json_valid(data) FROM jobs WHERE job_id = ?",
                            (bad["job_id"],)).fetchone() == (0,)
    finally:
        conn.close()
    return good["job_id"], bad["job_id"]


def log_lines(srv):
    return [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]


@pytest.mark.server
def test_a_job_row_with_infinity_neither_stops_start_up_nor_a_restarted_worker(tmp_path):
    good, bad = poison(tmp_path / "levqor.db")
    srv = Server(tmp_path, WEB_CONCURRENCY=2, CALLBACK_SECRET=SECRET, **FAST).start()
    try:
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        assert wait_until(lambda: len(children(srv.proc.pid)) == 2, 20)
        assert wait_until(lambda: [l for l in log_lines(srv) if l.get("job_id") == bad
                                   and l["msg"] == "corrupt job record set aside"], 20), srv.log()
        conn = sqlite3.connect(tmp_path / "levqor.db")
        try:
            assert conn.execute("SELECT job_id, reason FROM jobs_quarantine").fetchall() == [
                (bad, "corrupt_record")]
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE job_id = ?", (bad,)).fetchone() == (0,)
        finally:
            conn.close()
        r = requests.get(srv.url + f"/api/v1/status/{good}", headers=HEADERS, timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "queued"
        assert requests.get(srv.url + f"/api/v1/status/{bad}", headers=HEADERS,
                            timeout=5).status_code == 404
        # A worker killed now is replaced, and the replacement boots.
        before = set(children(srv.proc.pid))
        os.kill(min(before), signal.SIGKILL)
        assert wait_until(lambda: len(set(children(srv.proc.pid)) - before) == 1
                          and len(children(srv.proc.pid)) == 2, 30), srv.log()
        assert srv.proc.poll() is None
        assert wait_until(lambda: all(requests.get(srv.url + "/health", timeout=5).status_code == 200
                                      for _ in range(4)), 10)
        assert "Worker failed to boot" not in srv.log()
        assert sum(1 for l in log_lines(srv) if l["msg"] == "corrupt job record set aside") == 1
    finally:
        srv.stop()


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, **fields: self.lines.append((level, msg, fields))


def test_one_job_that_cannot_be_swept_does_not_stop_the_sweep_of_the_others():
    import engine
    import jobstore
    from support import FakeClock
    clock = FakeClock()
    store = jobstore.MemoryJobStore(clock=clock)
    log = Log()
    eng = engine.Engine(store, engine.Registry(), log, clock=clock)
    ids = [eng.submit(eng.new_job("ext", {}, "normal", None, "k"))[0]["job_id"] for _ in range(2)]
    assert eng.claim(["ext"], 10) and eng.claim(["ext"], 10)
    update = store.update

    def faulty(job_id, expect=None, **changes):
        if job_id == ids[0]:
            raise RuntimeError("this row cannot be written")
        return update(job_id, expect, **changes)
    store.update = faulty
    clock.advance(11)
    eng.tick()  # logs and carries on
    assert store.get(ids[1])["status"] == "queued"
    assert [f["job_id"] for level, msg, f in log.lines if level == "error"] == [ids[0]]


def test_start_up_scans_that_fail_are_logged_and_the_service_starts(tmp_path):
    import io
    log = io.StringIO()
    app = make_app(tmp_path, log=log, JOB_STORE="sqlite", CALLBACK_SECRET=SECRET)

    def broken(*args):
        raise sqlite3.OperationalError("malformed JSON")
    app.services.jobs.quarantine = broken
    app.services.jobs.pending_callbacks = broken
    try:
        app.start()
        assert app.services.callbacks._workers and app.services.engine.running
        assert Client(app).get("/health").status == 200
    finally:
        app.stop()
    messages = [json.loads(line)["msg"] for line in log.getvalue().splitlines()]
    assert "corrupt record scan failed" in messages and "callback start-up scan failed" in messages
