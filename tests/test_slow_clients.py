"""gunicorn.conf.py against real gunicorn: slow clients, and the worker hooks."""

import math
import socket
import time

import pytest
import requests

from conftest import Server

THREADS = 2
SLOW = 6  # three slow clients per thread


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


def test_a_worker_that_fails_to_boot_exits_cleanly(tmp_path):
    """The worker_exit hook runs even for a worker whose app never loaded."""
    srv = Server(tmp_path, LEVQOR_WORKFLOWS="no_such_module_xyz")
    try:
        # start() raises once the master has exited: the log is complete.
        with pytest.raises(RuntimeError, match="gunicorn exited"):
            srv.start(timeout=20)
    finally:
        srv.stop()
    log = srv.log()
    assert "Worker failed to boot" in log, log
    assert "no_such_module_xyz" in log
    assert "AttributeError" not in log, log
    assert "Exception during worker exit" not in log, log
