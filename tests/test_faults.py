"""Faults against real gunicorn: a crash under write load, a database held
by another process, a full disk, and SIGTERM while requests are in flight."""

import os
import resource
import sqlite3
import threading
import time

import pytest
import requests

from support import KEY, Server, children, wait_until

pytestmark = pytest.mark.server

HEADERS = {"X-Api-Key": KEY}
LOAD = {"API_KEYS": KEY, "RATE_BURST": 100_000, "RATE_GLOBAL": 100_000, "MAX_COST_PER_DAY": 100_000}


def integrity(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_under_write_load_loses_no_user_job_or_ledger_row(tmp_path):
    srv = Server(tmp_path, JOB_STORE="sqlite", WEB_CONCURRENCY=2, **LOAD).start()
    users, jobs = [], []
    stop = threading.Event()

    def write(n):
        s = requests.Session()
        for i in range(2000):  # bounded even if the kill never lands
            if stop.is_set():
                return
            try:
                if i % 2:
                    r = s.post(srv.url + "/api/v1/users/upsert", json={"email": f"k{n}-{i}@example.com"},
                               headers=HEADERS, timeout=5)
                    if r.status_code == 201:
                        users.append(r.json()["user"]["id"])
                else:
                    r = s.post(srv.url + "/api/v1/intake", headers=HEADERS, timeout=5,
                               json={"workflow": "ext", "payload": {"i": i}, "max_cost": 0.01})
                    if r.status_code == 202:
                        jobs.append(r.json()["job_id"])
            except requests.RequestException:
                return

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(users) + len(jobs) >= 300, 20, 0.02)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(10)
    db = tmp_path / "levqor.db"
    assert integrity(db) == "ok"
    conn = sqlite3.connect(db)
    stored_users = {r[0] for r in conn.execute("SELECT id FROM users")}
    stored_jobs = {r[0] for r in conn.execute("SELECT job_id FROM jobs")}
    reserved = {r[0] for r in conn.execute("SELECT job_id FROM ledger WHERE kind = 'reserve'")}
    conn.close()
    assert len(users) > 50 and len(jobs) > 50
    assert set(users) <= stored_users
    assert set(jobs) <= stored_jobs and set(jobs) <= reserved


def test_a_database_locked_by_another_process_is_503_storage_busy(tmp_path):
    srv = Server(tmp_path, SQLITE_BUSY_TIMEOUT_MS=200, **LOAD).start()
    try:
        assert requests.post(srv.url + "/api/v1/users/upsert", json={"email": "a@example.com"},
                             headers=HEADERS, timeout=5).status_code == 201
        holder = sqlite3.connect(tmp_path / "levqor.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            r = requests.post(srv.url + "/api/v1/users/upsert", json={"email": "b@example.com"},
                              headers=HEADERS, timeout=10)
            assert r.status_code == 503 and r.json()["error"] == "storage_busy"
            assert r.headers["Retry-After"] == "1"
            # Reads carry on meanwhile (WAL).
            assert requests.get(srv.url + "/api/v1/users?email=a@example.com", headers=HEADERS,
                                timeout=5).status_code == 200
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert requests.post(srv.url + "/api/v1/users/upsert", json={"email": "b@example.com"},
                             headers=HEADERS, timeout=5).status_code == 201
    finally:
        srv.stop()


def test_a_full_disk_is_507_and_the_service_recovers(tmp_path):
    srv = Server(tmp_path, **LOAD).start()
    try:
        s = requests.Session()
        s.headers.update(HEADERS)
        assert s.post(srv.url + "/api/v1/users/upsert", json={"email": "first@example.com"}, timeout=5).status_code == 201
        # Cap the size of any file the worker writes just above what the
        # database files hold now: the next big writes find the disk "full".
        worker = children(srv.proc.pid)[0]
        sizes = [p.stat().st_size for p in tmp_path.glob("levqor.db*")]
        limit = max(sizes) + 64 * 1024
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        statuses = []
        for i in range(40):
            r = s.post(srv.url + "/api/v1/users/upsert", timeout=10,
                       json={"email": f"big{i}@example.com", "meta": {"blob": "x" * 15_000}})
            statuses.append(r.status_code)
            if r.status_code == 507:
                assert r.json()["error"] == "insufficient_storage" and r.headers["Retry-After"]
                break
        assert statuses[-1] == 507, statuses
        assert s.get(srv.url + "/api/v1/users?email=first@example.com", timeout=5).status_code == 200
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        r = s.post(srv.url + "/api/v1/users/upsert", json={"email": "after@example.com", "meta": {"b": "x" * 15_000}},
                   timeout=10)
        assert r.status_code == 201
    finally:
        srv.stop()
    assert integrity(tmp_path / "levqor.db") == "ok"


def test_sigterm_during_load_lets_in_flight_requests_finish(tmp_path):
    srv = Server(tmp_path, **LOAD).start()
    results = []
    go = threading.Event()

    def client():
        s = requests.Session()
        go.wait()
        for i in range(200):
            try:
                r = s.post(srv.url + "/api/v1/users/upsert", json={"email": f"t{threading.get_ident()}-{i}@example.com"},
                           headers=HEADERS, timeout=10)
            except requests.ConnectionError:
                results.append("refused")  # after shutdown began: never accepted
                return
            results.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(0.5)
    srv.proc.terminate()  # SIGTERM while requests are in flight
    for t in threads:
        t.join(30)
    srv.stop()
    answered = [r for r in results if r != "refused"]
    assert answered and all(status == 201 for status in answered), results
    assert os.path.exists(tmp_path / "levqor.db") and integrity(tmp_path / "levqor.db") == "ok"
