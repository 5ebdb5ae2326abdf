"""gunicorn.conf.py against real gunicorn: slow clients, and the worker hooks.

A whole request (head and body) has REQUEST_TIMEOUT seconds, however often
its client sends a few bytes. A per-read timeout alone (READ_TIMEOUT) does not
bound a request: a client that sends one header line a second never leaves a
read silent for long, and the gthread worker gives it a thread for as long as
it keeps that up."""

import email.utils
import math
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import requests

from support import KEY, Server

pytestmark = [pytest.mark.slow, pytest.mark.server]

THREADS = 2
REQUEST_TIMEOUT = 2.0
READ_TIMEOUT = 5.0  # longer than the gap between a slow client's sends: it never fires
SLOW = 6  # three slow clients per thread
TRICKLE_FOR = 20  # seconds; each slow client gives up after this, closed or not


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY, THREADS=THREADS, REQUEST_TIMEOUT=REQUEST_TIMEOUT,
                 READ_TIMEOUT=READ_TIMEOUT, RATE_BURST=10_000, RATE_GLOBAL=10_000).start()
    yield srv
    srv.stop()


def _closed_by_peer(sock, wait, answers):
    """Whether the server closed sock within `wait` seconds. It should never
    answer an unfinished request head: any bytes it sends go to answers."""
    sock.settimeout(wait)
    try:
        data = sock.recv(4096)
    except socket.timeout:
        return False
    except ConnectionError:
        return True
    if data:
        answers.append(data[:100])
    return True


def _trickle_headers(sock, t0, closed_at, index, answers):
    """Send one more header line a second until the server closes the
    connection or TRICKLE_FOR seconds have passed; closed_at[index] is when
    the server closed it (seconds after t0), or stays None."""
    try:
        for n in range(TRICKLE_FOR):
            if _closed_by_peer(sock, 1.0, answers):
                closed_at[index] = time.monotonic() - t0
                return
            try:
                sock.sendall(b"X-Slow-%d: y\r\n" % n)
            except ConnectionError:
                closed_at[index] = time.monotonic() - t0
                return
    except OSError:
        pass


def test_trickled_headers_cannot_hold_the_threads(server):
    """SLOW clients each send a request head one line a second, on THREADS
    threads. gunicorn takes connections in the order they arrive: the first
    THREADS slow ones get a thread each and lose it REQUEST_TIMEOUT later,
    then the next THREADS, and so on. The last wave ends after REQUEST_TIMEOUT
    x ceil(SLOW / THREADS) = 6 s; the ordinary request queued behind them is
    answered then. Without a whole-request deadline they hold both threads
    for as long as they trickle (TRICKLE_FOR, 20 s)."""
    waves = math.ceil(SLOW / THREADS)
    bound = REQUEST_TIMEOUT * waves + 3  # margin: process start-up, scheduling, a loaded machine
    slow, senders = [], []
    closed_at = [None] * SLOW
    answers = []
    t0 = time.monotonic()
    try:
        for _ in range(SLOW):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for i, s in enumerate(slow):
            t = threading.Thread(target=_trickle_headers, args=(s, t0, closed_at, i, answers), daemon=True)
            t.start()
            senders.append(t)
        time.sleep(0.2)  # the slow connections are accepted, and queued, first

        started = time.monotonic()
        try:
            r = requests.get(server.url + "/health", timeout=bound)
        except requests.Timeout:
            pytest.fail(f"/health not answered in {bound}s while {SLOW} clients trickle headers")
        took = time.monotonic() - started
        assert r.status_code == 200
        assert took <= bound, took

        for t in senders:
            t.join(TRICKLE_FOR + 5)
        assert not answers, f"the server answered unfinished requests: {answers}"
        assert None not in closed_at, f"slow clients never cut off: {closed_at}"
        # Each slow client held a thread for at most about REQUEST_TIMEOUT:
        # the k-th to be cut off got its thread when the one THREADS places
        # before it was cut off (the first THREADS got theirs at once).
        ends = sorted(closed_at)
        for k, end in enumerate(ends):
            began = ends[k - THREADS] if k >= THREADS else 0.0
            assert end - began <= REQUEST_TIMEOUT + 1, (k, ends)
        assert ends[-1] <= bound, ends
    finally:
        for s in slow:
            s.close()
    # Once they are gone, service is immediate.
    started = time.monotonic()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1


