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
    return jobstore.SqlJobStore(storage.Database(str(path)), **options)


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


# -- a callback outlives the process that was sending it ------------------------------------


def two_processes(tmp_path, sent):
    """Two Callbacks dispatchers on one SQLite job store, as two gunicorn
    workers have, and a job whose notification the first has begun to send
    when it dies: it took the attempt (the compare-and-set) and no more."""
    import callbacks
    import engine
    from support import FakeClock
    clock = FakeClock()
    store = _store(tmp_path / "jobs.db", clock=clock)

    def post(url, headers, body, allow_private):
        sent.append(headers["webhook-id"])
        return 200, None
    first, second = (callbacks.Callbacks(store, Log(), (SECRET,), clock=clock, post=post,
                                         view=engine.status_view) for _ in range(2))
    job, _ = store.add(_job("d" * 32, callback_url="http://hooks.example.com/x"))
    job = store.update(job["job_id"], status="succeeded", finished_at=clock(), updated_at=clock())
    first.on_finish(job)
    job = store.get(job["job_id"])
    assert store.update(job["job_id"], expect={"callback_sending_until": None},
                        callback_sending_until=clock() + callbacks.TIMEOUT + 5)
    return store, clock, second, job["job_id"]


def test_a_delivery_held_by_a_sender_that_died_is_sent_once_its_hold_ends(tmp_path):
    sent = []
    store, clock, survivor, job_id = two_processes(tmp_path, sent)
    # A process starting now finds it pending, but held by the dead sender.
    for found_job, event_id, due in survivor.store.pending_callbacks():
        survivor._schedule(due, found_job, event_id)
    survivor.run_due()
    assert sent == [] and store.get(job_id)["callback"]["state"] == "pending"
    clock.advance(16)  # the hold runs out: nobody is sending it
    survivor.run_due()
    assert len(sent) == 1 and store.get(job_id)["callback"]["state"] == "delivered"


def test_the_periodic_scan_picks_up_a_delivery_whose_sender_died(tmp_path):
    sent = []
    store, clock, survivor, job_id = two_processes(tmp_path, sent)
    survivor.scan()  # held by a sender that may be alive: not taken
    assert survivor.run_due() == 0 and sent == []
    clock.advance(16)
    survivor.scan()
    survivor.scan()  # scanning again queues it once
    assert survivor.run_due() == 1
    assert len(sent) == 1 and store.get(job_id)["callback"]["state"] == "delivered"
    survivor.scan()
    assert survivor.run_due() == 0 and len(sent) == 1


class HangingReceiver:
    """Loopback webhook receiver whose first delivery hangs (until the test
    ends), as a slow endpoint would while the sender is killed."""

    def __init__(self):
        import http.server
        import threading
        self.hits = []        # (client port, headers, body), answered or not
        self.delivered = []   # (headers, body) answered 200
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.hits.append((self.client_address[1], headers, body))
                if len(receiver.hits) == 1:
                    receiver.release.wait(60)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                receiver.delivered.append((headers, body))

        class Srv(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Srv(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def connection_owner(pids, local_port, remote_port):
    """Which of pids holds the TCP connection from local_port to remote_port
    (from /proc: the socket's inode, then the process with it open)."""
    sockets = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)) == \
                    (local_port, remote_port):
                sockets.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return pid
            except OSError:
                pass
    return None


