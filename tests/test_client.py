"""The Python client (clients/python): Client, Worker, verify_webhook and
the levqor command line, against real gunicorn on loopback; the pure parts
again under Python 3.9, and the package installed into a fresh venv."""

import base64
import collections
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support import KEY, ROOT, Server, wait_until

CLIENT_DIR = os.path.join(ROOT, "clients", "python")
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)

import levqor_client  # noqa: E402
from levqor_client import (AuthError, BudgetExceeded, Client, Conflict,  # noqa: E402
                           LevqorConnectionError, LevqorError, NotFound, Permanent, RateLimited, ValidationError,
                           WebhookVerificationError, Worker, verify_webhook)
from levqor_client.errors import error_for  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
FAST = {"API_KEYS": KEY, "RATE_BURST": 100000, "RATE_GLOBAL": 100000, "RATE_READ": 100000,
        "RATE_WORKER": 100000}
# How long the tests' idle workers wait at the server for a job: a claim
# still waiting there when the server is stopped holds up gunicorn's
# graceful stop until it ends, so the tests keep it short.
WAIT = 2


def sign(secret, msg_id, timestamp, body):
    import hashlib
    import hmac
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, **FAST).start()
    yield srv
    srv.stop()


def run_worker(worker, **kw):
    """Worker.run in a thread (signals are the main thread's); its thread."""
    t = threading.Thread(target=worker.run, kwargs={"handle_signals": False, **kw}, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------
# Pure: errors, webhooks, construction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status,code,cls", [
    (401, "unauthorized", AuthError), (403, "forbidden", AuthError), (404, "not_found", NotFound),
    (400, "validation_failed", ValidationError), (422, "idempotency_key_reused", ValidationError),
    (429, "rate_limited", RateLimited), (429, "budget_exceeded", BudgetExceeded),
    (409, "budget_exceeded", BudgetExceeded), (422, "cost_cap_exceeded", BudgetExceeded),
    (409, "lease_lost", Conflict), (503, "queue_full", levqor_client.ServerError),
    (418, "teapot", LevqorError),
])
def test_error_mapping(status, code, cls):
    err = error_for(status, {"error": code, "message": "m", "request_id": "r1"}, None, 3.0)
    assert type(err) is cls and isinstance(err, LevqorError)
    assert (err.code, err.message, err.status, err.request_id, err.retry_after) == (code, "m", status,
                                                                                    "r1", 3.0)


def test_error_without_a_json_body_keeps_the_status_and_header_request_id():
    err = error_for(502, "not json", "hdr-id")
    assert (err.code, err.status, err.request_id) == ("http_502", 502, "hdr-id")


def test_verify_webhook_cases():
    body = b'{"type": "job.succeeded", "data": {"job_id": "j1"}}'
    now = 1_800_000_000
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(now),
               "Webhook-Signature": "v1,bm90LWl0 " + sign(SECRET, "msg_1", now, body)}
    assert verify_webhook(SECRET, headers, body, now=now)["data"]["job_id"] == "j1"
    assert verify_webhook([OTHER_SECRET, SECRET], headers, body, now=now)["type"] == "job.succeeded"
    environ = {"HTTP_WEBHOOK_ID": "msg_1", "HTTP_WEBHOOK_TIMESTAMP": str(now),
               "HTTP_WEBHOOK_SIGNATURE": headers["Webhook-Signature"]}
    assert verify_webhook(SECRET, environ, body, now=now)["type"] == "job.succeeded"
    for case, args in {
        "tampered body": (SECRET, headers, body.replace(b"j1", b"j2"), now),
        "wrong secret": (OTHER_SECRET, headers, body, now),
        "old timestamp": (SECRET, headers, body, now + 301),
        "future timestamp": (SECRET, headers, body, now - 301),
        "no signature header": (SECRET, {k: v for k, v in headers.items()
                                         if k != "Webhook-Signature"}, body, now),
        "not v1": (SECRET, {**headers, "Webhook-Signature": headers["Webhook-Signature"]
                            .replace("v1,", "v2,")}, body, now),
    }.items():
        secret, hdrs, raw, at = args
        with pytest.raises(WebhookVerificationError):
            verify_webhook(secret, hdrs, raw, now=at)
            pytest.fail(case)


def test_client_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LEVQOR_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("LEVQOR_API_KEY", "env-key")
    c = Client()
    assert (c.base_url, c.api_key, c.timeout) == ("http://127.0.0.1:9", "env-key", 10)
    with pytest.raises(ValueError):
        Client("ftp://x")


class ScriptedServer:
    """A loopback server that answers each request with the next of
    ``answers`` (raw bytes), closing the connection after an answer that has
    no length; it counts the connections it accepted."""

    def __init__(self, answers, piece=None):
        self.answers = list(answers)
        self.piece = piece  # send each answer in writes of this many bytes
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as reader:
                while self.answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = reader.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    length = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length:")]
                    reader.read(length[0] if length else 0)
                    answer = self.answers.pop(0)
                    if self.piece:
                        for i in range(0, len(answer), self.piece):
                            conn.sendall(answer[i:i + self.piece])
                            time.sleep(0.001)
                    else:
                        conn.sendall(answer)
                    if b"Content-Length" not in answer and b"chunked" not in answer \
                            and b" 204 " not in answer:
                        break  # a body to the connection's end: close it

    def close(self):
        self.sock.close()