def test_a_trickled_body_is_cut_off(server):
    """A body of 1000 bytes sent a byte every half second would take over
    eight minutes; no read waits READ_TIMEOUT, so only the request's
    deadline stops it: Levqor answers 408, or gunicorn drops the connection."""
    head = (b"POST /api/v1/intake HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    answer = b""
    ended = None
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(head)
        try:
            for _ in range(20):  # 10 s at most
                s.sendall(b" ")
                s.settimeout(0.5)
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    continue
                ended = time.monotonic() - t0
                answer = data
                break
            if answer:  # the rest of the answer, until the server closes
                s.settimeout(2)
                while part := s.recv(4096):
                    answer += part
        except ConnectionError:
            ended = ended if ended is not None else time.monotonic() - t0
    assert ended is not None, "the trickled body was never cut off"
    assert ended <= REQUEST_TIMEOUT + 1, ended
    if answer:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"application/json" in answer and b"request_timeout" in answer, answer
    started = time.monotonic()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1


def test_clients_cut_off_do_not_stall_the_worker(tmp_path):
    """Clients that send part of a head, go silent, and never close their
    end: each is cut off after READ_TIMEOUT (1 s), THREADS at a time, so all
    are gone after READ_TIMEOUT x ceil(SLOW / THREADS) = 3 s. gunicorn closes
    a connection on its one event-loop thread and waits there, up to 2 s, for
    the client to close too: unless that wait is cut short, each cut-off
    client stalls the whole worker in turn, and the last goes after 12 s."""
    read_timeout = 1
    bound = read_timeout * math.ceil(SLOW / THREADS) + 2
    srv = Server(tmp_path, THREADS=THREADS, READ_TIMEOUT=read_timeout).start()
    slow = []
    try:
        t0 = time.monotonic()
        for _ in range(SLOW):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        ends, answers = [], []
        for s in slow:  # in the order they were cut off, near enough
            closed = _closed_by_peer(s, max(0.1, t0 + bound - time.monotonic()), answers)
            assert closed, f"still open after {bound}s; closed before it: {ends}"
            ends.append(round(time.monotonic() - t0, 2))
        assert not answers, f"the server answered unfinished requests: {answers}"
        started = time.monotonic()
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
    finally:
        for s in slow:
            s.close()
        srv.stop()


def _read_response(sock):
    """One response with a Content-Length body, off a keep-alive connection."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(4096)
        assert part, f"connection closed after {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        part = sock.recv(4096)
        assert part, "connection closed mid-body"
        body += part
    return head.split(b"\r\n", 1)[0], head


def test_each_request_on_a_keep_alive_connection_has_its_own_deadline(server):
    """The second request starts REQUEST_TIMEOUT + 1 s after the first (the
    connection stays open: keepalive is 5 s) and takes a second to send: it
    would be past a deadline carried over from the first."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(request)
        status, head = _read_response(s)
        assert status.startswith(b"HTTP/1.1 200 "), status
        assert b"connection: close" not in head.lower()
        time.sleep(REQUEST_TIMEOUT + 1)
        s.sendall(request[:20])
        time.sleep(1)
        s.sendall(request[20:])
        status, _ = _read_response(s)
        assert status.startswith(b"HTTP/1.1 200 "), status


def _data_segments_in(sock):
    """TCP segments with data this socket has received (Linux's tcp_info)."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="tcp_info is Linux's")
def test_an_answer_comes_in_one_segment_head_and_body(server):
    """gunicorn sends an answer's head and body apart; gunicorn.conf.py sends
    one whose body comes whole in one write (the same bytes): the client
    wakes once for it, not twice. A HEAD request still gets the head alone."""
    body = b'{"workflow":"echo","payload":{"n":1}}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for request in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /api/v1/intake HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                        + b"\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body):
            before = _data_segments_in(s)
            s.sendall(request)
            status, _ = _read_response(s)
            assert status.split()[1] in (b"200", b"202"), status
            assert _data_segments_in(s) - before == 1
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # nothing of a body came before
        assert _read_response(s)[0].startswith(b"HTTP/1.1 200 ")


def test_every_answer_carries_its_own_headers_and_the_same_security_headers(server):
    """gunicorn's checks of an answer's headers are skipped for a header it
    passed before, unchanged: every answer on a kept-alive connection still
    has the security headers, its own Content-Length and request id, and a
    Location only where it has one."""
    body = b'{"workflow":"echo","payload":{"n":1}}'
    intake = (b"POST /api/v1/intake HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for request in (health, intake, health, intake, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"):
            s.sendall(request)
            _, head = _read_response(s)
            lines = head.decode("latin-1").split("\r\n")[1:]
            answers.append([tuple(part.strip() for part in line.split(":", 1)) for line in lines])
    names = [[name.lower() for name, _ in answer] for answer in answers]
    for answer in names:
        assert len(answer) == len(set(answer)), answer  # nothing twice
        assert {"x-content-type-options", "x-frame-options", "content-security-policy",
                "x-request-id", "content-length", "content-type"} <= set(answer)
    assert ["location" in answer for answer in names] == [False, True, False, True, False]
    ids = [dict((n.lower(), v) for n, v in answer)["x-request-id"] for answer in answers]
    assert len(set(ids)) == 5
    lengths = [dict((n.lower(), v) for n, v in answer)["content-length"] for answer in answers]
    assert lengths[0] == lengths[2] and lengths[1] != lengths[4]


def test_every_answer_is_dated_the_second_it_is_sent(server):
    """gunicorn.conf.py keeps the Date header's text for the second it was
    made in: answers on either side of a second's turn carry each their own."""
    dates = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for _ in range(3):
            time.sleep(1.02 - time.time() % 1)  # just past the next second's start
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            _, head = _read_response(s)
            received = time.time()
            date = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"date:"))
            dates.append(date)
            assert abs(email.utils.parsedate_to_datetime(date).timestamp() - received) < 1.0, date
    assert len(set(dates)) == 3, dates


