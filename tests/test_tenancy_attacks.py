"""Attacks from a security review of production mode (LEVQOR_ENV=production,
managed keys, JOB_STORE=sqlite, several gunicorn workers): each test
replays one, in-process where it is about HTTP and real gunicorn where it
is about processes."""

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
