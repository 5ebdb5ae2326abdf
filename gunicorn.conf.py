"""Gunicorn settings for Levqor: `gunicorn levqor:app` reads this file.

How many workers depends on where jobs live (JOB_STORE):

- memory (the default): one worker. Jobs live in the memory of the process
  that accepted them; with two workers, a job submitted through one would
  be invisible to a status poll answered by the other. So Levqor runs one
  process with several threads.
- sqlite, or PostgreSQL (DATABASE_URL): one worker per core. Jobs live in
  the database that every worker opens, claims are atomic, so any worker
  can serve any job, and Python's one-core-per-process limit no longer
  caps the service.

WEB_CONCURRENCY overrides either default.
"""

import select
import signal
import threading
import time

from gunicorn.workers.gthread import ThreadWorker

import metrics
import pg
import ratelimit
from levqor import Settings

# The same settings, read the same way, as the app's: a bad value stops the
# master here with the variable's name. (Importing levqor builds no app.)
_settings = Settings.from_env()
if _settings.database_url and not pg.installed():
    # One line, in the master, before any worker tries: what to install.
    raise SystemExit(f"levqor: DATABASE_URL is set but psycopg is not installed: {pg.INSTALL_HINT}")

bind = _settings.bind
workers = _settings.workers
threads = _settings.threads
timeout = 30
graceful_timeout = 30
keepalive = 5


class LingeringWorker(ThreadWorker):
    """gunicorn's gthread worker, except that the thread that answered a
    request on a kept-alive connection waits on that connection a moment
    (up to LINGER) for the next request, and answers it itself, as long as
    another thread is free and no request is waiting for one.

    PERF: gthread hands every request on a kept-alive connection from its
    event-loop thread to a pool thread, and waking a thread that has been
    idle is slow: on a 2-core VM, requests 30 ms apart reached the app
    1.82 ms after they were sent, and 1.25 ms when the thread that answered
    the last one was waiting on the connection. A job's way from intake to
    finish has two such requests (the intake, the worker's report); the
    idle-latency bench's p50 went from 5.1-5.8 to 4.2-4.4 ms (with the
    Python Worker giving each job to its latest idle slot). The wait is in
    slices of SLICE: a request queued for a thread meanwhile waits at most
    that long.
    """

    LINGER = _settings.keepalive_linger  # seconds; 0: gthread as it is
    SLICE = 0.005

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy = 0  # threads inside handle()
        self._busy_lock = threading.Lock()

    def handle(self, conn):
        if self.LINGER <= 0:
            return super().handle(conn)
        with self._busy_lock:
            self._busy += 1
        try:
            while True:
                keep = super().handle(conn)
                if keep is not True or not self._next_request_came(conn):
                    return keep
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _others_can_wait(self):
        queued = getattr(self.tpool, "_work_queue", None)
        return (self.alive and queued is not None and queued.empty()
                and self._busy < self.cfg.threads)

    def _next_request_came(self, conn):
        """Whether this thread answers the connection's next request: it is
        here, or came within LINGER, and nobody else needs the thread. If
        somebody does, the connection goes back to gthread, which queues it
        behind them when its next request is already read (as gthread does
        with a client that sends several at once: without that turn, such
        a client could keep a thread for as long as it keeps sending)."""
        unreader = getattr(conn.parser, "unreader", None)
        if unreader is None:
            return False  # not an HTTP/1.1 connection: gthread's own way
        try:
            if not unreader.buf.getvalue() and getattr(conn.sock, "pending", int)():
                # TLS read ahead: put where gthread looks for read-ahead
                # bytes, as the socket will not look readable for them.
                unreader.unread(conn.sock.recv(conn.sock.pending()))
            if unreader.buf.getvalue():
                return self._others_can_wait()
            deadline = time.monotonic() + self.LINGER
            poller = select.poll()  # not select(): that fails past file descriptor 1023
            poller.register(conn.sock, select.POLLIN)
            while self._others_can_wait() and time.monotonic() < deadline:
                if poller.poll(self.SLICE * 1000):
                    return True
        except (OSError, ValueError):  # closed meanwhile
            pass
        return False


worker_class = LingeringWorker

# Rate limits hold per host, not per worker: the buckets live in shared
# memory made here, in the master, before any worker is forked. One table
# holds the address buckets and the per-key ones.
ratelimit.prepare_shared(2 * _settings.rate_table_size)
# Likewise the metrics' counters: every worker adds to one table, so any
# worker's scrape shows them all.
metrics.prepare_shared()

# Levqor does not use gunicorn's control socket, and its one default path
# would be shared by every Levqor server on the machine (tests, benchmarks).
control_socket_disable = True

# Levqor writes its own one-line JSON access log; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
loglevel = _settings.gunicorn_log_level

# Smaller than gunicorn's defaults: no Levqor URL or header needs more.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190