def test_a_worker_that_fails_to_boot_exits_cleanly(tmp_path):
    """The worker_exit hook runs even for a worker whose app never loaded."""
    srv = Server(tmp_path, LEVQOR_WORKFLOWS="no_such_module_xyz")
    try:
        # start() raises once the master has exited, or, when a health check
        # got in first and waits on a worker that never comes, on that wait.
        with pytest.raises((RuntimeError, requests.RequestException)):
            srv.start(timeout=20)
        srv.proc.wait(timeout=20)  # the log is complete once the master has exited
    finally:
        srv.stop()
    log = srv.log()
    assert "Worker failed to boot" in log, log
    assert "no_such_module_xyz" in log
    assert "AttributeError" not in log, log
    assert "Exception during worker exit" not in log, log


# -- kept-alive connections: the thread that answered waits on them a moment ------------------


def _responses(sock, n):
    """The status lines of the next n responses (Content-Length bodies) on sock."""
    reader, lines = sock.makefile("rb"), []
    for _ in range(n):
        status = reader.readline()
        assert status, "connection closed"
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        reader.read(length)
        lines.append(status.strip())
    return lines


def test_a_kept_alive_connection_is_answered_however_soon_its_next_request_comes(tmp_path):
    """At once, within the linger, after it, and two requests in one write
    (the second read ahead with the first): each answered, in order."""
    srv = Server(tmp_path, API_KEYS=KEY, THREADS=2, KEEPALIVE_LINGER=0.2).start()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            for gap in (0, 0.05, 0.5, 0.01):
                time.sleep(gap)
                s.sendall(request)
                assert _responses(s, 1) == [b"HTTP/1.1 200 OK"]
            s.sendall(request + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _responses(s, 2) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]
    finally:
        srv.stop()