@pytest.mark.server
def test_a_callback_whose_sender_is_killed_is_delivered_by_another_process(tmp_path):
    import callbacks
    receiver = HangingReceiver()
    srv = Server(tmp_path, WEB_CONCURRENCY=2, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE=1,
                 CALLBACK_SCAN_INTERVAL=0.5, **FAST).start()
    try:
        r = requests.post(srv.url + INTAKE, headers=HEADERS, timeout=10,
                          json={"workflow": "echo", "payload": {"n": 7},
                                "callback_url": f"http://localhost:{receiver.port}/hook"})
        job_id = r.json()["job_id"]
        assert wait_until(lambda: receiver.hits, 30)
        workers = children(srv.proc.pid)
        sender = wait_until(lambda: connection_owner(workers, receiver.hits[0][0], receiver.port), 10)
        assert sender in workers
        os.kill(sender, signal.SIGKILL)
        # Its hold on the delivery runs out after TIMEOUT + 5 s; then another
        # process (the survivor, or the worker started in its place) sends it.
        assert wait_until(lambda: receiver.delivered, callbacks.TIMEOUT + 5 + 30), srv.log()
        headers, body = receiver.delivered[0]
        event = callbacks.verify_webhook(SECRET, headers, body)
        assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job_id
        assert headers["webhook-id"] == receiver.hits[0][1]["webhook-id"]
        # The receiver counts the delivery as it answers; the sender records
        # it once that answer reaches it.
        view = {}

        def recorded():
            view.update(requests.get(srv.url + f"/api/v1/status/{job_id}", headers=HEADERS,
                                     timeout=5).json())
            return view["callback"]["state"] == "delivered"

        assert wait_until(recorded, 10), view
        assert view["callback"]["attempts"] == 1
        assert len(receiver.delivered) == 1
    finally:
        srv.stop()
        receiver.close()


def test_deliveries_pending_before_the_upgrade_are_found_and_a_bad_row_does_not_stop_it(
        tmp_path, monkeypatch):
    import storage
    path = tmp_path / "old.db"
    version = storage.MIGRATIONS.index(next(m for m in storage.MIGRATIONS if "callback_due" in m))
    monkeypatch.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:version])
    storage.Database(str(path)).connection().close()
    pending = _job("e" * 32, status="succeeded", finished_at=5.0, callback_id="msg_e",
                   callback={"state": "pending", "next_attempt_at": 7.0},
                   callback_sending_until=9.0)
    conn = sqlite3.connect(path)
    with conn:
        for seq, job, data in ((1, pending, json.dumps(pending)),
                               (2, _job("f" * 32), '{"x":Infinity}')):
            conn.execute("INSERT INTO jobs (seq, job_id, status, workflow, priority, key_id, score,"
                         " not_before, finished_at, data) VALUES (?, ?, 'succeeded', 'w', 'normal',"
                         " 'k', 0, 0, 5.0, ?)", (seq, job["job_id"], data))
    conn.close()
    monkeypatch.undo()
    store = _store(path)
    assert store.pending_callbacks() == [("e" * 32, "msg_e", 9.0)]
    assert store.pending_callbacks(8.9) == [] and store.quarantine() == ["f" * 32]


# -- worker keys: only external workflows, only their own, only their own leases ----------

PROD = {"API_KEYS": KEY, "LEVQOR_ENV": "production", "JOB_STORE": "sqlite",
        "MAX_COST_PER_DAY": 1000}


@pytest.fixture
def prod(tmp_path):
    app = make_app(tmp_path, **PROD)
    yield app, Client(app)
    app.stop()


def new_key(c, role, **fields):
    r = c.post("/api/v1/keys", {"name": f"a {role}", "role": role, **fields}, key=KEY)
    assert r.status == 201, r
    return r.json()


def submit(c, workflow, key=KEY, **fields):
    r = c.post(INTAKE, {"workflow": workflow, "payload": {"secret": "s3cr3t"}, "max_cost": 0,
                        **fields}, key=key)
    assert r.status == 202, r
    return r.json()["job_id"]


def test_a_claim_never_hands_out_an_in_process_workflow(prod):
    app, c = prod
    worker = new_key(c, "worker")["key"]
    job_id = submit(c, "echo")
    for key in (worker, KEY):
        r = c.post(CLAIM, {"workflows": ["echo", "demo.flow", "sleep"]}, key=key)
        assert r.status == 204, r
    external = submit(c, "ext.report")
    r = c.post(CLAIM, {"workflows": ["echo", "ext.report"]}, key=worker)
    assert r.status == 200 and r.json()["job"]["job_id"] == external
    assert app.services.engine.run_next()  # the pool still runs the in-process one
    assert c.get(f"/api/v1/status/{job_id}", key=KEY).json()["status"] == "succeeded"


