"""GET /metrics: who may read it, the text format (read back by
prometheus_client's parser and, when Debian's prometheus package is there,
promtool), counts that match what each test did, bounded labels, and two
gunicorn workers that answer scrapes with the same, never falling numbers."""

import json
import os
import shutil
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import engine
import metrics
from support import KEY, Client, Server, make_app, wait_until

TOKEN = "scrape-token-0123456789abcdef"


def parse(text):
    """{(sample name, frozenset of labels): value}, through the real parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


@pytest.fixture
def app(tmp_path):
    registry = engine.registry.copy()

    def flaky(payload, ctx):
        ctx.fail("asked to fail")

    registry.register("flaky", flaky, max_cost=0)
    application = make_app(tmp_path, API_KEYS=KEY, METRICS_TOKEN=TOKEN, registry=registry)
    yield application
    application.stop()


def scrape(app, **kw):
    r = Client(app).get("/metrics", **kw)
    assert r.status == 200, r
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return r.body.decode()


@pytest.mark.parametrize("case, kwargs, status", [
    ("nothing", {}, 401),
    ("wrong bearer", {"headers": {"Authorization": "Bearer wrong-token-0123456789"}}, 403),
    ("token as basic", {"headers": {"Authorization": f"Basic {TOKEN}"}}, 403),
    ("wrong key", {"key": "wrong-key-0123456789abcdef"}, 403),
])
def test_metrics_need_an_admin_key_or_the_token(app, case, kwargs, status):
    r = Client(app).get("/metrics", **kwargs)
    assert r.status == status, case
    assert set(r.json()) == {"error", "message", "request_id"}


def test_the_token_and_an_admin_key_may_read_but_a_client_key_may_not(app):
    scrape(app, key=KEY)
    scrape(app, headers={"Authorization": f"Bearer {TOKEN}"})
    client_key = Client(app).post("/api/v1/keys", json={"name": "c", "role": "client"}, key=KEY).json()["key"]
    assert Client(app).get("/metrics", key=client_key).status == 403


def test_counts_match_what_was_done(app):
    api = Client(app)
    for workflow, n in (("echo", 4), ("flaky", 2), ("ext.wait", 3)):
        for _ in range(n):
            assert api.post("/api/v1/intake", json={"workflow": workflow, "payload": {}}, key=KEY).status == 202
    while app.services.engine.run_next():
        pass
    for _ in range(5):
        api.get("/api/v1/status/" + "f" * 32, key=KEY)  # 404s, one route template
    s = parse(scrape(app, key=KEY))
    assert value(s, "levqor_jobs_enqueued_total", workflow="echo") == 4
    assert value(s, "levqor_jobs_enqueued_total", workflow="ext.wait") == 3
    assert value(s, "levqor_jobs_finished_total", workflow="echo", status="succeeded") == 4
    assert value(s, "levqor_jobs_finished_total", workflow="flaky", status="failed") == 2
    assert value(s, "levqor_jobs", status="queued", workflow="ext.wait") == 3
    assert value(s, "levqor_jobs", status="succeeded", workflow="echo") == 4
    assert value(s, "levqor_job_run_seconds_count", workflow="echo") == 4
    assert value(s, "levqor_job_run_seconds_bucket", workflow="echo", le="+Inf") == 4
    assert value(s, "levqor_job_queue_wait_seconds_count", workflow="flaky") == 2
    assert value(s, "levqor_http_requests_total", route="/api/v1/intake", method="POST", status="202") == 9
    assert value(s, "levqor_http_requests_total", route="/api/v1/status/<job_id>", method="GET",
                 status="404") == 5
    assert value(s, "levqor_http_request_duration_seconds_count", route="/api/v1/intake") == 9
    assert value(s, "levqor_build_info", version="1.0.0") == 1
    assert value(s, "levqor_budget_remaining_dollars") == 10
    assert value(s, "levqor_spend_dollars_total") == 0
    assert value(s, "levqor_oldest_queued_job_age_seconds") >= 0
    assert value(s, "levqor_callback_deliveries_total", outcome="delivered") == 0


def test_money_figures_come_from_the_ledger(app):
    api = Client(app)
    job_id = api.post("/api/v1/intake", json={"workflow": "ext.paid", "payload": {}, "max_cost": 0.2},
                      key=KEY).json()["job_id"]
    lease = api.post("/api/v1/jobs/claim", json={"workflows": ["ext.paid"]}, key=KEY).json()["job"]
    api.post(f"/api/v1/jobs/{job_id}/complete", json={"lease_token": lease["lease_token"],
                                                       "result": {}, "cost": 0.125}, key=KEY)
    s = parse(scrape(app, key=KEY))
    assert value(s, "levqor_spend_dollars_total") == 0.125
    assert value(s, "levqor_budget_remaining_dollars") == 9.875


def test_labels_are_bounded(app):
    api = Client(app)
    for i in range(metrics.MAX_WORKFLOWS + 10):
        api.post("/api/v1/intake", json={"workflow": f"ext.w{i}", "payload": {}}, key=KEY)
    api.get("/no/such/path/" + "x" * 50)
    Client(app, lint=False).request("BREW", "/")  # wsgiref.validate warns of any unknown method
    s = parse(scrape(app, key=KEY))
    named = {dict(labels)["workflow"] for name, labels in s if name == "levqor_jobs_enqueued_total"}
    assert len(named) == metrics.MAX_WORKFLOWS + 1 and metrics.OTHER in named
    assert value(s, "levqor_jobs_enqueued_total", workflow=metrics.OTHER) == 10
    gauge = {dict(labels)["workflow"] for name, labels in s if name == "levqor_jobs"}
    assert gauge == named
    routes = {dict(labels)["route"] for name, labels in s if name == "levqor_http_requests_total"}
    assert "unmatched" in routes and not any("x" * 50 in r for r in routes)
    methods = {dict(labels)["method"] for name, labels in s if name == "levqor_http_requests_total"}
    assert "BREW" not in methods and "other" in methods


def test_label_values_are_escaped():
    assert metrics._labels(("route",), ('a"b\\c\nd',)) == '{route="a\\"b\\\\c\\nd"}'


def test_promtool_accepts_the_exposition(app):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: apt-get install prometheus)")
    Client(app).post("/api/v1/intake", json={"workflow": "echo", "payload": {}}, key=KEY)
    while app.services.engine.run_next():
        pass
    text = scrape(app, key=KEY)
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_the_shared_table_is_one_across_forks():
    table = metrics.Table(size=64, shared=True)
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                for _ in range(500):
                    table.add([("c", 1), ("d", 0.5)])
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert table.snapshot() == {"c": 1500, "d": 750}


@pytest.mark.server
@pytest.mark.slow
def test_two_workers_answer_scrapes_with_the_same_rising_numbers(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, JOB_STORE="sqlite", WEB_CONCURRENCY=2, RATE_BURST=10_000,
                 RATE_GLOBAL=10_000, RATE_READ=100_000).start()
    try:
        url, headers = srv.url, {"X-Api-Key": KEY}
        ids = []
        for i in range(20):
            with requests.Session() as s:  # a new connection each: either worker may answer
                r = s.post(url + "/api/v1/intake", json={"workflow": "echo", "payload": {"i": i}},
                           headers=headers, timeout=10)
                assert r.status_code == 202
                ids.append(r.json()["job_id"])
        assert wait_until(lambda: all(requests.get(f"{url}/api/v1/status/{i}", headers=headers, timeout=10)
                                      .json()["status"] == "succeeded" for i in ids), 30)
        counters = ("levqor_http_requests_total", "levqor_jobs_enqueued_total",
                    "levqor_jobs_finished_total", "levqor_http_request_duration_seconds_count")
        last = {}

        def scrapers():  # which workers answered scrapes (the access log names each line's process)
            pids = set()
            for line in srv.log().splitlines():
                if line.startswith("{") and '"path":"/metrics"' in line:
                    pids.add(json.loads(line)["pid"])
            return pids

        # Scrape until both workers have answered (the kernel picks which one
        # accepts a connection, so a short run may meet only one), bounded.
        for scrape in range(300):
            if scrape >= 30 and scrape % 30 == 0 and wait_until(lambda: len(scrapers()) == 2, 1):
                break
            with requests.Session() as s:
                text = s.get(url + "/metrics", headers=headers, timeout=10).text
            samples = parse(text)
            for key, v in samples.items():
                if key[0] in counters and key in last:
                    assert v >= last[key], (key, last[key], v)  # never backwards, never flipping
            last = {k: v for k, v in samples.items() if k[0] in counters}
            assert value(samples, "levqor_jobs_enqueued_total", workflow="echo") == 20
            assert value(samples, "levqor_jobs_finished_total", workflow="echo", status="succeeded") == 20
            assert value(samples, "levqor_jobs", status="succeeded", workflow="echo") == 20
            assert value(samples, "levqor_http_requests_total", route="/api/v1/intake", method="POST",
                         status="202") == 20
        assert wait_until(lambda: len(scrapers()) == 2, 5), "both workers answered scrapes"
    finally:
        srv.stop()
