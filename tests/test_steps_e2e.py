"""Durable sleeps through real gunicorn: the pool thread is free while a
job sleeps, the sleep outlives kill -9 with JOB_STORE=sqlite, and with
PostgreSQL a job that went to sleep on one host wakes on another."""

import os

import pytest
import requests

from support import KEY, Server, postgres_url, wait_until

FLOWS = '''
import time

import engine


@engine.workflow("nap", timeout=30)
def nap(payload, ctx):
    went = ctx.step("before", lambda: {"at": time.time(), "pid": __import__("os").getpid()})
    ctx.sleep_for(payload["seconds"])
    return {"went": went, "woke": ctx.step("after", lambda: {"at": time.time(),
                                                             "pid": __import__("os").getpid()})}
'''


def server(tmp_path, **env):
    (tmp_path / "nap_flows.py").write_text(FLOWS)
    return Server(tmp_path, API_KEYS=KEY, WORKER_THREADS=1, WEB_CONCURRENCY=1, SWEEP_INTERVAL=0.05,
                  LEVQOR_WORKFLOWS="nap_flows",
                  PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)


def submit(url, workflow, payload):
    r = requests.post(url + "/api/v1/intake", headers={"X-Api-Key": KEY}, timeout=10,
                      json={"workflow": workflow, "payload": payload})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def status(url, job_id):
    return requests.get(f"{url}/api/v1/status/{job_id}", headers={"X-Api-Key": KEY}, timeout=10).json()


def test_a_sleeping_job_frees_the_only_pool_thread(tmp_path):
    srv = server(tmp_path, JOB_STORE="sqlite").start()
    try:
        sleeper = submit(srv.url, "nap", {"seconds": 2})
        assert wait_until(lambda: status(srv.url, sleeper)["status"] == "waiting", 10)
        other = submit(srv.url, "echo", {"x": 1})  # WORKER_THREADS=1: runs only if the nap let go
        assert wait_until(lambda: status(srv.url, other)["status"] == "succeeded", 10)
        assert status(srv.url, sleeper)["status"] == "waiting"
        assert wait_until(lambda: status(srv.url, sleeper)["status"] == "succeeded", 15)
        job = status(srv.url, sleeper)
        slept = job["result"]["woke"]["at"] - job["result"]["went"]["at"]
        assert 2 <= slept < 10, slept
        assert job["attempts"] == 1 and [s["name"] for s in job["steps"]] == ["before", "wait#1", "after"]
    finally:
        srv.stop()


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_durable_sleep_outlives_kill_9_of_its_host(tmp_path, store):
    """SQLite: the same host restarted on the file; PostgreSQL: another host."""
    env = {"JOB_STORE": "sqlite"} if store == "sqlite" else {"DATABASE_URL": postgres_url()}
    first = server(tmp_path, **env).start()
    sleeper = submit(first.url, "nap", {"seconds": 2})
    try:
        assert wait_until(lambda: status(first.url, sleeper)["status"] == "waiting", 10)
    finally:
        first.kill()
    second = server(tmp_path, **env).start()
    try:
        assert wait_until(lambda: status(second.url, sleeper)["status"] == "succeeded", 20)
        job = status(second.url, sleeper)
        assert job["result"]["woke"]["pid"] != job["result"]["went"]["pid"]
        assert job["result"]["woke"]["at"] - job["result"]["went"]["at"] >= 2
    finally:
        second.stop()


def test_an_event_through_gunicorn_resumes_the_job(tmp_path):
    flows = FLOWS + '''

@engine.workflow("approve.me")
def approve(payload, ctx):
    return ctx.wait_for_event("approved", match={"id": payload["id"]})
'''
    (tmp_path / "nap_flows.py").write_text(flows)
    srv = Server(tmp_path, API_KEYS=KEY, WORKER_THREADS=1, JOB_STORE="sqlite", LEVQOR_WORKFLOWS="nap_flows",
                 PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")).start()
    try:
        job_id = submit(srv.url, "approve.me", {"id": 7})
        assert wait_until(lambda: status(srv.url, job_id)["status"] == "waiting", 10)
        r = requests.post(srv.url + "/api/v1/events", headers={"X-Api-Key": KEY}, timeout=10,
                          json={"name": "approved", "data": {"id": 7, "by": "ada"}})
        assert r.json() == {"resumed": 1}
        assert wait_until(lambda: status(srv.url, job_id)["status"] == "succeeded", 10)
        assert status(srv.url, job_id)["result"] == {"id": 7, "by": "ada"}
    finally:
        srv.stop()