def test_a_worker_key_limited_to_workflow_patterns_claims_nothing_else(prod):
    app, c = prod
    made = new_key(c, "worker", workflows=["acme.*", "report"])
    assert made["workflows"] == ["acme.*", "report"]
    listed = c.get("/api/v1/keys", key=KEY).json()["keys"]
    assert [k["workflows"] for k in listed] == [["acme.*", "report"]]
    assert new_key(c, "worker")["workflows"] is None  # unlimited, as before
    worker = made["key"]
    other = submit(c, "other.tenant")
    mine = submit(c, "acme.invoice")
    for asked, refused in ((["other.tenant"], "other.tenant"), (["acme.invoice", "reporting"], "reporting"),
                           (["acme"], "acme"), (["report.x"], "report.x")):
        r = c.post(CLAIM, {"workflows": asked}, key=worker)
        assert r.status == 403 and r.json()["error"] == "forbidden", r
        assert refused in r.json()["message"]
    r = c.post(CLAIM, {"workflows": ["acme.invoice", "report"]}, key=worker)
    assert r.status == 200 and r.json()["job"]["job_id"] == mine
    assert c.post(CLAIM, {"workflows": ["report"]}, key=worker).status == 204
    assert c.get(f"/api/v1/status/{other}", key=KEY).json()["status"] == "queued"