# Slow clients. The gthread worker gives a connection a thread while it reads
# the request, and reads with no timeout: a client that trickles its headers
# or body holds a thread as long as it likes, and a few such clients stall
# the service. Each read of a request is bounded to READ_TIMEOUT seconds of
# silence, and the whole request, head and body, to REQUEST_TIMEOUT seconds
# from its first read: a client that sends a byte every few seconds never
# lets one read time out, so only the whole-request deadline stops it. Past
# either, the connection is dropped (a body read inside Levqor answers 408).
# In production, a reverse proxy that buffers whole requests (nginx does by
# default) is the complete answer: see the README.
READ_TIMEOUT = _settings.read_timeout
REQUEST_TIMEOUT = _settings.request_timeout


def _bound_request_reads(log):
    import socket
    import time

    from gunicorn.http import errors, parser, unreader

    # Each request's deadline lives on its connection's unreader, which every
    # read of its head and body (in gunicorn or in the app) goes through.
    original_chunk = getattr(unreader.SocketUnreader, "chunk", None)
    if original_chunk is None:
        log.warning("levqor: cannot bound request reads in this gunicorn version")
    elif getattr(original_chunk, "levqor_bounded", False):
        log.warning("levqor: request reads are already bounded")
    else:
        def drop(sock):
            # gunicorn treats NoMoreData as the client going away: the
            # connection is closed. It closes "gracefully", on the worker's
            # one event-loop thread, waiting up to 2 s for the client to
            # close its end, which a slow client never does: every client cut
            # off would stall the whole worker. Shut the read side first:
            # that wait then ends at once, and a 408 can still be written.
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            return errors.NoMoreData()

        def chunk(self, *args, **kwargs):
            wait = READ_TIMEOUT
            deadline = getattr(self, "levqor_deadline", None)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise drop(self.sock)
            # PERF: each settimeout is a system call; most reads of a request
            # are far from its deadline, on a socket already at READ_TIMEOUT.
            if self.sock.gettimeout() != wait:
                self.sock.settimeout(wait)
            try:
                return original_chunk(self, *args, **kwargs)
            except TimeoutError:
                raise drop(self.sock) from None
            finally:
                # The response is written on this socket too: leave it the
                # READ_TIMEOUT it had before the request deadline existed,
                # not the last few milliseconds of that deadline.
                if wait != READ_TIMEOUT:
                    self.sock.settimeout(READ_TIMEOUT)

        chunk.levqor_bounded = True
        unreader.SocketUnreader.chunk = chunk

    # gunicorn builds each request, the first on a connection or the next on
    # a kept-alive one, in Parser.__next__, before any read of its head: each
    # gets its own deadline there. That also bounds the drain of an unread
    # body of the request before, which gunicorn does there with no timeout.
    original_next = getattr(parser.Parser, "__next__", None)
    if original_next is None:
        log.warning("levqor: cannot bound whole requests in this gunicorn version")
    elif getattr(original_next, "levqor_bounded", False):
        log.warning("levqor: whole requests are already bounded")
    else:
        def __next__(self):
            source = getattr(self, "unreader", None)
            if source is not None:
                source.levqor_deadline = time.monotonic() + REQUEST_TIMEOUT
            return original_next(self)

        __next__.levqor_bounded = True
        parser.Parser.__next__ = __next__
        # gunicorn's own alias for the method, kept pointing at the same thing.
        if getattr(parser.Parser, "next", None) is original_next:
            parser.Parser.next = __next__


# PERF: gunicorn writes an answer's head, then its body: two sends, two TCP
# segments, and a client that wakes for the head and again for the body.
# An answer whose body comes whole, with its Content-Length, and is no
# larger than ONE_WRITE_MAX (every Levqor answer but the largest) goes in
# one send instead, the same bytes. /health
# under wrk took 13 % less server CPU a request (940 -> 820 us on a 2-core
# VM) and answered 10 % more; a single client's intakes went 8-23 % faster,
# and the idle-latency p50 of a job 6-19 % lower.
ONE_WRITE_MAX = 64 * 1024  # bytes of body; a larger one is not worth copying


def _one_write_answers(log):
    from gunicorn import util
    from gunicorn.http import wsgi

    original_write = getattr(wsgi.Response, "write", None)
    if original_write is None or not hasattr(wsgi.Response, "default_headers"):
        log.warning("levqor: cannot send answers in one write in this gunicorn version")
        return
    if getattr(original_write, "levqor_one_write", False):
        return

    def write(self, data):
        if (self.headers_sent or self.chunked or getattr(self, "_omits_body", True)
                or not isinstance(data, bytes) or self.response_length != len(data)
                or len(data) > ONE_WRITE_MAX):
            return original_write(self, data)
        lines = self.default_headers()  # the head as send_headers makes it
        lines.extend("%s: %s\r\n" % (name, value) for name, value in self.headers)
        head = util.to_bytestring("%s\r\n" % "".join(lines), "latin-1")
        self.headers_sent = True
        self.sent = len(data)
        util.write(self.sock, head + data)

    write.levqor_one_write = True
    wsgi.Response.write = write


