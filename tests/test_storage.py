"""SQLite and the job store: concurrency, migrations, retention, metrics."""

import io
import sqlite3
import threading
import time

import pytest

import jobstore
import recorder
import storage
from support import Client, make_app


def test_schema_is_versioned_and_migrates_once(tmp_path):
    path = str(tmp_path / "v.db")
    storage.Database(path).connection()
    storage.Database(path).connection()  # a second process/start finds it done
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(storage.MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "audit_log", "minutes"} <= tables


def test_each_thread_gets_its_own_connection(tmp_path):
    db = storage.Database(str(tmp_path / "t.db"))
    seen = []  # the connections themselves: an id may be reused once its thread's is gone
    threads = [threading.Thread(target=lambda: seen.append(db.connection())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 4 and all(c is not db.connection() for c in seen)


def test_concurrent_upserts_of_one_new_email_make_one_user(client, app):
    results = []
    barrier = threading.Barrier(16)

    def upsert(i):
        barrier.wait()
        r = client.post("/api/v1/users/upsert", {"email": "race@example.com", "name": f"n{i}"})
        results.append((r.status, r.json()["user"]["id"]))

    threads = [threading.Thread(target=upsert, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 15 + [201]
    assert len({uid for _, uid in results}) == 1
    assert app.services.db.query("SELECT COUNT(*) AS n FROM users")[0]["n"] == 1


def test_write_failure_leaves_no_half_written_row(tmp_path):
    db = storage.Database(str(tmp_path / "a.db"))
    users = storage.UserStore(db)
    users.upsert("admin", "keep@example.com", {"name": "Keep"})
    with pytest.raises(RuntimeError):
        with db.write() as conn:
            conn.execute("UPDATE users SET name = 'Changed'")
            raise RuntimeError("crash mid-transaction")
    assert users.get_by_email("keep@example.com", "admin")["name"] == "Keep"


def test_statements_waiting_for_the_write_lock_commit_together_and_fail_alone(tmp_path):
    db = storage.Database(str(tmp_path / "a.db"))
    db.query("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    db.write_one("INSERT INTO t (n) VALUES (0)")
    statements = []
    open_connection = db._open

    def traced():
        conn = open_connection()
        conn.set_trace_callback(statements.append)
        return conn

    db._open = traced
    results, errors = {}, {}

    def insert(n):
        try:
            results[n] = db.write_one("INSERT INTO t (n) VALUES (:n) RETURNING n", {"n": n})
        except sqlite3.IntegrityError as exc:
            errors[n] = exc

    def insert_behind_a_writer(numbers):
        threads = [threading.Thread(target=insert, args=(n,)) for n in numbers]
        with db._write_lock:  # a writer at work: the others queue up behind it
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while len(db._queued) < len(numbers) and time.monotonic() < deadline:
                time.sleep(0.005)
        for t in threads:
            t.join(10)

    insert_behind_a_writer((1, 2, 0, 3))
    # n = 0 is taken: only its caller hears so; the group ran again one by one.
    assert sorted(errors) == [0] and results == {1: [{"n": 1}], 2: [{"n": 2}], 3: [{"n": 3}]}
    assert [r["n"] for r in db.query("SELECT n FROM t ORDER BY n")] == [0, 1, 2, 3]
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("ROLLBACK") == 1

    statements.clear()
    insert_behind_a_writer((4, 5, 6))
    assert [r["n"] for r in db.query("SELECT n FROM t WHERE n > 3 ORDER BY n")] == [4, 5, 6]
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1  # one transaction


def test_a_held_write_lock_answers_503_storage_busy(tmp_path):
    app = make_app(tmp_path)
    app.services.db.busy_timeout_ms = 100
    c = Client(app)
    c.get("/health")  # open the database
    blocker = sqlite3.connect(str(tmp_path / "levqor.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        app.services.db.close()  # reconnect with the short timeout
        r = c.post("/api/v1/users/upsert", {"email": "busy@example.com"})
        assert r.status == 503 and r.json()["error"] == "storage_busy"
        assert r.headers["retry-after"] == "1"
    finally:
        blocker.execute("ROLLBACK")
    assert c.post("/api/v1/users/upsert", {"email": "busy@example.com"}).status == 201
    app.stop()


# -- the in-memory job store ------------------------------------------------------


def job(job_id, status="queued", at=0.0, priority="normal", workflow="w"):
    return {"job_id": job_id, "status": status, "created_at": at, "updated_at": at,
            "finished_at": at if status in jobstore.JOB_FINAL else None, "priority": priority,
            "workflow": workflow, "not_before": at, "key_id": "k", "lease_expires_at": None}


def test_job_store_hands_out_copies():
    store = jobstore.MemoryJobStore()
    store.add(job("a"))
    got = store.get("a")
    got["status"] = "tampered"
    assert store.get("a")["status"] == "queued"


def test_finished_jobs_leave_after_ttl():
    now = [1000.0]
    store = jobstore.MemoryJobStore(ttl=60, clock=lambda: now[0])
    store.add(job("done", at=1000.0))
    store.add(job("waiting", at=1000.0))
    store.update("done", status="succeeded", updated_at=1000.0, finished_at=1000.0)
    now[0] = 1059.0
    store.add(job("later", at=now[0]))
    assert store.get("done") is not None
    now[0] = 1061.0
    store.add(job("later2", at=now[0]))
    assert store.get("done") is None
    assert store.get("waiting") is not None  # unfinished jobs are never dropped by age
    assert store.counts()["by_status"]["succeeded"] == 0


def test_full_store_answers_503_queue_full(tmp_path):
    app = make_app(tmp_path, MAX_JOBS=2)
    c = Client(app)
    assert [c.post("/api/v1/intake", {"workflow": "w", "payload": {}}).status for _ in range(2)] == [202, 202]
    r = c.post("/api/v1/intake", {"workflow": "w", "payload": {}})
    assert r.status == 503 and r.json()["error"] == "queue_full" and r.headers["retry-after"]
    assert len(app.services.jobs) == 2
    app.stop()


def test_job_counts_by_status_and_priority():
    store = jobstore.MemoryJobStore()
    for i, (status, priority) in enumerate([("queued", "high"), ("queued", "low"),
                                            ("running", "low"), ("failed", "normal")]):
        store.add(job(str(i), status, priority=priority))
    counts = store.counts()
    assert counts["by_status"] == {"scheduled": 0, "waiting": 0, "queued": 2, "running": 1,
                                   "succeeded": 0, "failed": 1, "canceled": 0}
    assert counts["queued_by_priority"] == {"high": 1, "normal": 0, "low": 1}


def test_update_is_compare_and_set():
    store = jobstore.MemoryJobStore()
    store.add(job("a"))
    assert store.update("a", expect={"status": "running"}, status="failed") is None
    assert store.update("a", expect={"status": "queued"}, status="canceled",
                        finished_at=1.0)["status"] == "canceled"


# -- metrics from the heartbeat -----------------------------------------------------


def recorder_at(tmp_path, clock):
    db = storage.Database(str(tmp_path / "m.db"))
    return recorder.Recorder(db, log=None, clock=clock)


def test_uptime_is_the_share_of_minutes_with_a_heartbeat(tmp_path):
    now = [1_800_000_000.0]
    rec = recorder_at(tmp_path, lambda: now[0])
    for _ in range(10):  # up for ten minutes...
        rec.flush()
        now[0] += 60
    now[0] += 10 * 60  # ...down for ten...
    assert rec.metrics()["uptime_rolling_7d"] == pytest.approx(100 * 11 / 21, abs=0.01)


def test_uptime_window_is_seven_days(tmp_path):
    now = [1_800_000_000.0]
    rec = recorder_at(tmp_path, lambda: now[0])
    rec.flush()
    now[0] += 14 * 86400  # one heartbeat two weeks ago, then nothing: the week is all down
    assert rec.metrics()["uptime_rolling_7d"] == pytest.approx(100 / (7 * 1440), abs=0.01)


def test_jobs_today_resets_at_utc_midnight(tmp_path):
    midnight = 1_800_000_000 - 1_800_000_000 % 86400
    now = [midnight - 30.0]
    rec = recorder_at(tmp_path, lambda: now[0])
    rec.count("jobs")
    rec.count("jobs")
    rec.flush()
    assert rec.metrics()["jobs_today"] == 2
    now[0] = midnight + 30.0
    rec.count("jobs")
    assert rec.metrics()["jobs_today"] == 1


def test_metrics_survive_a_restart(tmp_path):
    app = make_app(tmp_path)
    c = Client(app)
    c.post("/api/v1/intake", {"workflow": "w", "payload": {}})
    app.stop()  # flushes
    again = Client(make_app(tmp_path, log=io.StringIO()))
    assert again.get("/public/metrics").json()["jobs_today"] == 1


class Unwritable:
    """A database that refuses every write, as one that has gone away does."""

    def __init__(self, db):
        self.db = db

    def write(self, lock=None):
        raise storage.StorageError("unavailable", "the database is unavailable; try again shortly")

    def write_one(self, sql, params=()):
        self.write()

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_change_made_while_its_audit_row_cannot_be_written_is_still_acknowledged(tmp_path):
    """The job is stored: a 503 would invite a duplicate. The row waits and
    is written once the database takes writes again."""
    log = io.StringIO()
    app = make_app(tmp_path, log=log, API_KEYS="k" * 20)
    try:
        app.start()
        c = Client(app)
        services = app.services
        services.recorder.db = Unwritable(services.db)
        r = c.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key="k" * 20)
        assert r.status == 202 and services.jobs.get(r.json()["job_id"]) is not None
        assert "audit row written late" in log.getvalue()
        services.recorder.db = services.db
        services.recorder.flush()
        rows = services.db.query("SELECT status FROM audit_log WHERE request_id = :id",
                                 {"id": r.headers["x-request-id"]})
        assert rows == [{"status": 202}]
    finally:
        app.stop()