@pytest.mark.parametrize("fields", [
    {"role": "client", "workflows": ["acme.*"]},
    {"role": "worker", "workflows": []},
    {"role": "worker", "workflows": ["acme.*"] * 2},
    {"role": "worker", "workflows": [f"w{i}" for i in range(51)]},
    {"role": "worker", "workflows": ["*"]},
    {"role": "worker", "workflows": ["a*b"]},
    {"role": "worker", "workflows": ["a b"]},
    {"role": "worker", "workflows": ["-a"]},
    {"role": "worker", "workflows": ["a" * 129]},
    {"role": "worker", "workflows": "acme.*"},
    {"role": "worker", "workflows": [7]},
])
def test_workflow_patterns_are_checked_when_the_key_is_made(prod, fields):
    app, c = prod
    r = c.post("/api/v1/keys", {"name": "w", **fields}, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed", r
    assert r.json()["field"].startswith("role" if fields["role"] == "client" else "workflows"), r
    assert c.get("/api/v1/keys", key=KEY).json()["keys"] == []


def test_a_lease_token_works_only_with_the_key_that_claimed_it(prod):
    app, c = prod
    first, second = new_key(c, "worker")["key"], new_key(c, "worker")["key"]
    job_id = submit(c, "ext.report")
    job = c.post(CLAIM, {"workflows": ["ext.report"]}, key=first).json()["job"]
    stolen = {"lease_token": job["lease_token"]}
    wrong = {"lease_token": "0" * 32}
    for path, body in (("heartbeat", {}), ("complete", {"result": {"forged": True}}),
                       ("fail", {"error": "forged", "retryable": False})):
        answers = []
        for key, token in ((second, stolen), (KEY, stolen), (first, wrong)):
            r = c.post(f"/api/v1/jobs/{job_id}/{path}", {**token, **body}, key=key)
            assert r.status == 409, r
            answers.append({k: v for k, v in r.json().items() if k != "request_id"})
        assert answers[0] == answers[1] == answers[2]  # no oracle: the same as a wrong token
        assert answers[0]["error"] == "lease_lost"
    view = c.get(f"/api/v1/status/{job_id}", key=KEY).json()
    assert view["status"] == "running" and view["result"] is None
    assert not {"claimed_by", "lease_token", "key_id"} & set(view)
    r = c.post(f"/api/v1/jobs/{job_id}/complete", {**stolen, "result": {"ok": 1}}, key=first)
    assert r.status == 200 and r.json()["job"]["result"] == {"ok": 1}


# -- job status is the owner's, and says nothing of DNS -------------------------------------


def test_in_production_a_job_status_needs_the_owning_key(prod):
    app, c = prod
    owner, stranger = new_key(c, "client")["key"], new_key(c, "client")["key"]
    worker = new_key(c, "worker")["key"]
    job_id = submit(c, "ext.private", key=owner)
    path = f"/api/v1/status/{job_id}"
    r = c.get(path)
    assert r.status == 401 and r.json()["error"] == "unauthorized"
    r = c.get(path, key=stranger)
    unknown = c.get(f"/api/v1/status/{'0' * 32}", key=stranger)
    assert r.status == unknown.status == 404
    assert {**r.json(), "request_id": 0, "job_id": 0} == {**unknown.json(), "request_id": 0, "job_id": 0}
    assert c.get(path, key=worker).status == 403
    for key in (owner, KEY):
        r = c.get(path, key=key)
        assert r.status == 200 and r.json()["job_id"] == job_id


@pytest.mark.parametrize("env", [{"LEVQOR_ENV": "production", "PUBLIC_JOB_STATUS": "1"},
                                 {"LEVQOR_ENV": "development"}])
def test_public_status_reads_where_configured_and_in_development(tmp_path, env):
    app = make_app(tmp_path, API_KEYS=KEY, JOB_STORE="sqlite", **env)
    try:
        c = Client(app)
        job_id = submit(c, "ext.open")
        r = c.get(f"/api/v1/status/{job_id}")
        assert r.status == 200 and r.json()["status"] == "queued"
    finally:
        app.stop()


def test_a_callback_failure_to_resolve_or_connect_reads_the_same_whatever_the_cause(tmp_path):
    import functools
    import io
    import socket
    import callbacks
    from support import FakeClock

    def getaddrinfo(host, port, type=None):
        answers = {"internal.levqor.test": "10.1.2.3", "metadata.levqor.test": "169.254.169.254",
                   "closed.levqor.test": "93.184.216.34", "slow.levqor.test": "93.184.216.35"}
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    def connect(address, timeout):
        if address[0] == "93.184.216.35":
            raise TimeoutError("timed out")
        raise ConnectionRefusedError(111, "Connection refused")

    log = io.StringIO()
    app = make_app(tmp_path, log=log, **PROD, CALLBACK_SECRET=SECRET)
    cbs = app.services.callbacks
    cbs.post = functools.partial(callbacks.post, getaddrinfo=getaddrinfo, connect=connect)
    cbs.clock = FakeClock()
    try:
        c = Client(app)
        hosts = ["internal", "metadata", "nowhere", "closed", "slow"]
        ids = [submit(c, "echo", callback_url=f"https://{h}.levqor.test/hook") for h in hosts]
        while app.services.engine.run_next():
            pass

        def views():
            return [c.get(f"/api/v1/status/{j}", key=KEY).json()["callback"] for j in ids]
        assert wait_until(lambda: all(v["attempts"] == 1 for v in views()), 10), views()
        seen = views()
        assert all(v == seen[0] for v in seen), seen
        assert seen[0]["state"] == "pending" and seen[0]["last_error"] == callbacks.UNREACHABLE
        assert not any(word in seen[0]["last_error"].lower()
                       for word in ("forbidden", "gaierror", "refused", "timed", "resolve to"))
    finally:
        app.stop()
    details = [json.loads(line).get("detail") or "" for line in log.getvalue().splitlines()]
    assert any("forbidden address" in d for d in details)  # the operator still sees why
    assert any("gaierror" in d for d in details) and any("ConnectionRefused" in d for d in details)


@pytest.mark.parametrize("env, security", [
    ({"LEVQOR_ENV": "production"}, [{"ApiKey": []}]),
    ({"LEVQOR_ENV": "production", "PUBLIC_JOB_STATUS": "1"}, [{}, {"ApiKey": []}]),
    ({}, [{}, {"ApiKey": []}])])
def test_the_published_document_says_when_job_status_needs_a_key(tmp_path, env, security):
    app = make_app(tmp_path, API_KEYS=KEY, **env)
    try:
        spec = Client(app).get("/openapi.json").json()
        assert spec["paths"]["/api/v1/status/{job_id}"]["get"]["security"] == security
        assert spec["paths"]["/api/v1/jobs"]["get"]["security"] == [{"ApiKey": []}]
    finally:
        app.stop()
