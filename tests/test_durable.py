"""Jobs in a database (JOB_STORE=sqlite, or PostgreSQL with DATABASE_URL)
under real gunicorn with several workers: jobs are shared by every process,
run exactly once, and survive kill -9."""

import collections
import json
import os
import signal
import sqlite3
import threading
import time

import pytest
import requests

from support import KEY, Server, children, postgres_url, wait_until

pytestmark = pytest.mark.server

HEADERS = {"X-Api-Key": KEY}
FAST = {"API_KEYS": KEY, "RATE_BURST": 100_000, "RATE_GLOBAL": 100_000,
        "RATE_READ": 100_000, "RATE_WORKER": 100_000, "MAX_COST_PER_DAY": 1_000_000}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The settings of each database, with what tells that it is whole."""
    if request.param == "postgres":
        url = postgres_url()
        return dict(FAST, DATABASE_URL=url), lambda: counted_rows(url)
    return dict(FAST, JOB_STORE="sqlite"), lambda: integrity(tmp_path)


def counted_rows(url):
    """PostgreSQL's check: the count intakes take their slot from is the
    number of rows (no intake was half-written)."""
    import psycopg
    with psycopg.connect(url) as conn:
        held = conn.execute("SELECT n FROM job_count").fetchone()[0]
        rows = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    return "ok" if held == rows else f"job_count {held} != {rows} rows"


def intake(srv, session, workflow, payload=None):
    r = session.post(srv.url + "/api/v1/intake", json={"workflow": workflow, "payload": payload or {}},
                     headers=HEADERS, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def status(srv, session, job_id):
    return session.get(srv.url + f"/api/v1/status/{job_id}", timeout=10).json()


def integrity(tmp_path):
    conn = sqlite3.connect(tmp_path / "levqor.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def served_by(srv):
    """The worker pids that answered requests, from the access log."""
    pids = set()
    for line in srv.log().splitlines():
        if line.startswith("{") and '"msg":"request"' in line:
            pids.add(json.loads(line)["pid"])
    return pids


def test_two_workers_share_jobs_and_each_runs_exactly_once(tmp_path, store):
    env, whole = store
    srv = Server(tmp_path, WEB_CONCURRENCY=2, **env).start()
    try:
        session = requests.Session()
        ids = [intake(srv, session, "ext", {"i": i}) for i in range(60)]
        claims = collections.Counter()
        lock = threading.Lock()

        def claimer():
            s = requests.Session()
            for _ in range(200):  # bounded: more than enough tries for 60 jobs
                r = s.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["ext"]},
                           headers=HEADERS, timeout=10)
                if r.status_code == 204:
                    return
                job = r.json()["job"]
                with lock:
                    claims[job["job_id"]] += 1
                done = s.post(srv.url + f"/api/v1/jobs/{job['job_id']}/complete",
                              json={"lease_token": job["lease_token"], "result": job["payload"]},
                              headers=HEADERS, timeout=10)
                assert done.status_code == 200, done.text

        threads = [threading.Thread(target=claimer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(claims) == sorted(ids) and set(claims.values()) == {1}
        for i, job_id in enumerate(ids):
            s = status(srv, session, job_id)
            assert s["status"] == "succeeded" and s["result"] == {"i": i} and s["attempts"] == 1

        # In-process jobs too: the pools of both workers take them, once each.
        local = [intake(srv, session, "echo", {"i": i}) for i in range(40)]
        wait_until(lambda: all(status(srv, session, j)["status"] == "succeeded" for j in local), 30, 0.1)
        assert all(status(srv, session, j)["attempts"] == 1 for j in local)

        # A job submitted through one worker is cancellable through the other.
        for _ in range(10):
            job_id = intake(srv, session, "ext")
            r = requests.post(srv.url + f"/api/v1/jobs/{job_id}/cancel", headers=HEADERS, timeout=10)
            assert r.status_code == 200 and r.json()["job"]["status"] == "canceled"
        assert len(served_by(srv)) == 2
    finally:
        srv.stop()
    assert whole() == "ok"


def test_kill_9_loses_no_acknowledged_job_and_leases_bring_running_ones_back(tmp_path, store):
    env, whole = store
    srv = Server(tmp_path, WEB_CONCURRENCY=2, **env).start()
    acknowledged = []
    stop = threading.Event()

    def writer():
        s = requests.Session()
        for i in range(3000):  # bounded even if the kill never lands
            if stop.is_set():
                return
            try:
                r = s.post(srv.url + "/api/v1/intake", json={"workflow": "ext", "payload": {"i": i}},
                           headers=HEADERS, timeout=5)
            except requests.RequestException:
                return
            if r.status_code == 202:
                acknowledged.append(r.json()["job_id"])

    session = requests.Session()
    held = session.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["held"], "lease_seconds": 2},
                        headers=HEADERS, timeout=5)
    assert held.status_code == 204
    held_id = intake(srv, session, "held")
    claimed = session.post(srv.url + "/api/v1/jobs/claim", json={"workflows": ["held"], "lease_seconds": 2},
                           headers=HEADERS, timeout=5).json()["job"]
    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 150, 20, 0.02)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acknowledged) >= 150
    assert whole() == "ok"

    again = Server(tmp_path, WEB_CONCURRENCY=2, **env).start()
    try:
        missing = [j for j in acknowledged if status(again, session, j).get("status") != "queued"]
        assert missing == []
        # The job that was running when the server died comes back when its lease runs out...
        wait_until(lambda: status(again, session, held_id)["status"] == "queued", 15, 0.1)
        s = status(again, session, held_id)
        assert s["status"] == "queued" and s["attempts"] == 1 and s["error"]["type"] == "lease_expired"
        # ...and the old lease cannot touch it.
        r = session.post(again.url + f"/api/v1/jobs/{held_id}/complete",
                         json={"lease_token": claimed["lease_token"], "result": 1}, headers=HEADERS,
                         timeout=5)
        assert r.status_code == 409
    finally:
        again.stop()
    assert whole() == "ok"


def test_a_worker_process_that_dies_mid_job_is_recovered(tmp_path, store):
    env, whole = store
    srv = Server(tmp_path, WEB_CONCURRENCY=1, JOB_LEASE=2, **env).start()
    try:
        session = requests.Session()
        job_id = intake(srv, session, "sleep", {"seconds": 30})
        assert wait_until(lambda: status(srv, session, job_id)["status"] == "running", 10)
        for pid in children(srv.proc.pid):  # the worker, not the master: gunicorn starts another
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = status(srv, session, job_id)
            except requests.RequestException:
                seen = None  # the new worker is still starting
            if seen and seen["attempts"] == 2:
                break
            time.sleep(0.1)
        assert seen and seen["attempts"] == 2 and seen["status"] == "running", seen
        assert session.post(srv.url + f"/api/v1/jobs/{job_id}/cancel", headers=HEADERS,
                            timeout=5).status_code == 200
    finally:
        srv.stop()
    assert whole() == "ok"


def test_finished_jobs_are_purged_after_their_ttl(tmp_path, store):
    env, whole = store
    srv = Server(tmp_path, JOB_TTL=1, PURGE_INTERVAL=0.2, **env).start()
    try:
        session = requests.Session()
        ids = [intake(srv, session, "echo") for _ in range(5)]
        wait_until(lambda: all(session.get(srv.url + f"/api/v1/status/{j}", timeout=5).status_code == 404
                               for j in ids), 30, 0.2)
        assert all(session.get(srv.url + f"/api/v1/status/{j}", timeout=5).status_code == 404 for j in ids)
    finally:
        srv.stop()