def test_the_connection_reads_chunked_folded_interim_and_close_delimited_answers():
    server = ScriptedServer([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"X-Request-Id: r1\r\n\r\n5;ext=1\r\n{\"a\":\r\n2\r\n1}\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Folded: a\r\n b\r\n\r\n{\"b\": 2}",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"c\": 3}",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 429 Too Many\r\nRetry-After: 0\r\nContent-Length: 25\r\n\r\n"
        b"{\"error\": \"rate_limited\"}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ])
    try:
        c = Client(server.url, KEY)
        assert c.request("GET", "/one") == {"a": 1}
        assert c.request("POST", "/two", {"x": 1}) == {"b": 2}
        assert c.request("GET", "/three") == {"c": 3}      # read to the end; the connection closed
        assert c.request("DELETE", "/four") is None        # on a new connection
        assert c.request("GET", "/five") == {} and c.retries == 1  # the 429 retried, on the same one
        assert server.connections == 2
        for bad in ({"X-Bad": "a\r\nInjected: 1"}, {"X-Bad\n": "a"}):
            with pytest.raises(ValueError):
                c.request("GET", "/six", headers=bad)
        with pytest.raises(ValueError):
            c.request("GET", "/six seven")
    finally:
        server.close()


def test_an_answer_that_arrives_a_few_bytes_at_a_time_reads_the_same():
    """The head is taken whole once its blank line has come, however the
    bytes were split: here a few at a time, with bare LF line ends too."""
    server = ScriptedServer([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-A: 1\r\n\r\n{\"a\": 1}",
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-B: 2\n\n3\r\n{\"b\r\n5\r\n\": 2}\r\n0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
    ], piece=3)
    try:
        c = Client(server.url, KEY)
        assert c.request("GET", "/one") == {"a": 1}
        assert c.request("GET", "/two") == {"b": 2}
        assert c.request("POST", "/three", {}) == {}
        assert server.connections == 1
    finally:
        server.close()


def test_a_head_that_never_ends_or_an_answer_cut_short_is_a_connection_error():
    """A server that sends header lines without end is cut off at a bound
    (the client neither hangs nor holds it all); one that closes mid-answer
    is a connection error, not a half answer taken for a whole one."""
    server = ScriptedServer([
        b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 100000 + b"\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
        # (spelt so that the scripted server closes the connection after it)
        b"HTTP/1.1 200 OK\r\nContent-length: 50\r\n\r\n{\"short\": ",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ])
    try:
        c = Client(server.url, KEY, max_retries=0)
        for path in ("/long", "/many", "/short", "/cut"):
            with pytest.raises(LevqorConnectionError):
                c.request("POST", path, {})
            c.close()  # the next on a fresh connection, as the server closes each of these
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Against gunicorn
# ---------------------------------------------------------------------------


@pytest.mark.server
def test_wait_is_one_call_the_server_holds_until_the_job_ends(server):
    c = Client(server.url, KEY)
    job = c.submit("ext.held", {}, max_cost=0)

    def work():
        time.sleep(0.5)
        with Client(server.url, KEY) as worker:
            taken = worker.claim(["ext.held"])
            worker.complete(taken["job_id"], taken["lease_token"], {"done": True})

    thread = threading.Thread(target=work)
    thread.start()
    answers = []
    final = c.wait(job.job_id, timeout=20, on_poll=answers.append)
    thread.join(10)
    assert final.ok and final.result == {"done": True}
    assert [a.status for a in answers] == ["succeeded"]  # no polling: one answer, when it ended


@pytest.mark.server
def test_submit_wait_round_trip_and_wait_timeout(server):
    c = Client(server.url, KEY)
    job = c.submit("echo", {"hello": "world"}, priority="high", max_cost=0)
    assert job.status == "queued" and job.job_id
    final = c.wait(job.job_id, timeout=20)
    assert final.ok and final.result == {"hello": "world"} and final.workflow == "echo"
    assert c.get(job.job_id).status == "succeeded"
    nobody = c.submit("nobody.runs.this", {})
    with pytest.raises(TimeoutError):
        c.wait(nobody.job_id, timeout=0.5)
    assert c.cancel(nobody.job_id).status == "canceled"
    assert c.retry(nobody.job_id).status == "queued"
    with pytest.raises(NotFound):
        c.get("no-such-job")
    with pytest.raises(AuthError):
        Client(server.url, "wrong-key-0123456789abcdef").submit("echo", {})
    with pytest.raises(ValidationError) as info:
        c.submit("echo", {}, priority="urgent")
    assert info.value.code == "validation_failed" and info.value.request_id


@pytest.mark.server
def test_jobs_follows_every_page_and_the_rest_of_the_api(server):
    c = Client(server.url, KEY)
    ids = {c.submit("page.me", {"i": i}).job_id for i in range(7)}
    listed = list(c.jobs(workflow="page.me", page_size=3))
    assert {j.job_id for j in listed} == ids and len(listed) == 7  # three pages, none twice
    assert [j.created_at for j in listed] == sorted((j.created_at for j in listed), reverse=True)
    assert len(list(c.jobs(workflow="page.me", limit=5, page_size=2))) == 5
    assert c.health()["ok"] is True
    assert c.usage(group_by="workflow")["group_by"] == "workflow"
    made = c.create_key("acme", "client", daily_budget=1)
    assert made["key"].startswith("lq_")
    assert any(k["id"] == made["id"] for k in c.keys())
    assert c.revoke_key(made["id"])["revoked"] is True
    with pytest.raises(AuthError):
        Client(server.url, made["key"]).submit("echo", {})


# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------


class Runs:
    """Counts runs per job id, from any thread; the worker's function."""

    def __init__(self, pause=0.0):
        self.count = collections.Counter()
        self.lock = threading.Lock()
        self.pause = pause

    def __call__(self, payload, ctx):
        with self.lock:
            self.count[ctx.job_id] += 1
            n = self.count[ctx.job_id]
        if self.pause:
            time.sleep(self.pause)
        return {"i": payload["i"], "job_id": ctx.job_id, "run": n}


@pytest.mark.server
@pytest.mark.slow
def test_worker_drains_200_jobs_exactly_once(server):
    c = Client(server.url, KEY)
    ids = [c.submit("ext.count", {"i": i}).job_id for i in range(200)]
    runs = Runs()
    worker = Worker(c, {"ext.count": runs}, concurrency=4, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        assert wait_until(lambda: len(runs.count) == 200, 120, 0.1), len(runs.count)
        for i, job_id in enumerate(ids):
            job = c.wait(job_id, timeout=30)
            assert job.ok and job.result == {"i": i, "job_id": job_id, "run": 1}, job
    finally:
        worker.stop()
        t.join(30)
    assert not t.is_alive()
    assert set(runs.count) == set(ids) and set(runs.count.values()) == {1}
    assert worker.handled == 200 and worker.lost == []


def test_an_idle_worker_runs_each_job_on_the_slot_whose_claim_got_it(server):
    """Jobs one at a time, with pauses longer than a slot's own wake-ups
    (0.2 s): each runs on the thread that claimed it (no hand-off to
    another), and that thread reports it on the connection the claim came
    back on."""
    c = Client(server.url, KEY)
    claimed, ran = {}, {}
    real_claim = c.claim

    def claim(*args, **kwargs):
        answer = real_claim(*args, **kwargs)
        for job in answer if isinstance(answer, list) else [answer] if answer else []:
            claimed[job["job_id"]] = threading.current_thread().name
        return answer

    c.claim = claim
    worker = Worker(c, {"ext.where": lambda payload, ctx: ran.__setitem__(
        ctx.job_id, threading.current_thread().name)}, concurrency=4, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        for i in range(5):
            assert c.wait(c.submit("ext.where", {"i": i}).job_id, timeout=30).ok
            time.sleep(0.3)
    finally:
        worker.stop()
        t.join(30)
    assert len(ran) == 5 and ran == claimed, (ran, claimed)
    assert set(ran.values()) <= {f"levqor-worker-{i}" for i in range(4)}


def test_a_job_queued_while_another_runs_starts_on_an_idle_slot_at_once(server):
    """The claim for the slots still idle waits a moment after a claim got
    a job (GATHER), and no longer: a second job, queued while the first one
    runs on, starts beside it, not after it."""
    c = Client(server.url, KEY)
    release, started = threading.Event(), threading.Event()

    def slow(payload, ctx):
        started.set()
        assert release.wait(30)

    worker = Worker(c, {"ext.slow": slow, "ext.quick": lambda payload, ctx: "done"},
                    concurrency=2, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        first = c.submit("ext.slow", {}).job_id
        assert started.wait(30)
        second = c.submit("ext.quick", {}).job_id
        assert c.wait(second, timeout=10).result == "done"
        assert c.get(first).status == "running"
    finally:
        release.set()
        worker.stop()
        t.join(30)
    assert c.wait(first, timeout=10).ok and worker.handled == 2


def test_a_worker_holds_no_jobs_ready_while_a_slot_is_idle(server):
    """A fast job queues nine slow ones just before it ends, while the other
    slot's claim is on its way to the server (late, here): the report claims
    its slot's next job, not eight more held ready, which that claim, once
    it waits at the server with nothing left to take, could not reach: they
    would run one after another on the first slot."""
    c = Client(server.url, KEY)
    starts = []

    class LateClaims(Client):
        def claim(self, *args, **kwargs):
            time.sleep(0.3)
            return super().claim(*args, **kwargs)

    def fan_out(payload, ctx):
        if payload.get("fan_out"):
            c.submit_many([{"workflow": "ext.slow", "payload": {}} for _ in range(9)])

    def slow(payload, ctx):
        starts.append((time.monotonic(), threading.current_thread().name))
        time.sleep(0.3)

    worker = Worker(LateClaims(server.url, KEY), {"ext.fan": fan_out, "ext.slow": slow},
                    concurrency=2, claim_wait=10)
    worker.GATHER, worker.FAST = 0.0, 5.0  # the next claim at once; every job counts as fast
    t = run_worker(worker)
    try:
        assert c.wait(c.submit("ext.fan", {}).job_id, timeout=30).ok  # a report with claim_next
        time.sleep(0.5)  # a claim waits at the server
        assert c.wait(c.submit("ext.fan", {"fan_out": True}).job_id, timeout=30).ok
        deadline = time.monotonic() + 30
        while len(starts) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
        t.join(30)
    first, second = sorted(starts)[:2]
    assert first[1] != second[1] and second[0] - first[0] < 1.0, sorted(starts)


def test_a_worker_s_steps_run_once_across_attempts_and_are_charged_once(server):
    c = Client(server.url, KEY)
    calls = collections.Counter()

    def chain(payload, ctx):
        def fetch():
            calls["fetch"] += 1
            return {"rows": 3}

        def summarise(rows):
            calls["summarise"] += 1
            ctx.charge(0.02)
            return f"{rows['rows']} rows"
        rows = ctx.step("fetch", fetch)
        summary = ctx.step("summarise", summarise, rows)
        calls["after"] += 1
        if calls["after"] == 1:
            raise RuntimeError("the post failed")  # the attempt fails after two steps
        return {"summary": summary}

    job_id = c.submit("ext.chain", {}, max_cost=0.1).job_id
    worker = Worker(c, {"ext.chain": chain}, concurrency=1, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        job = c.wait(job_id, timeout=60)
    finally:
        worker.stop()
        t.join(30)
    assert job.ok and job.result == {"summary": "3 rows"}, job
    assert calls == {"fetch": 1, "summarise": 1, "after": 2}  # the retry replayed both steps
    assert job.attempts == 2 and job.cost["spent"] == pytest.approx(0.02)  # charged once
    assert [(s["name"], s["cost"]) for s in job.raw["steps"]] == [("fetch", 0), ("summarise", 0.02)]
    by_step = c.usage(group_by="step")
    assert {g["step"]: g["spend"] for g in by_step["groups"]}.get("summarise") == pytest.approx(0.02)


def test_a_recorded_step_is_replayed_and_a_name_used_twice_is_permanent():
    from levqor_client.worker import JobContext
    ctx = JobContext({"job_id": "j", "workflow": "w", "attempt": 2, "lease_token": "t",
                      "steps": {"fetch": {"rows": 3}}})
    assert ctx.step("fetch", lambda: pytest.fail("a recorded step must not run")) == {"rows": 3}
    with pytest.raises(Permanent, match="used twice"):
        ctx.step("fetch", lambda: None)
    with pytest.raises(RuntimeError, match="client"):  # a new step needs the server to record it
        ctx.step("other", lambda: 1)


@pytest.mark.server
def test_a_worker_reports_its_attempt_on_top_of_what_earlier_ones_spent():
    from levqor_client.worker import JobContext
    ctx = JobContext({"job_id": "j", "workflow": "w", "attempt": 2, "lease_token": "t",
                      "cost_spent": 0.3})
    assert ctx.cost is None  # nothing charged by this attempt: nothing to report
    ctx.charge(0.2)
    assert ctx.cost == 0.5


def test_worker_heartbeats_charges_fails_and_sees_cancel(tmp_path):
    srv = Server(tmp_path, JOB_BACKOFF=1, JOB_BACKOFF_CAP=1, **FAST).start()
    c = Client(srv.url, KEY)
    canceled_seen = threading.Event()

    def slow(payload, ctx):  # outlives its 1 s lease three times over
        ctx.charge(0.01)
        time.sleep(0.5)
        ctx.charge(0.02)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            time.sleep(0.05)
        return {"attempt": ctx.attempt}

    def bad(payload, ctx):
        if payload["permanent"]:
            raise Permanent("no such account")
        raise ValueError("flaky")

    def endless(payload, ctx):
        assert wait_until(lambda: ctx.canceled, 30, 0.05)
        canceled_seen.set()
        return None

    worker = Worker(c, {"w.slow": slow, "w.bad": bad, "w.endless": endless}, concurrency=4,
                    lease_seconds=1, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        slow_id = c.submit("w.slow", {}, max_cost=0.1).job_id
        perm = c.submit("w.bad", {"permanent": True}).job_id
        flaky = c.submit("w.bad", {"permanent": False}).job_id
        endless_id = c.submit("w.endless", {}).job_id
        job = c.wait(slow_id, 30)
        assert job.ok and job.result == {"attempt": 1} and job.attempts == 1, job
        assert job.cost["spent"] == 0.03
        job = c.wait(perm, 30)
        assert job.status == "failed" and job.attempts == 1
        assert job.error["message"] == "Permanent: no such account", job.error
        job = c.wait(flaky, 30)
        assert job.status == "failed" and job.attempts == 3 and "ValueError: flaky" in job.error["message"]
        assert wait_until(lambda: c.get(endless_id).status == "running", 10, 0.05)
        c.cancel(endless_id)
        assert canceled_seen.wait(30)
        assert c.wait(endless_id, 30).status == "canceled"
    finally:
        worker.stop()
        t.join(30)
        srv.stop()
    assert not t.is_alive()


def crash(srv):
    """kill -9 master and workers (Server.kill), and let go of the log."""
    srv.kill()
    srv.log_file.close()


@pytest.mark.server
@pytest.mark.slow
def test_worker_carries_on_through_a_server_restart(tmp_path):
    """kill -9 mid-drain, start again on the same port and database: every
    job finishes. A job runs twice only if its lease was lost mid-run: here
    the jobs in hand when the server died, kept down past their 2 s lease
    (or one whose completion was committed but never answered). The worker
    lists each such job in ``lost``."""
    env = {**FAST, "JOB_STORE": "sqlite"}
    srv = Server(tmp_path, **env).start()
    c = Client(srv.url, KEY, retry_time=5)
    ids = [c.submit("ext.restart", {"i": i}).job_id for i in range(120)]
    runs = Runs(pause=0.02)
    worker = Worker(Client(srv.url, KEY, timeout=2, retry_time=3), {"ext.restart": runs},
                    concurrency=4, lease_seconds=2, claim_wait=WAIT)
    t = run_worker(worker)
    again = None
    try:
        assert wait_until(lambda: len(runs.count) >= 30, 60, 0.01)
        crash(srv)
        done_before = len(runs.count)
        # Down long enough that the jobs in hand lose their leases: the
        # worker gives up reporting them, and the server hands them out again.
        assert wait_until(lambda: worker.lost, 30, 0.05)
        again = Server(tmp_path, **env)
        again.port, again.url, again.env["PORT"] = srv.port, srv.url, str(srv.port)
        again.start()
        for i, job_id in enumerate(ids):
            job = c.wait(job_id, timeout=60)
            assert job.ok and job.result["i"] == i, job
    finally:
        worker.stop()
        t.join(30)
        (again or srv).stop()
    assert done_before < 120, "the kill came after the drain"
    assert set(runs.count) == set(ids)
    twice = {j for j, n in runs.count.items() if n > 1}
    assert twice <= set(worker.lost), (twice, worker.lost)
    assert all(n <= 2 for n in runs.count.values())


@pytest.mark.server
def test_a_429_is_retried_after_retry_after(tmp_path):
    # 60 writes a minute: the 61st submit is refused with Retry-After: 1.
    srv = Server(tmp_path, API_KEYS=KEY, RATE_BURST=60).start()
    try:
        c = Client(srv.url, KEY)
        for i in range(60):
            c.submit("nobody.runs.this", {"i": i})
        assert c.retries == 0
        job = c.submit("nobody.runs.this", {"i": 60})
        assert c.retries >= 1 and job.status == "queued"
        impatient = Client(srv.url, KEY, max_retries=0)
        with pytest.raises(RateLimited) as info:
            for i in range(100):
                impatient.submit("nobody.runs.this", {"i": i})
        assert info.value.retry_after >= 1 and info.value.status == 429
    finally:
        srv.stop()


class Relay:
    """A loopback TCP proxy in front of the server. It drops the first
    ``drops`` connections once the server's answer starts, so the request
    has acted and its sender never hears of it; it holds each piece of an
    answer ``delay`` seconds, as a slow network would; a client's
    half-close reaches the server as one."""

    def __init__(self, target_port, drops=1, delay=0.0):
        self.target_port, self.drops, self.delay = target_port, drops, delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                downstream, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            drop = self.dropped < self.drops
            self.dropped += drop
            threading.Thread(target=self._pump, args=(downstream, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, drop, self.delay, True),
                             daemon=True).start()

    @staticmethod
    def _pump(src, dst, drop=False, delay=0.0, answers=False):
        try:
            while True:
                data = src.recv(65536)
                if not data and not answers:  # the client is done sending
                    dst.shutdown(socket.SHUT_WR)
                    return
                if not data or drop:
                    break
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


@pytest.mark.server
def test_an_intake_retried_after_a_dropped_connection_makes_one_job(server):
    proxy = Relay(server.port)
    try:
        c = Client(proxy.url, KEY)
        job = c.submit("dropped.once", {"n": 1})
        assert proxy.dropped == 1 and c.retries == 1
        listed = list(Client(server.url, KEY).jobs(workflow="dropped.once"))
        assert [j.job_id for j in listed] == [job.job_id]
        # A claim is never sent again: it could take a job nobody would run.
        proxy.drops = 2
        c.close()  # so the claim goes over a new connection, one that is dropped
        with pytest.raises(levqor_client.LevqorConnectionError):
            c.claim(["dropped.once"])
    finally:
        proxy.close()


class Counting(Client):
    """A Client that counts its calls by method and the path's last segment."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = collections.Counter()
        self.calls_lock = threading.Lock()

    def request(self, method, path, *args, **kw):
        with self.calls_lock:
            self.calls[method, path.rsplit("/", 1)[-1]] += 1
            if path.endswith("/jobs/report"):
                self.calls["reported"] += len(args[0]["reports"])  # jobs reported together
        return super().request(method, path, *args, **kw)


# ---------------------------------------------------------------------------
# Batches, batched and blocking claims, claim_next
# ---------------------------------------------------------------------------


@pytest.mark.server
def test_submit_many_answers_in_order_in_chunks_and_is_refused_a_batch_at_a_time(server):
    c = Counting(server.url, KEY)
    made = c.submit_many([{"workflow": "many.order", "payload": {"i": i}, "priority": "high"}
                          for i in range(7)], batch_size=3)
    assert [j.status for j in made] == ["queued"] * 7 and c.calls["POST", "batch"] == 3
    claimed = c.claim(["many.order"], max_jobs=10)
    assert {j["job_id"]: j["payload"]["i"] for j in claimed} == {j.job_id: i for i, j in enumerate(made)}
    assert {j["priority"] for j in claimed} == {"high"}
    big = c.submit_many([{"workflow": "many.big", "payload": {}}] * 1001)  # two calls: 1000 and 1
    assert len({j.job_id for j in big}) == 1001 and c.calls["POST", "batch"] == 5
    again = c.submit_many([{"workflow": "many.once", "payload": {}, "idempotency_key": "k-1"}])
    assert c.submit_many([{"workflow": "many.once", "payload": {},
                           "idempotency_key": "k-1"}])[0].job_id == again[0].job_id
    specs = [{"workflow": "many.bad", "payload": {"i": i}} for i in range(6)]
    specs[4]["priority"] = "urgent"
    with pytest.raises(ValidationError) as info:
        c.submit_many(specs, batch_size=3)
    assert info.value.index == 4 and len(info.value.accepted) == 3  # the first batch was made
    assert len(list(c.jobs(workflow="many.bad"))) == 3               # the second, not a job of it
    with pytest.raises(TypeError):
        c.submit_many([{"workflow": "many.bad", "payload": {}, "colour": "red"}])
    assert c.submit_many([]) == [] and c.calls["POST", "batch"] == 9


class OlderServer(Counting):
    """A client of a server from before batches had keys of their own: it
    refuses one as that server did, and records what each batch carried."""

    def request(self, method, path, *args, **kw):
        if path.endswith("/intake/batch"):
            body = args[0]
            self.calls["keys"] = ("idempotency_key" in body,  # the batch's key; each job's
                                  all("idempotency_key" in j for j in body["jobs"]))
            if "idempotency_key" in body:
                self.calls["POST", "batch"] += 1
                raise levqor_client.errors.error_for(400, {
                    "error": "validation_failed", "field": "idempotency_key",
                    "message": "idempotency_key: is not an accepted field"}, None)
        return super().request(method, path, *args, **kw)


@pytest.mark.server
def test_a_batch_has_one_key_of_its_own_or_from_an_older_server_one_a_job(server, monkeypatch):
    sent = []
    request = levqor_client.Client.request
    monkeypatch.setattr(levqor_client.Client, "request",
                        lambda self, method, path, body=None, **kw:
                        sent.append(body) or request(self, method, path, body, **kw))
    c = Client(server.url, KEY)
    made = c.submit_many([{"workflow": "many.keyed", "payload": {"i": i}} for i in range(3)])
    assert set(sent[-1]) == {"jobs", "idempotency_key"}  # one key, for the batch
    assert not any("idempotency_key" in j for j in sent[-1]["jobs"])
    # A job with a key of its own keeps it, and then each of the others gets one.
    c.submit_many([{"workflow": "many.keyed", "payload": {}, "idempotency_key": "mine"},
                   {"workflow": "many.keyed", "payload": {}}])
    assert set(sent[-1]) == {"jobs"} and sent[-1]["jobs"][0]["idempotency_key"] == "mine"
    assert all(len(j["idempotency_key"]) == 32 for j in sent[-1]["jobs"][1:])
    assert len(made) == 3 and len(list(c.jobs(workflow="many.keyed"))) == 5
    older = OlderServer(server.url, KEY)
    for _ in range(2):  # refused once; from then on each job has a key
        assert len(older.submit_many([{"workflow": "many.older", "payload": {}}] * 2)) == 2
        assert older.calls["keys"] == (False, True)
    assert older.calls["POST", "batch"] == 3 and len(list(c.jobs(workflow="many.older"))) == 4


@pytest.mark.server
def test_a_batch_retried_after_a_dropped_connection_makes_each_job_once(server):
    proxy = Relay(server.port)
    try:
        c = Client(proxy.url, KEY)
        made = c.submit_many([{"workflow": "many.dropped", "payload": {"i": i}} for i in range(3)])
        assert proxy.dropped == 1 and c.retries == 1
        listed = Client(server.url, KEY).jobs(workflow="many.dropped")
        assert sorted(j.job_id for j in listed) == sorted(j.job_id for j in made)
        proxy.drops = 2  # without keys, a batch is not sent again: it may have been made
        c.close()
        with pytest.raises(levqor_client.LevqorConnectionError):
            c.submit_many([{"workflow": "many.dropped", "payload": {}}], idempotent=False)
    finally:
        proxy.close()


@pytest.mark.server
def test_claim_many_a_blocking_claim_claim_next_and_interrupt(server):
    c = Client(server.url, KEY)
    c.submit_many([{"workflow": "many.claim", "payload": {"i": i}} for i in range(5)])
    first = c.claim(["many.claim"], max_jobs=3)
    assert len(first) == 3 and all(j["lease_token"] for j in first)
    assert len(c.claim(["many.claim"], max_jobs=3)) == 2
    assert c.claim(["many.claim"], max_jobs=3) == []
    started = time.monotonic()
    assert c.claim(["many.claim"], wait=0.5) is None  # 204 once the wait is over
    assert time.monotonic() - started >= 0.45
    threading.Timer(0.3, lambda: Client(server.url, KEY).submit("many.claim", {"i": 99})).start()
    started = time.monotonic()
    got = c.claim(["many.claim"], max_jobs=5, wait=10)
    assert [j["payload"] for j in got] == [{"i": 99}] and time.monotonic() - started < 5
    c.submit("many.claim", {"i": 100})
    done, following = c.complete(got[0]["job_id"], got[0]["lease_token"], {"ok": True},
                                 claim_next=["many.claim"])
    assert done.status == "succeeded" and following["payload"] == {"i": 100}
    failed, following = c.fail(following["job_id"], following["lease_token"], "no", retryable=False,
                               claim_next={"workflows": ["many.claim"], "lease_seconds": 5})
    assert failed.status == "failed" and following is None
    assert c.complete(first[0]["job_id"], first[0]["lease_token"], None).status == "succeeded"
    ended = []

    t = threading.Thread(target=lambda: ended.append(c.claim(["many.nobody"], wait=10)))
    t.start()
    assert wait_until(lambda: c.interrupt(t), 5, 0.01)
    started = time.monotonic()
    t.join(5)
    assert not t.is_alive() and ended == [None] and time.monotonic() - started < 1
    c.submit("many.nobody", {})  # the interrupted claim took nothing, nor takes it now
    assert [j["payload"] for j in c.claim(["many.nobody"], max_jobs=5)] == [{}]


@pytest.mark.server
def test_an_interrupted_claim_keeps_the_job_handed_out_as_it_came(server):
    """The job the server hands out just as the claim is interrupted comes
    back with it: cutting the connection lost it until its lease ran out,
    and a worker stopped at that moment left it unrun (a test failed so)."""
    relay = Relay(server.port, drops=0, delay=0.5)  # each answer half a second late
    try:
        c = Client(relay.url, KEY)
        got = []
        t = threading.Thread(target=lambda: got.append(c.claim(["many.late"], max_jobs=5, wait=10)))
        t.start()
        job_id = Client(server.url, KEY).submit("many.late", {"i": 1}).job_id
        assert wait_until(lambda: Client(server.url, KEY).get(job_id).status == "running", 5, 0.02)
        assert c.interrupt(t) == 1  # the answer is still on its way
        t.join(5)
        assert not t.is_alive() and [[j["job_id"] for j in jobs] for jobs in got] == [[job_id]]
    finally:
        relay.close()


@pytest.mark.server
def test_an_idle_worker_waits_at_the_server_and_a_busy_one_makes_a_call_per_job_at_most(server):
    c = Client(server.url, KEY)
    counting = Counting(server.url, KEY)
    runs = Runs()
    worker = Worker(counting, {"ext.fast": runs}, concurrency=2, claim_wait=WAIT)
    t = run_worker(worker)
    try:
        time.sleep(1.5)  # idle: a polling worker would have claimed five or six times by now
        assert counting.calls["POST", "claim"] <= 2, counting.calls
        sent = time.monotonic()
        job_id = c.submit("ext.fast", {"i": 0}).job_id
        assert wait_until(lambda: runs.count[job_id], 5, 0.005)
        assert time.monotonic() - sent < 0.5  # not a poll's backoff away
        claims = counting.calls["POST", "claim"]
        ids = [j.job_id for j in c.submit_many([{"workflow": "ext.fast", "payload": {"i": i}}
                                                for i in range(1, 101)])]
        for i, job_id in enumerate(ids, 1):
            assert c.wait(job_id, 30).result["i"] == i
        calls = counting.calls
        assert calls["POST", "complete"] + calls["reported"] == 101  # each reported once
        assert calls["POST", "complete"] + calls["POST", "report"] <= 101
        assert counting.calls["POST", "heartbeat"] == 0  # none due: no job ran for 20 s
        assert counting.calls["POST", "claim"] - claims <= 10, counting.calls  # the rest came with completions
        stopped = time.monotonic()
    finally:
        worker.stop()
        t.join(30)
    assert not t.is_alive() and time.monotonic() - stopped < 3  # its waiting claim was ended
    assert worker.handled == 101 and set(runs.count.values()) == {1}


class Older(Counting):
    """A client of a server without POST /api/v1/jobs/report."""

    def request(self, method, path, *args, **kw):
        if path.endswith("/jobs/report"):
            raise levqor_client.NotFound("no such endpoint", code="not_found", status=404)
        return super().request(method, path, *args, **kw)


def counted_drain(server, workflow, concurrency, client=Counting, gather=None):
    """200 no-op jobs run by a Worker of ``concurrency`` slots through a
    ``client`` that counts its calls: its counts, once every job is seen
    done, in order, run once, none lost. (``gather``: Worker.GATHER.)"""
    c = Client(server.url, KEY)
    ids = [j.job_id for j in c.submit_many([{"workflow": workflow, "payload": {"i": i}}
                                            for i in range(200)])]
    counting, runs = client(server.url, KEY), Runs()
    worker = Worker(counting, {workflow: runs}, concurrency=concurrency, claim_wait=WAIT)
    if gather is not None:
        worker.GATHER = gather
    t = run_worker(worker)
    try:
        for i, job_id in enumerate(ids):
            assert c.wait(job_id, 30).result["i"] == i
    finally:
        worker.stop()
        t.join(30)
    assert worker.handled == 200 and worker.lost == [] and set(runs.count.values()) == {1}
    assert counting.calls["POST", "complete"] + counting.calls["reported"] == 200, counting.calls
    return counting.calls


@pytest.mark.server
@pytest.mark.parametrize("client", [Counting, Older])
def test_reports_of_slots_that_finish_together_go_in_one_call(server, client):
    calls = counted_drain(server, f"ext.together.{client.__name__.lower()}", 4, client)
    if client is Older:  # each on its own, as before
        assert calls["POST", "complete"] == 200 and calls["POST", "report"] == 0
    else:  # some went together, each call with the next jobs of its slots
        assert calls["reported"] > calls["POST", "report"] > 0, calls
        assert calls["POST", "claim"] < 20, calls


@pytest.mark.server
def test_a_report_waits_for_the_other_slots_that_just_started_a_job(server):
    # Slots whose jobs end within moments of each other send one call, not
    # one as soon as the first is done and another with the rest. (GATHER is
    # widened so that a loaded machine's slow thread wake-ups cannot split them.)
    calls = counted_drain(server, "ext.gather", 4, gather=0.5)
    assert calls["POST", "report"] + calls["POST", "complete"] <= 200 / 3.5, calls  # four a call, but for a few


@pytest.mark.server
def test_a_fast_slot_holds_its_next_jobs_and_reports_them_together(server):
    # One slot, yet several jobs a call: each call claims HOLD more than it needs.
    calls = counted_drain(server, "ext.hold", 1)
    assert calls["POST", "report"] + calls["POST", "complete"] <= 200 / 5, calls


def slow_fifth(server, workflow, slow_for, **options):
    """Twelve jobs for a worker of one slot: job 5 runs ``slow_for``
    seconds, the others return at once. (client, job ids, worker, runs by
    the job's i, an Event set as job 5 starts.) Job 1's report claims 2-10
    ahead, and 2, 3 and 4 leave their reports for a later call."""
    c = Client(server.url, KEY)
    ids = [j.job_id for j in c.submit_many([{"workflow": workflow, "payload": {"i": i}}
                                            for i in range(12)])]
    runs, slow = collections.Counter(), threading.Event()

    def work(payload, ctx):
        runs[payload["i"]] += 1
        if payload["i"] == 5:
            slow.set()
            time.sleep(slow_for)
        return {"i": payload["i"]}

    worker = Worker(Client(server.url, KEY), {workflow: work}, concurrency=1, claim_wait=WAIT, **options)
    return c, ids, worker, runs, slow


@pytest.mark.server
def test_jobs_held_behind_a_slow_one_keep_their_leases_and_reports_before_it_go_meanwhile(server):
    # 2 s leases, and job 5 runs 3 s: the held 6-10 keep their leases by
    # heartbeats, and the waiting reports are sent meanwhile, not when 5 is done.
    c, ids, worker, runs, _ = slow_fifth(server, "ext.held", 3, lease_seconds=2)
    t = run_worker(worker)
    try:
        assert c.wait(ids[4], 2).ok  # sent while 5 still runs
        assert c.get(ids[5]).status == "running"
        assert [c.wait(job_id, 30).result["i"] for job_id in ids] == list(range(12))
    finally:
        worker.stop()
        t.join(30)
    assert worker.lost == [] and runs == collections.Counter(range(12))  # each once


@pytest.mark.server
def test_held_jobs_a_stopped_worker_never_ran_go_back_when_their_leases_lapse(server):
    # Stopped while job 5 runs past its grace, the worker leaves with jobs
    # 6-10 held: their heartbeats stop, so the server hands them out again.
    c, ids, worker, _, slow = slow_fifth(server, "ext.left", 4, lease_seconds=1, grace=0.2)
    t = run_worker(worker)
    assert slow.wait(10)
    time.sleep(1)  # the held jobs' heartbeats have begun
    worker.stop()
    t.join(10)
    assert not t.is_alive()
    held = [c.get(job_id) for job_id in ids[6:11]]
    assert {job.status for job in held} == {"running"}  # held by the worker when it left
    assert wait_until(lambda: all(c.get(job_id).status == "queued" for job_id in ids[6:11]), 10)


@pytest.mark.server
def test_a_worker_of_many_slots_sends_at_most_a_hundred_reports_a_call(server):
    c = Client(server.url, KEY)
    ids = [j.job_id for j in c.submit_many([{"workflow": "ext.many", "payload": {"i": i}}
                                            for i in range(600)])]
    sizes = []

    class Sizes(Client):
        def request(self, method, path, *args, **kw):
            if path.endswith("/jobs/report"):
                sizes.append(len(args[0]["reports"]))
            return super().request(method, path, *args, **kw)

    worker = Worker(Sizes(server.url, KEY), {"ext.many": Runs()}, concurrency=150, claim_wait=WAIT)
    worker.GATHER = 0.5  # the slots' reports gather, past what one call may carry
    t = run_worker(worker)
    try:
        assert all(c.wait(job_id, 60).ok for job_id in ids)
    finally:
        worker.stop()
        t.join(30)
    assert worker.lost == [] and max(sizes) == 100, sizes


@pytest.mark.server
def test_a_worker_claims_no_more_than_max_jobs_and_leaves_when_idle(server):
    c = Client(server.url, KEY)
    ids = [j.job_id for j in c.submit_many([{"workflow": "ext.some", "payload": {"i": i}}
                                            for i in range(5)])]
    runs = Runs()
    assert Worker(c, {"ext.some": runs}, concurrency=2).run(max_jobs=3, handle_signals=False) == 3
    assert sorted(c.get(j).status for j in ids) == ["queued"] * 2 + ["succeeded"] * 3
    started = time.monotonic()
    worker = Worker(c, {"ext.some": runs}, concurrency=2)
    assert worker.run(idle_exit=0.5, handle_signals=False) == 2
    assert time.monotonic() - started < 5 and len(runs.count) == 5


class OldServer(http.server.ThreadingHTTPServer):
    """The worker protocol as it was before batched and blocking claims and
    claim_next: it refuses those fields as unknown, as that server did."""

    def __init__(self, jobs):
        self.queue = collections.deque(jobs)
        self.refused = collections.Counter()
        self.done = []
        super().__init__(("127.0.0.1", 0), OldHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()


class OldHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        old = self.server
        unknown = sorted(set(body) - {"workflows", "lease_seconds", "lease_token", "result", "cost",
                                      "error", "retryable"})
        if unknown:
            old.refused[unknown[0]] += 1
            return self.answer(400, {"error": "validation_failed", "field": unknown[0],
                                     "message": f"{unknown[0]}: is not an accepted field"})
        if self.path.endswith("/claim"):
            if not old.queue:
                return self.answer(204, None)
            i = old.queue.popleft()
            return self.answer(200, {"job": {"job_id": f"j{i}", "workflow": "old.flow",
                                             "payload": {"i": i}, "lease_token": f"t{i}",
                                             "attempt": 1}})
        old.done.append(self.path.split("/")[-2])
        return self.answer(200, {"job": {"job_id": self.path.split("/")[-2], "status": "succeeded"}})

    def answer(self, status, body):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_worker_falls_back_to_one_claim_at_a_time_on_an_older_server():
    old = OldServer(range(6))
    try:
        worker = Worker(Client(old.url, KEY), {"old.flow": Runs()}, concurrency=2, idle_max=0.05)
        assert worker.run(idle_exit=0.5, handle_signals=False) == 6
        assert sorted(old.done) == [f"j{i}" for i in range(6)]
        assert old.refused == {"max_jobs": 1, "claim_next": 1}, old.refused  # each asked once
    finally:
        old.close()


# ---------------------------------------------------------------------------
# A real delivery, verified
# ---------------------------------------------------------------------------


@pytest.mark.server
def test_verify_webhook_accepts_a_real_delivery(tmp_path):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers.items()), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    srv = Server(tmp_path, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE=1, **FAST).start()
    try:
        c = Client(srv.url, KEY)
        url = f"http://localhost:{receiver.server_address[1]}/hook"
        job = c.submit("echo", {"x": 1}, callback_url=url)
        assert wait_until(lambda: received, 30, 0.05)
        headers, body = received[0]
        event = verify_webhook(SECRET, headers, body)
        assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job.job_id
        assert verify_webhook([OTHER_SECRET, SECRET], headers, body)["data"]["result"] == {"x": 1}
        stamp = int(headers["webhook-timestamp"])
        for secret, raw, now in [(SECRET, body.replace(b'"x": 1', b'"x": 2').replace(b'"x":1', b'"x":2'),
                                  None),
                                 (OTHER_SECRET, body, None),
                                 (SECRET, body, stamp + 301)]:
            assert raw is body or raw != body
            with pytest.raises(WebhookVerificationError):
                verify_webhook(secret, headers, raw, now=now)
        assert wait_until(lambda: c.get(job.job_id).callback["state"] == "delivered", 10, 0.05)
        c.redeliver(job.job_id)
        assert wait_until(lambda: len(received) == 2, 30, 0.05)
        assert verify_webhook(SECRET, *received[1])["data"]["job_id"] == job.job_id
    finally:
        srv.stop()
        receiver.shutdown()
        receiver.server_close()


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def levqor(url, *args, key=KEY, stdin=None, cwd=None, timeout=60):
    """Run ``python -m levqor_client``; (exit code, stdout, stderr)."""
    env = {**os.environ, "LEVQOR_URL": url, "LEVQOR_API_KEY": key,
           "PYTHONPATH": CLIENT_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "levqor_client", *args], env=env, input=stdin,
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def test_cli_usage_errors_and_help_on_every_command():
    from levqor_client import cli
    parser = cli._parser()
    args = parser.parse_args(["submit", "echo", "--payload", '{"a": 1}', "--priority", "high",
                              "--max-cost", "0.5", "--wait"])
    assert (args.workflow, args.payload, args.priority, args.max_cost, args.wait) == (
        "echo", {"a": 1}, "high", 0.5, True)
    assert parser.parse_args(["jobs", "--status", "failed", "--limit", "3", "--json"]).limit == 3
    assert parser.parse_args(["cancel", "a", "b"]).ids == ["a", "b"]
    url = "http://127.0.0.1:9"
    for bad in (["submit", "echo", "--payload", "{nope"], ["submit", "echo", "--payload", "[1]"],
                ["submit", "echo", "--payload", "@/no/such/file"], ["jobs", "--status", "odd"],
                ["frobnicate"], []):
        code, _, err = levqor(url, *bad)
        assert code == 2, (bad, err)
    for command in ([], ["submit"], ["status"], ["wait"], ["jobs"], ["cancel"], ["retry"],
                    ["usage"], ["keys"], ["worker"], ["health"]):
        code, out, _ = levqor(url, *command, "--help")
        assert code == 0 and "usage: levqor" in out, command
        assert "examples:" in out, command
    code, _, err = levqor(url, "health")  # nothing listens on port 9
    assert code == 3 and "connection_error" in err


WORKERS_MODULE = '''
from levqor_client import Permanent

def shout(payload, ctx):
    if payload.get("fail"):
        raise Permanent("asked to fail")
    return {"text": payload["text"].upper(), "attempt": ctx.attempt}

REGISTRY = {"cli.shout": shout}
'''


@pytest.mark.server
def test_cli_commands_and_exit_codes(server, tmp_path):
    url = server.url
    code, out, _ = levqor(url, "health")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, err = levqor(url, "submit", "echo", "--payload", '{"a": 1}', "--wait")
    assert code == 0 and json.loads(out[out.index("{"):])["result"] == {"a": 1}, (out, err)
    (tmp_path / "p.json").write_text('{"text": "hi"}')
    code, shout_id, _ = levqor(url, "submit", "cli.shout", "--payload", f"@{tmp_path / 'p.json'}")
    shout_id = shout_id.strip()
    code, fail_id, _ = levqor(url, "submit", "cli.shout", "--payload", "-", stdin='{"fail": true}')
    fail_id = fail_id.strip()
    assert code == 0 and shout_id and fail_id
    code, out, err = levqor(url, "wait", shout_id, "--wait-timeout", "0.3")
    assert code == 4 and f"{shout_id} queued" in out and "still queued" in err
    (tmp_path / "cli_workers.py").write_text(WORKERS_MODULE)
    code, out, err = levqor(url, "worker", "cli_workers:REGISTRY", "--concurrency", "2",
                            "--idle-exit", "1", "--lease", "5", cwd=tmp_path)
    assert code == 0 and "worker stopped after 2 jobs" in out, (out, err)
    code, out, _ = levqor(url, "wait", shout_id)
    assert code == 0 and json.loads(out[out.index("{"):])["result"] == {"text": "HI", "attempt": 1}
    assert levqor(url, "status", shout_id)[0] == 0
    code, out, _ = levqor(url, "status", fail_id)
    assert code == 1 and json.loads(out)["status"] == "failed"
    assert levqor(url, "wait", fail_id)[0] == 1
    code, out, _ = levqor(url, "jobs", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {shout_id, fail_id} <= {j["job_id"] for j in listed}
    code, out, _ = levqor(url, "jobs", "--workflow", "cli.shout", "--limit", "1")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["JOB_ID", "STATUS", "WORKFLOW", "PRIORITY",
                                              "ATTEMPTS", "CREATED"] and len(lines) == 2
    assert lines[1].index("cli.shout") == lines[0].index("WORKFLOW")  # aligned
    code, out, err = levqor(url, "retry", fail_id)
    assert code == 0 and out.split() == [fail_id, "queued"]
    code, out, err = levqor(url, "cancel", fail_id, "no-such-job")
    assert code == 3 and out.split() == [fail_id, "canceled"] and "not_found" in err
    assert levqor(url, "usage")[0] == 0
    code, out, _ = levqor(url, "usage", "--group-by", "workflow", "--json")
    assert code == 0 and json.loads(out)["group_by"] == "workflow"
    code, out, _ = levqor(url, "keys", "create", "acme", "--role", "worker", "--workflow", "cli.*")
    made = json.loads(out)
    assert code == 0 and made["key"].startswith("lq_") and made["workflows"] == ["cli.*"]
    code, out, _ = levqor(url, "keys", "list")
    assert code == 0 and made["id"] in out and "PREFIX" in out.splitlines()[0]
    assert levqor(url, "keys", "revoke", made["id"])[0] == 0
    code, _, err = levqor(url, "jobs", key="wrong-key-0123456789abcdef")
    assert code == 3 and "forbidden" in err


# ---------------------------------------------------------------------------
# Packaging, and Python 3.9
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_package_installs_into_a_bare_venv_with_nothing_else(tmp_path):
    """Built with setuptools (requirements-dev.txt) without network or build
    isolation, then installed into a fresh venv that holds only pip: the
    package imports and ``levqor --help`` runs. The wheel is built by this
    interpreter because a fresh venv's bundled setuptools (65 on Python
    3.11, none from 3.12) cannot build wheels without the ``wheel`` package."""
    pytest.importorskip("setuptools", reason="building the package needs setuptools "
                                             "(requirements-dev.txt)")
    import shutil
    src = tmp_path / "src"  # a copy: an in-tree build leaves build/ and egg-info behind
    shutil.copytree(CLIENT_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("levqor_client-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEVQOR_URL")}
    probe = ("import levqor_client, sys; c = levqor_client.Client(); "
             "assert c.base_url == 'http://127.0.0.1:5000'; "
             "assert 'site-packages' in levqor_client.__file__; print(levqor_client.__version__)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=clean,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0", out.stderr
    out = subprocess.run([str(venv / "bin" / "levqor"), "--help"], cwd=tmp_path, env=clean,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: levqor" in out.stdout and "worker" in out.stdout, out.stderr


PY39 = "/root/.pyenv/versions/3.9.18/bin/python3.9"
PY39_SCRIPT = r'''
import base64, hashlib, hmac, sys
sys.path.insert(0, sys.argv[1])
import levqor_client
from levqor_client import Client, verify_webhook, WebhookVerificationError, RateLimited
from levqor_client.errors import error_for
from levqor_client import cli

assert sys.version_info[:2] == (3, 9)
secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
body, now = b'{"type": "job.failed"}', 1800000000
mac = hmac.new(b"k" * 32, b"m1.%d." % now + body, hashlib.sha256).digest()
headers = {"webhook-id": "m1", "webhook-timestamp": str(now),
           "webhook-signature": "v1," + base64.b64encode(mac).decode()}
assert verify_webhook([secret], headers, body, now=now) == {"type": "job.failed"}
for args in ((secret, headers, body + b" ", now), (secret, headers, body, now + 301)):
    try:
        verify_webhook(*args[:3], now=args[3])
    except WebhookVerificationError:
        pass
    else:
        raise AssertionError("accepted a bad delivery")
c = Client("https://levqor.example/base/", "k" * 20, timeout=3)
assert (c.base_url, c.timeout) == ("https://levqor.example/base", 3)
assert isinstance(error_for(429, {"error": "rate_limited"}, None, 1.0), RateLimited)
args = cli._parser().parse_args(["submit", "echo", "--payload", '{"a": 1}', "--wait"])
assert args.payload == {"a": 1} and args.wait
print("ok", levqor_client.__version__)
'''


@pytest.mark.skipif(not os.path.exists(PY39), reason=f"no Python 3.9 interpreter at {PY39}")
def test_the_pure_parts_run_under_python_3_9():
    out = subprocess.run([PY39, "-c", PY39_SCRIPT, CLIENT_DIR], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "ok 0.1.0", out.stderr


SLOW_MODULE = '''
import time

def slow(payload, ctx):
    time.sleep(1.5)
    return {"done": True}

REGISTRY = {"cli.slow": slow}
'''


@pytest.mark.server
def test_sigterm_lets_the_worker_finish_the_job_in_hand(server, tmp_path):
    c = Client(server.url, KEY)
    job_id = c.submit("cli.slow", {}).job_id
    (tmp_path / "slow_workers.py").write_text(SLOW_MODULE)
    env = {**os.environ, "LEVQOR_URL": server.url, "LEVQOR_API_KEY": KEY,
           "PYTHONPATH": CLIENT_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "levqor_client", "worker", "slow_workers:REGISTRY",
                             "--concurrency", "2", "--claim-wait", str(WAIT)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: c.get(job_id).status == "running", 20, 0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and "worker stopped after 1 jobs" in out, out
    job = c.get(job_id)
    assert job.ok and job.result == {"done": True}, job
