"""What only PostgreSQL has to promise: choosing it, migrating it once
across hosts, one clock for every host, claims served by an index, keys
revoked everywhere, wakeups across hosts, and faults: a database that goes
away answers 503 at once, and service comes back by itself.

The stores' shared behaviour runs on PostgreSQL in test_store_contract.py,
and the engine, callback, guardrail and durable suites are parametrised
with it; several real hosts are in test_multihost.py.
"""

import io
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

import engine
import jobstore
import levqor
import pg
from support import (KEY, ROOT, Client, free_port, make_app, postgres_database, postgres_url,
                     wait_until)


class Log:
    def __getattr__(self, level):
        return lambda msg, **fields: None


def rows(url, sql):
    import psycopg
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def intake(client, workflow="echo", payload=None, **body):
    return client.post("/api/v1/intake", {"workflow": workflow, "payload": payload or {}, **body},
                       key=KEY)


# -- selection -------------------------------------------------------------------------------


def test_database_url_puts_every_store_in_postgres_and_the_log_hides_the_password(tmp_path):
    url = postgres_url().replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    log = io.StringIO()
    sqlite_path = tmp_path / "unused.db"
    app = make_app(tmp_path, log=log, API_KEYS=KEY, DATABASE_URL=url, SQLITE_PATH=str(sqlite_path),
                   JOB_STORE="sqlite")
    try:
        app.start()
        c = Client(app)
        job = intake(c).json()
        user = c.post("/api/v1/users/upsert", {"email": "a@example.com"}, key=KEY).json()
        assert c.get("/health").status == 200
        assert c.get("/api/v1/ops/health", key=KEY).json()["checks"]["database"] == "ok"
    finally:
        app.stop()
    assert rows(url, f"SELECT job_id FROM jobs WHERE job_id = '{job['job_id']}'")
    assert rows(url, f"SELECT id FROM users WHERE id = '{user['user']['id']}'")
    assert rows(url, "SELECT count(*) FROM audit_log")[0][0] >= 2
    assert not sqlite_path.exists(), "SQLITE_PATH is ignored"
    text = log.getvalue()
    assert "SQLITE_PATH and JOB_STORE are ignored" in text and "postgres:***@" in text
    assert "s3cret-pw" not in text
    assert "s3cret-pw" not in repr(app.services.settings)


def test_a_malformed_database_url_is_refused_without_repeating_it():
    with pytest.raises(levqor.ConfigError) as refused:
        levqor.Settings.from_env({"DATABASE_URL": "mysql://user:s3cret-pw@db/levqor"})
    assert "DATABASE_URL" in str(refused.value) and "s3cret-pw" not in str(refused.value)


def test_without_psycopg_the_start_is_refused_naming_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(levqor.ConfigError) as refused:
        make_app(tmp_path, DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres")
    assert "pip install -r requirements-postgres.txt" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_gunicorn_without_psycopg_refuses_to_start_with_one_line(tmp_path):
    hidden = tmp_path / "hidden" / "psycopg"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('psycopg is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hidden"), "PORT": str(free_port()),
           "DATABASE_URL": "postgresql://levqor:s3cret-pw@127.0.0.1:5432/levqor"}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "levqor:app"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "levqor: DATABASE_URL is set but psycopg is not installed: "
        "pip install -r requirements-postgres.txt"]
    assert "s3cret-pw" not in done.stdout + done.stderr


# -- migrations --------------------------------------------------------------------------------


def test_ten_hosts_starting_together_migrate_once():
    url = postgres_url()
    hosts = [postgres_database(url) for _ in range(10)]
    barrier = threading.Barrier(len(hosts))
    errors = []

    def start(db):
        barrier.wait()
        try:
            db.connection()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert rows(url, "SELECT version FROM schema_version") == [(len(pg.MIGRATIONS),)]