@pytest.mark.parametrize("threads", [1, 2])
def test_over_tls_requests_sent_together_and_apart_are_all_answered(tmp_path, monkeypatch, threads):
    """TLS reads ahead on its own: requests sent in one write wait decrypted
    in the TLS layer, where the socket does not look readable for them. With
    one thread (no linger: the connection goes back to gthread) and with two."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # Server.start's readiness check
    srv = Server(tmp_path, THREADS=threads, KEEPALIVE_LINGER=0.2,
                 GUNICORN_CMD_ARGS=f"--certfile={cert} --keyfile={key}")
    srv.url = srv.url.replace("http://", "https://")
    srv.start()
    context = ssl.create_default_context(cafile=str(cert))
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5),
                                 server_hostname="127.0.0.1") as s:
            s.sendall(request)
            assert _responses(s, 1) == [b"HTTP/1.1 200 OK"]
            s.sendall(request * 3)
            assert _responses(s, 3) == [b"HTTP/1.1 200 OK"] * 3
            time.sleep(0.5)  # past the linger
            s.sendall(request)
            assert _responses(s, 1) == [b"HTTP/1.1 200 OK"]
    finally:
        srv.stop()


def test_a_lingering_thread_gives_way_to_other_clients(tmp_path):
    """Two threads. Client A's thread waits on A's connection (a 5 s linger);
    a status read that waits for its job (8 s) takes the other thread. Then
    client C comes: A's thread gives up its linger for it. If it did not, C
    would wait behind both, for the linger or the job's wait."""
    srv = Server(tmp_path, API_KEYS=KEY, THREADS=2, KEEPALIVE_LINGER=5).start()
    headers = {"X-Api-Key": KEY}
    try:
        job_id = requests.post(srv.url + "/api/v1/intake", headers=headers, timeout=5, json={
            "workflow": "nobody.claims", "payload": {}}).json()["job_id"]
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as a:
            a.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _responses(a, 1) == [b"HTTP/1.1 200 OK"]  # A's thread lingers now
            waiting = threading.Thread(target=lambda: requests.get(
                f"{srv.url}/api/v1/status/{job_id}?wait=8", headers=headers, timeout=15))
            waiting.start()
            time.sleep(0.5)  # the wait has its thread
            started = time.monotonic()
            assert requests.get(srv.url + "/health", timeout=15).status_code == 200
            assert time.monotonic() - started < 3
            waiting.join()
    finally:
        srv.stop()


def test_sigterm_ends_a_linger(tmp_path):
    """A connection idle after its request, its thread waiting on it for 5 s:
    SIGTERM stops the server within gunicorn's own 2 s for kept-alive
    connections, not after the linger."""
    srv = Server(tmp_path, API_KEYS=KEY, THREADS=2, KEEPALIVE_LINGER=5).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _responses(s, 1) == [b"HTTP/1.1 200 OK"]
            started = time.monotonic()
            srv.proc.terminate()
            srv.proc.wait(timeout=15)
            assert time.monotonic() - started < 4.5
    finally:
        srv.stop()


def test_a_client_that_sends_many_requests_at_once_takes_turns_with_the_others(tmp_path):
    """One thread. Client A keeps 200 requests in flight on one connection
    for 4 s; client B's one request, sent meanwhile, is answered in its
    turn. A thread that answered A's requests read ahead one after another
    kept the thread until A paused (B waited 2.4 s)."""
    big = 10**9
    srv = Server(tmp_path, THREADS=1, RATE_ANON=big, RATE_ANON_GLOBAL=big, RATE_BURST=big,
                 RATE_GLOBAL=big, RATE_READ=big).start()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    until = time.monotonic() + 4
    a = socket.create_connection(("127.0.0.1", srv.port), timeout=10)

    def flood():
        try:
            while time.monotonic() < until:
                a.sendall(request * 200)
        except OSError:
            pass

    def drain():
        try:
            while a.recv(65536):
                pass
        except OSError:
            pass

    threads = [threading.Thread(target=flood, daemon=True), threading.Thread(target=drain, daemon=True)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as b:
            started = time.monotonic()
            b.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b.recv(100).startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() - started < 1.0
    finally:
        a.close()
        srv.stop()