# PERF: gunicorn reads each of its settings through Config.__getattr__ (a
# method call and a dict lookup), about 21 times for each request's parse and
# environ alone. A worker's settings never change while it lives (a reload
# starts new workers), so each is put on the Config object itself, where
# Python finds it first: a request's parse and environ took 49 -> 35 us,
# measured apart. (A setting that is a property of Config is left to it.)
def _settings_as_attributes(cfg):
    for name, setting in getattr(cfg, "settings", {}).items():
        if not isinstance(getattr(type(cfg), name, None), property):
            cfg.__dict__[name] = setting.get()


# PERF: gunicorn checks every header of every answer (its name and value
# against two patterns, whether it is hop-by-hop, its case and spaces): about
# 12 headers an answer, most of them the same each time (the security
# headers). A header it has passed unchanged, as an ordinary one, is passed
# again at sight; any other goes through its checks as before. At most
# KNOWN_HEADERS are remembered, and never one whose value is new each time
# (a request id, a session cookie: VOLATILE_HEADERS).
KNOWN_HEADERS = 512
VOLATILE_HEADERS = frozenset(["set-cookie", "x-request-id", "location", "etag", "last-modified",
                              "retry-after", "ratelimit-limit", "ratelimit-remaining",
                              "ratelimit-reset", "content-length", "date", "expires"])


def _remembered_answer_headers(log):
    from gunicorn import util
    from gunicorn.http import wsgi

    original = getattr(wsgi.Response, "process_headers", None)
    if original is None:
        log.warning("levqor: cannot check answer headers faster in this gunicorn version")
        return
    if getattr(original, "levqor_remembers", False):
        return
    known = set()

    def process_headers(self, headers):
        for pair in headers:
            if type(pair) is tuple and pair in known:
                self.headers.append(pair)
                continue
            before = len(self.headers)
            original(self, [pair])
            if (len(known) < KNOWN_HEADERS and len(self.headers) == before + 1
                    and self.headers[-1] == pair and type(pair) is tuple
                    and pair[0].lower() not in VOLATILE_HEADERS and not util.is_hoppish(pair[0])):
                known.add(pair)

    process_headers.levqor_remembers = True
    wsgi.Response.process_headers = process_headers


# PERF: gunicorn formats the Date header of every answer afresh
# (email.utils.formatdate: a datetime, a timetuple and a format, a few
# microseconds each time), though it changes once a second. The text is
# kept for the second it was made in: a single client's intakes on one
# worker took 22-33 us less server CPU each (5-7 % more a second).
def _dates_once_a_second(log):
    from gunicorn import util

    original = getattr(util, "http_date", None)
    if original is None:
        log.warning("levqor: cannot keep the Date header in this gunicorn version")
        return
    if getattr(original, "levqor_once_a_second", False):
        return
    made = (None, "")  # (second, its text): replaced whole, so threads read a matching pair

    def http_date(timestamp=None):
        nonlocal made
        if timestamp is not None:
            return original(timestamp)
        second, seen = int(time.time()), made
        if seen[0] != second:
            seen = made = (second, original(second))
        return seen[1]

    http_date.levqor_once_a_second = True
    util.http_date = http_date


def post_worker_init(worker):
    _bound_request_reads(worker.log)
    _one_write_answers(worker.log)
    _remembered_answer_headers(worker.log)
    _dates_once_a_second(worker.log)
    _settings_as_attributes(worker.cfg)
    # Open the database and start the background writer in the worker, after
    # the fork, so that the uptime heartbeat runs even before the first request.
    start = getattr(getattr(worker, "wsgi", None), "start", None)
    if start is not None:
        start()
    # gunicorn lets the requests in flight finish before it calls worker_exit:
    # a claim waiting for a job (up to 30 s) would hold the stop that long.
    # So on SIGTERM the app hears first, and ends those waits.
    stopping = getattr(getattr(worker, "wsgi", None), "stopping", None)
    previous = signal.getsignal(signal.SIGTERM)
    if stopping is not None and callable(previous):
        def on_sigterm(signum, frame):
            stopping()
            previous(signum, frame)
        signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    # On SIGTERM: stop taking jobs, let running ones finish while gunicorn's
    # graceful timeout allows (it kills the worker after that), then write
    # what the log and the audit writer still hold.
    # A worker whose app failed to load has no wsgi attribute.
    stop = getattr(getattr(worker, "wsgi", None), "stop", None)
    if stop is not None:
        stop(grace=max(1.0, worker.cfg.graceful_timeout * 0.8))