def test_a_later_version_adds_a_column_without_a_manual_step(monkeypatch):
    url = postgres_url()
    old = jobstore.SqlJobStore(postgres_database(url))
    job, _ = old.add(engine.Engine(old, engine.Registry(), Log()).new_job("w", {"a": 1}, "normal",
                                                                          None, "k"))
    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS + ["ALTER TABLE jobs ADD COLUMN region text"])
    new = jobstore.SqlJobStore(postgres_database(url))
    assert new.get(job["job_id"])["payload"] == {"a": 1}
    assert rows(url, "SELECT version FROM schema_version") == [(len(pg.MIGRATIONS),)]
    assert rows(url, "SELECT region FROM jobs") == [(None,)]


# -- one clock ---------------------------------------------------------------------------------


def test_hosts_with_skewed_clocks_read_the_same_time():
    db = postgres_database()
    ahead = pg.DbClock(db, host_clock=lambda: time.time() + 3600)
    behind = pg.DbClock(db, host_clock=lambda: time.time() - 7200)
    assert abs(ahead() - behind()) < 0.5
    assert abs(ahead() - db.now()) < 0.5


def test_a_lease_taken_on_a_fast_host_is_not_expired_by_a_slow_one():
    url = postgres_url()
    fast_db = postgres_database(url)
    fast_clock = pg.DbClock(fast_db, lambda: time.time() + 600)
    fast = engine.Engine(jobstore.SqlJobStore(fast_db, clock=fast_clock), engine.Registry(), Log(),
                         clock=fast_clock)
    slow_db = postgres_database(url)
    slow_clock = pg.DbClock(slow_db, lambda: time.time() - 600)
    slow = engine.Engine(jobstore.SqlJobStore(slow_db, clock=slow_clock), engine.Registry(), Log(),
                         clock=slow_clock)
    fast.submit(fast.new_job("ext.w", {}, "normal", None, "k"))
    job = fast.claim(["ext.w"], 30)
    # By its own clock the slow host is ten minutes behind, and the fast one
    # ten minutes ahead: by the database's, the lease has 30 s to run.
    assert slow.store.expired(slow.now()) == []
    assert 25 < job["lease_expires_at"] - slow.now() <= 30.5


# -- claims --------------------------------------------------------------------------------------


def test_a_claim_reads_the_first_entry_of_an_index_and_sorts_nothing():
    db = postgres_database()
    store = jobstore.SqlJobStore(db)
    eng = engine.Engine(store, engine.Registry(), Log())
    for i in range(300):
        store.add(eng.new_job(f"w{i % 3}", {}, ("high", "normal", "low")[i % 3], None, "k"))
    db.write_one("ANALYZE jobs")
    changes, _ = eng._start_attempt("external", 30)
    params = {"now": time.time(), "workflows": '["w1"]', "status": "running",
              "lease_expires_at": time.time() + 30, "changes": "{}", "per_workflow": "{}"}
    for name in ("claim", "claim_in"):
        plan = "\n".join(r["QUERY PLAN"] for r in db.query("EXPLAIN " + store.sql[name], params))
        assert "Index Scan using jobs_" in plan and "Sort" not in plan, plan


# -- keys ----------------------------------------------------------------------------------------


def test_a_key_revoked_through_one_host_is_refused_by_every_host(tmp_path):
    url = postgres_url()
    one = make_app(tmp_path / "one", API_KEYS=KEY, DATABASE_URL=url)
    other = make_app(tmp_path / "other", API_KEYS=KEY, DATABASE_URL=url)
    try:
        a, b = Client(one), Client(other)
        key = a.post("/api/v1/keys", {"name": "tenant", "role": "client"}, key=KEY).json()
        assert b.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key=key["key"]).status == 202
        assert a.request("DELETE", f"/api/v1/keys/{key['id']}", key=KEY).status == 200
        refused = b.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key=key["key"])
        assert refused.status == 403 and refused.json()["message"] == "the API key is not valid"
    finally:
        one.stop()
        other.stop()


# -- wakeups ---------------------------------------------------------------------------------------


