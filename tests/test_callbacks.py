"""Callbacks: a real receiver on loopback, signatures checked by an
independent implementation of Standard Webhooks, retries on a fake clock,
and the SSRF rules, with no connection reaching a listener it should not."""

import base64
import functools
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time

import pytest
import requests

import callbacks
import engine
from support import STORES, KEY, Client, FakeClock, Server, job_store, make_app, store_env, wait_until

SECRET = "whsec_" + base64.b64encode(b"levqor-test-secret-0123456789").decode()
NEXT_SECRET = "whsec_" + base64.b64encode(b"levqor-next-secret-9876543210").decode()


def independent_verify(secret, headers, body):
    """Standard Webhooks, written out here from the spec, not from callbacks.py."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig == f"v1,{expected}" for sig in headers["webhook-signature"].split(" "))


class Receiver:
    """An http.server on 127.0.0.1 that answers from a plan and records hits."""

    def __init__(self):
        self.hits = []          # (path, headers, body)
        self.plan = {}          # path -> list of (status, headers, body) answered in turn
        self.connections = 0
        self.cut = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hits.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                answers = receiver.plan.get(self.path, [(200, {}, b"ok")])
                status, headers, payload = answers.pop(0) if len(answers) > 1 else answers[0]
                if payload == "slow":
                    time.sleep(5)
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if payload == "endless":
                    self.end_headers()
                    try:
                        for _ in range(10_000):  # 640 MB if nobody stopped reading
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        receiver.cut.set()
                    return
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Srv(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                receiver.connections += 1
                return super().get_request()

        self.server = Srv(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # Intake accepts names, not literal addresses: the same listener by name.
        self.named_url = f"http://localhost:{self.port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


class Log:
    def __getattr__(self, level):
        return lambda *a, **k: None


STORE = {}


@pytest.fixture(autouse=True, params=STORES)
def store_kind(request, tmp_path):
    STORE.update(kind=request.param, path=tmp_path)
    return request.param


def setup(url, secrets=(SECRET,), allow_private=True, post=callbacks.post, finish_status="succeeded"):
    clock = FakeClock()
    store = job_store(STORE["kind"], STORE["path"], clock=clock)
    eng = engine.Engine(store, engine.Registry(), Log(), clock=clock)
    cbs = callbacks.Callbacks(store, Log(), secrets, allow_private, clock=clock, post=post,
                              view=engine.status_view)
    job, _ = eng.submit(eng.new_job("w", {}, "normal", url, "k"))
    now = clock()
    store.update(job["job_id"], status=finish_status, result={"answer": 42}, finished_at=now,
                 updated_at=now)
    cbs.on_finish(store.get(job["job_id"]))
    return cbs, store, clock, job["job_id"]


# -- signing -----------------------------------------------------------------------------


def test_a_delivery_verifies_with_an_independent_implementation(receiver):
    cbs, store, clock, job_id = setup(receiver.url + "/hook", secrets=(SECRET, NEXT_SECRET))
    assert cbs.run_due() == 1
    path, headers, body = receiver.hits[0]
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"].startswith("msg_")
    assert int(headers["webhook-timestamp"]) == int(clock())
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)  # rotation: both keys
    assert independent_verify(SECRET, headers, body) and independent_verify(NEXT_SECRET, headers, body)
    event = json.loads(body)
    assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job_id
    assert event["data"]["result"] == {"answer": 42}
    assert callbacks.verify_webhook(SECRET, headers, body, now=clock())["type"] == "job.succeeded"
    state = store.get(job_id)["callback"]
    assert state == {"state": "delivered", "attempts": 1, "last_status": 200, "last_error": None,
                     "next_attempt_at": None}


def test_verify_webhook_refuses_tampering_replay_and_strangers():
    key = callbacks.parse_secret(SECRET)
    body, stamp = b'{"type":"job.failed"}', 1_800_000_000
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(stamp),
               "Webhook-Signature": callbacks.sign(key, "msg_1", stamp, body)}
    assert callbacks.verify_webhook(SECRET, headers, body, now=stamp + 299)
    cases = [
        (SECRET, headers, body + b" ", stamp),                                   # tampered body
        (NEXT_SECRET, headers, body, stamp),                                     # wrong secret
        (SECRET, headers, body, stamp + 301),                                    # replayed later
        (SECRET, headers, body, stamp - 301),                                    # from the future
        (SECRET, {k: v for k, v in headers.items() if k != "Webhook-Id"}, body, stamp),
        (SECRET, dict(headers, **{"Webhook-Timestamp": "soon"}), body, stamp),
        (SECRET, dict(headers, **{"Webhook-Id": "msg_2"}), body, stamp),
    ]
    for secret, hdrs, raw, now in cases:
        with pytest.raises(callbacks.WebhookVerificationError):
            callbacks.verify_webhook(secret, hdrs, raw, now=now)


@pytest.mark.parametrize("secret", ["plain", "whsec_", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()])
def test_malformed_secrets_refuse_to_start(tmp_path, secret):
    import levqor
    with pytest.raises(levqor.ConfigError, match="CALLBACK_SECRET"):
        make_app(tmp_path, CALLBACK_SECRET=secret)


# -- retries -------------------------------------------------------------------------------


def test_retries_follow_the_schedule_then_give_up(receiver):
    receiver.plan["/down"] = [(500, {}, b"no")]
    cbs, store, clock, job_id = setup(receiver.url + "/down")
    due_times = []
    for _ in range(len(callbacks.SCHEDULE)):
        assert cbs.run_due() == 1
        assert cbs.run_due() == 0  # nothing more until the next time on the schedule
        state = store.get(job_id)["callback"]
        if state["next_attempt_at"] is None:
            break
        due_times.append(round(state["next_attempt_at"] - clock()))
        clock.advance(state["next_attempt_at"] - clock())
    assert due_times == list(callbacks.SCHEDULE[1:])
    state = store.get(job_id)["callback"]
    assert state["state"] == "failed" and state["attempts"] == 7 and state["last_status"] == 500
    ids = {h[1]["webhook-id"] for h in receiver.hits}
    assert len(receiver.hits) == 7 and len(ids) == 1  # one event, the same id on every retry


def test_success_after_failures(receiver):
    receiver.plan["/flaky"] = [(503, {}, b""), (200, {}, b"ok")]
    cbs, store, clock, job_id = setup(receiver.url + "/flaky")
    cbs.run_due()
    clock.advance(5)
    cbs.run_due()
    assert store.get(job_id)["callback"]["state"] == "delivered"
    assert store.get(job_id)["callback"]["attempts"] == 2


def test_retry_after_is_honoured_on_429(receiver):
    receiver.plan["/busy"] = [(429, {"Retry-After": "120"}, b""), (200, {}, b"")]
    cbs, store, clock, job_id = setup(receiver.url + "/busy")
    cbs.run_due()
    assert store.get(job_id)["callback"]["next_attempt_at"] == pytest.approx(clock() + 120)
    clock.advance(60)
    assert cbs.run_due() == 0
    clock.advance(60)
    assert cbs.run_due() == 1


def test_410_stops_retries_at_once(receiver):
    receiver.plan["/gone"] = [(410, {}, b"")]
    cbs, store, clock, job_id = setup(receiver.url + "/gone")
    cbs.run_due()
    clock.advance(10_000)
    assert cbs.run_due() == 0
    state = store.get(job_id)["callback"]
    assert state["state"] == "disabled" and state["last_status"] == 410 and len(receiver.hits) == 1


def test_redirects_are_not_followed(receiver):
    receiver.plan["/moved"] = [(302, {"Location": "/elsewhere"}, b"")]
    cbs, store, _, job_id = setup(receiver.url + "/moved")
    cbs.run_due()
    assert [h[0] for h in receiver.hits] == ["/moved"]
    state = store.get(job_id)["callback"]
    assert state["state"] == "pending" and state["last_error"] == "HTTP 302"


def test_an_endless_response_is_cut_off(receiver):
    receiver.plan["/huge"] = [(200, {}, "endless")]
    cbs, store, _, job_id = setup(receiver.url + "/huge")
    cbs.run_due()
    assert store.get(job_id)["callback"]["state"] == "delivered"
    assert receiver.cut.wait(10)  # we stopped reading: the receiver's writes failed


def test_a_slow_receiver_is_cut_off_at_the_deadline(receiver):
    receiver.plan["/slow"] = [(200, {}, "slow")]
    quick = functools.partial(callbacks.post, timeout=0.5)
    cbs, store, _, job_id = setup(receiver.url + "/slow", post=quick)
    cbs.run_due()
    state = store.get(job_id)["callback"]
    assert state["state"] == "pending" and state["last_status"] is None
    assert state["last_error"]


def test_connection_refused_is_a_failed_attempt():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens here
    cbs, store, _, job_id = setup(f"http://127.0.0.1:{port}/x")
    cbs.run_due()
    state = store.get(job_id)["callback"]
    assert state["state"] == "pending" and state["last_error"] == callbacks.UNREACHABLE


def test_without_a_secret_nothing_is_sent(receiver):
    cbs, store, _, job_id = setup(receiver.url + "/hook", secrets=())
    assert cbs.run_due() == 0 and receiver.hits == []
    assert store.get(job_id)["callback"]["state"] == "disabled"


# -- SSRF ----------------------------------------------------------------------------------------

FORBIDDEN = ["127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
             "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "::",
             "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
             "2001:db8::1", "192.0.2.1"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address):
    assert callbacks.forbidden(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address):
    assert not callbacks.forbidden(address)


ODD_SPELLINGS = ["http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/", "http://127.1/",
                 "http://0/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/latest",
                 "http://10.0.0.1:8080/x", "https://[fe80::1]/", "http://0x7f.1/"]


@pytest.mark.parametrize("url", ODD_SPELLINGS)
def test_intake_refuses_literal_private_addresses_in_any_spelling(tmp_path, url):
    app = make_app(tmp_path)
    r = Client(app).post("/api/v1/intake", {"workflow": "w", "payload": {}, "callback_url": url})
    assert r.status == 400 and r.json()["field"] == "callback_url", url
    app.stop()


@pytest.mark.parametrize("url", ["http://user:pw@example.com/", "http://user@example.com/",
                                 "gopher://example.com/", "http://example.com:0/"])
def test_intake_refuses_credentials_and_odd_schemes(tmp_path, url):
    app = make_app(tmp_path)
    r = Client(app).post("/api/v1/intake", {"workflow": "w", "payload": {}, "callback_url": url})
    assert r.status == 400 and r.json()["field"] == "callback_url"
    app.stop()


@pytest.mark.parametrize("spelling", ["localhost", "127.1", "2130706433", "0x7f000001", "0177.0.0.1"])
def test_a_name_resolving_to_loopback_reaches_no_listener(receiver, spelling):
    cbs, store, _, job_id = setup(f"http://{spelling}:{receiver.port}/hook", allow_private=False)
    cbs.run_due()
    state = store.get(job_id)["callback"]
    # Retried, and described, like any failure to connect: nothing singles it out.
    assert state["state"] == "pending" and state["last_error"] == callbacks.UNREACHABLE
    assert receiver.connections == 0 and receiver.hits == []


def test_the_checked_address_is_the_one_connected_to(receiver):
    """One lookup, every answer checked, then a connection to a checked
    address with the original Host: a rebinding DNS server gains nothing."""
    lookups, connects = [], []
    answers = [["127.0.0.1"], ["10.9.9.9"]]  # a second lookup would say something else

    def fake_getaddrinfo(host, port, type=None):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[len(lookups) - 1]]

    def spy_connect(address, timeout):
        connects.append(address)
        return socket.create_connection(address, timeout)

    post = functools.partial(callbacks.post, getaddrinfo=fake_getaddrinfo, connect=spy_connect)
    cbs, store, _, job_id = setup(f"http://hooks.levqor.test:{receiver.port}/hook", post=post)
    cbs.run_due()
    assert lookups == ["hooks.levqor.test"] and connects == [("127.0.0.1", receiver.port)]
    assert receiver.hits[0][1]["host"] == f"hooks.levqor.test:{receiver.port}"
    assert store.get(job_id)["callback"]["state"] == "delivered"


def test_any_forbidden_answer_refuses_the_name():
    def mixed(host, port, type=None):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("8.8.8.8", "10.0.0.1")]
    with pytest.raises(callbacks.Refused):
        callbacks.resolve("mixed.levqor.test", 80, False, getaddrinfo=mixed)


# -- through the app -----------------------------------------------------------------------------


def test_status_view_and_redeliver(tmp_path, receiver):
    app = make_app(tmp_path, API_KEYS=KEY, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE="1",
                   **store_env(STORE["kind"]))
    c = Client(app)
    job_id = c.post("/api/v1/intake", {"workflow": "echo", "payload": {"a": 1},
                                       "callback_url": receiver.named_url + "/hook"}, key=KEY).json()["job_id"]
    assert c.get(f"/api/v1/status/{job_id}").json()["callback"] is None
    r = c.post(f"/api/v1/jobs/{job_id}/callback/redeliver", {}, key=KEY)
    assert r.status == 409  # not finished yet
    app.services.engine.run_next()
    app.services.callbacks.run_due()
    view = c.get(f"/api/v1/status/{job_id}").json()
    assert view["callback"]["state"] == "delivered" and "callback_body" not in view
    r = c.post(f"/api/v1/jobs/{job_id}/callback/redeliver", {}, key=KEY)
    assert r.status == 200 and r.json()["job"]["callback"]["state"] == "pending"
    app.services.callbacks.run_due()  # or a delivery thread already took it
    assert wait_until(lambda: len(receiver.hits) == 2, 10)
    assert receiver.hits[0][1]["webhook-id"] != receiver.hits[1][1]["webhook-id"]
    assert all(independent_verify(SECRET, h, b) for _, h, b in receiver.hits)
    other = c.post("/api/v1/intake", {"workflow": "echo", "payload": {}}, key=KEY).json()["job_id"]
    app.services.engine.run_next()
    assert c.post(f"/api/v1/jobs/{other}/callback/redeliver", {}, key=KEY).status == 409
    app.stop()


def test_canceled_jobs_notify_too(tmp_path, receiver):
    app = make_app(tmp_path, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE="1", **store_env(STORE["kind"]))
    c = Client(app)
    job_id = c.post("/api/v1/intake", {"workflow": "ext", "payload": {},
                                       "callback_url": receiver.named_url + "/hook"}).json()["job_id"]
    c.post(f"/api/v1/jobs/{job_id}/cancel", {})
    app.services.callbacks.run_due()  # or a delivery thread already took it
    assert wait_until(lambda: receiver.hits, 10)
    assert json.loads(receiver.hits[0][2])["type"] == "job.canceled"
    app.stop()


@pytest.mark.server
def test_end_to_end_through_gunicorn(tmp_path, receiver):
    srv = Server(tmp_path, API_KEYS=KEY, CALLBACK_SECRET=SECRET, CALLBACK_ALLOW_PRIVATE="1",
                 **store_env(STORE["kind"])).start()
    try:
        r = requests.post(srv.url + "/api/v1/intake", headers={"X-Api-Key": KEY}, timeout=5,
                          json={"workflow": "demo.flow", "payload": {"text": "call me back"},
                                "callback_url": receiver.named_url + "/levqor"})
        job_id = r.json()["job_id"]
        assert wait_until(lambda: receiver.hits, 20)
        path, headers, body = receiver.hits[0]
        assert path == "/levqor" and independent_verify(SECRET, headers, body)
        event = callbacks.verify_webhook(SECRET, headers, body)
        assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job_id
        assert event["data"]["result"]["total_words"] == 3
        def delivered():
            view = requests.get(srv.url + f"/api/v1/status/{job_id}", timeout=5).json()
            return view["callback"]["state"] == "delivered"
        assert wait_until(delivered, 20)
    finally:
        srv.stop()
