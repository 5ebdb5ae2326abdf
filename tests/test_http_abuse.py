"""HTTP-level abuse over raw sockets against real gunicorn, as a table of
cases: each names what is sent and the status line that must come back."""

import socket
import threading

import pytest
import requests

from support import KEY, Server

pytestmark = pytest.mark.server

K = f"X-Api-Key: {KEY}\r\n".encode()
JSON = b"Content-Type: application/json\r\n"
CHUNK = b"400\r\n" + b"a" * 1024 + b"\r\n"

CASES = [
    ("body shorter than its Content-Length",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Content-Length: 100\r\n\r\n{\"a\":1}", 400),
    ("POST without Content-Length",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Connection: close\r\n\r\n", 411),
    ("chunked body over the cap, never finished",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK * 3,
     413),
    ("chunked body within the cap",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Transfer-Encoding: chunked\r\n\r\n"
     b"20\r\n{\"workflow\":\"w\",\"payload\":{}}   \r\n0\r\n\r\n", 202),
    ("request line over the limit", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    ("one header over the limit", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ("too many headers",
     b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    ("Content-Length and Transfer-Encoding together (smuggling)",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    ("two Content-Lengths (smuggling)",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd", 400),
    ("a bad chunk size",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400),
    ("a NUL in the path", b"GET /public/legal/privacy.html%00.css HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    ("HTTP/2 preface on a plain socket", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("a number past a double (1e400) in the payload",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Content-Length: 44\r\n\r\n"
     b'{"workflow":"ext.x","payload":{"x":1e400}}  ', 400),
    ("gzip then chunked, the gzip never applied",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
     b"20\r\n{\"workflow\":\"w\",\"payload\":{}}   \r\n0\r\n\r\n", 501),
    ("an encoded slash reaching for the keys endpoint",
     b"GET /api%2Fv1%2Fkeys HTTP/1.1\r\nHost: t\r\n" + K + b"\r\n", 404),
    ("a body that stops coming (read timeout)",
     b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Content-Length: 1000\r\n\r\n{", 408),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("abuse"), API_KEYS=KEY, MAX_CONTENT_LENGTH=2048,
                 READ_TIMEOUT=1, RATE_BURST=10_000, RATE_GLOBAL=10_000).start()
    yield srv
    srv.stop()


def exchange(srv, data, close_write=False, timeout=10):
    """Send raw bytes; the status line that comes back (b'' if none)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while b"\r\n" not in received:
                part = s.recv(4096)
                if not part:
                    break
                received += part
        except socket.timeout:
            pass
    return received.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("case, data, status", CASES, ids=[c[0] for c in CASES])
def test_abuse(server, case, data, status):
    close_write = case.startswith("body shorter")
    line = exchange(server, data, close_write)
    assert line.startswith(f"HTTP/1.1 {status} ".encode()), (case, line)


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_cannot_hold_the_service(server):
    """More trickling clients than threads. Each holds a thread for at most
    a few READ_TIMEOUTs (1 s here), then is let go: the requests that queued
    behind them are answered, and once they are gone service is immediate.
    (gthread gives a slow client a thread while it reads; a buffering proxy
    in front removes even that delay. See the README.)"""
    slow = []
    try:
        for _ in range(6):  # more than the 4 threads
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
            slow.append(s)
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"POST /api/v1/intake HTTP/1.1\r\nHost: t\r\n" + K + JSON + b"Content-Length: 500\r\n\r\n{")
            slow.append(s)
        queued = [requests.get(server.url + "/health", timeout=30).status_code for _ in range(3)]
        assert queued == [200] * 3
        cut = 0
        for s in slow:  # every slow client was let go: a 408, or the connection closed
            s.settimeout(15)
            try:
                answer = s.recv(100)
                cut += answer == b"" or answer.startswith(b"HTTP/1.1 408")
            except OSError:
                pass
        assert cut == len(slow)
    finally:
        for s in slow:
            s.close()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_the_service_still_answers_after_all_of_it(server):
    for case, data, _ in CASES:
        exchange(server, data, case.startswith("body shorter"))
    r = requests.post(server.url + "/api/v1/intake", json={"workflow": "w", "payload": {}},
                      headers={"X-Api-Key": KEY}, timeout=5)
    assert r.status_code == 202


def test_many_connections_at_once_are_all_answered(server):
    results = []

    def hit():
        try:
            results.append(requests.get(server.url + "/health", timeout=20).status_code)
        except requests.RequestException as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=hit) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(200) == 100, results