def test_an_idle_host_starts_a_job_queued_on_another_within_moments():
    """Host B's one worker thread sleeps up to a second between polls: only
    the notification can wake it sooner."""
    url = postgres_url()
    registry = engine.registry.copy()
    host_a = engine.Engine(jobstore.SqlJobStore(postgres_database(url)), registry, Log(), threads=0)
    host_b = engine.Engine(jobstore.SqlJobStore(postgres_database(url)), registry, Log(), threads=1)
    host_b.start()
    try:
        time.sleep(1.5)  # the listener is connected, the worker asleep
        waits = []
        for _ in range(5):
            job, _ = host_a.submit(host_a.new_job("echo", {}, "normal", None, "k"))
            assert wait_until(lambda: host_a.get(job["job_id"])["status"] == "succeeded", 5, 0.005)
            done = host_a.get(job["job_id"])
            waits.append(done["started_at"] - done["created_at"])
            time.sleep(1.2)  # asleep again
        assert sorted(waits)[2] < 0.5, waits
    finally:
        host_b.stop(grace=2)
        host_b.store.db.close()


# -- faults ----------------------------------------------------------------------------------------


class Proxy:
    """A TCP relay on loopback in front of PostgreSQL that can be cut, as a
    database that goes away is, and restored on the same port."""

    def __init__(self, port=5432):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.up = True
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, a, b):
        try:
            while self.up:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def cut(self):
        """Refuse new connections and drop every open one."""
        self.up = False
        with self.lock:
            for sock in self.conns:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns = []

    def restore(self):
        self.up = True

    def close(self):
        self.cut()
        self.listener.close()


def test_a_database_that_goes_away_answers_503_at_once_and_service_resumes_by_itself(tmp_path):
    base = postgres_url()
    proxy = Proxy()
    url = base.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    app = make_app(tmp_path, API_KEYS=KEY, DATABASE_URL=url, DATABASE_STATEMENT_TIMEOUT_MS=2000)
    try:
        c = Client(app)
        kept = intake(c).json()["job_id"]
        proxy.cut()
        started = time.monotonic()
        for request in (lambda: intake(c), lambda: c.get(f"/api/v1/status/{kept}", key=KEY),
                        lambda: c.post("/api/v1/users/upsert", {"email": "b@example.com"}, key=KEY)):
            answer = request()
            assert answer.status == 503 and answer.json()["error"] == "storage_unavailable", answer
            assert answer.headers["retry-after"] == "5"
        health = c.get("/health")
        assert health.status == 503 and health.json()["database"] == "unavailable"
        assert time.monotonic() - started < 30, "no request waits long on a database that is gone"
        slowest = 0.0
        for _ in range(30):  # a sustained outage: still 503 at once, every time
            begun = time.monotonic()
            answer = intake(c)
            slowest = max(slowest, time.monotonic() - begun)
            assert answer.status == 503 and answer.json()["error"] == "storage_unavailable"
            time.sleep(0.1)
        assert slowest < 2.0, slowest

        proxy.restore()
        assert wait_until(lambda: intake(c).status == 202, 15, 0.2)
        assert wait_until(lambda: c.get("/health").status == 200, 5, 0.2)
        assert c.get(f"/api/v1/status/{kept}", key=KEY).status == 200
    finally:
        app.stop()
        proxy.close()
    held, count = rows(base, "SELECT (SELECT n FROM job_count), (SELECT count(*) FROM jobs)")[0]
    assert held == count, "no intake was half-written"


def test_a_string_postgres_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    url = postgres_url()
    app = make_app(tmp_path, API_KEYS=KEY, DATABASE_URL=url)
    try:
        c = Client(app)
        refused = intake(c, "ext.w", {"text": "nul\u0000byte"}, max_cost=0.1)
        assert refused.status == 400 and refused.json()["error"] == "validation_failed"
        meta = c.post("/api/v1/users/upsert", {"email": "n@example.com", "meta": {"k": "\u0000"}},
                      key=KEY)
        assert meta.status == 400
        assert app.services.ledger.used_today() == 0, "the job's reservation was released"
    finally:
        app.stop()
    assert rows(url, "SELECT count(*) FROM jobs") == [(0,)]
    assert rows(url, "SELECT count(*) FROM users") == [(0,)]
