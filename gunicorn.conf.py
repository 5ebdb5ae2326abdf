"""Gunicorn settings for Levqor: `gunicorn levqor:app` reads this file.

How many workers depends on where jobs live (JOB_STORE):

- memory (the default): one worker. Jobs live in the memory of the process
  that accepted them; with two workers, a job submitted through one would
  be invisible to a status poll answered by the other. So Levqor runs one
  process with several threads.
- sqlite: one worker per core. Jobs live in the SQLite database that every
  worker opens, claims are atomic transactions, so any worker can serve
  any job, and Python's one-core-per-process limit no longer caps the
  service.

WEB_CONCURRENCY overrides either default.
"""

import os

_env = os.environ.get("LEVQOR_ENV", "development").strip().lower()

# In production the service sits behind a load balancer and listens on every
# interface; on a developer's machine it runs in open mode (no keys) unless
# told otherwise, so it listens on loopback only.
_host = os.environ.get("HOST") or ("0.0.0.0" if _env == "production" else "127.0.0.1")
bind = f"{_host}:{int(os.environ.get('PORT', '5000'))}"
_job_store = os.environ.get("JOB_STORE", "memory").strip().lower()
workers = int(os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1 if _job_store == "sqlite" else 1))
threads = int(os.environ.get("THREADS", "4"))
worker_class = "gthread"
timeout = 30
graceful_timeout = 30
keepalive = 5

# Levqor does not use gunicorn's control socket, and its one default path
# would be shared by every Levqor server on the machine (tests, benchmarks).
control_socket_disable = True

# Levqor writes its own one-line JSON access log; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# Smaller than gunicorn's defaults: no Levqor URL or header needs more.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190


# Slow clients. The gthread worker gives a connection a thread while it reads
# the request, and reads with no timeout: a client that trickles its headers
# or body holds a thread as long as it likes, and a few such clients stall
# the service. Each read of a request is bounded to READ_TIMEOUT seconds of
# silence; past it the connection is dropped (a body read inside Levqor
# answers 408). In production, a reverse proxy that buffers whole requests
# (nginx does by default) is the complete answer: see the README.
READ_TIMEOUT = float(os.environ.get("READ_TIMEOUT", "5"))


def _bound_request_reads(log):
    import socket

    from gunicorn.http import errors, unreader

    original = getattr(unreader.SocketUnreader, "chunk", None)
    if original is None or getattr(original, "levqor_bounded", False):
        log.warning("levqor: cannot bound request reads in this gunicorn version")
        return

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
        self.sock.settimeout(READ_TIMEOUT)
        try:
            return original(self, *args, **kwargs)
        except TimeoutError:
            raise drop(self.sock) from None

    chunk.levqor_bounded = True
    unreader.SocketUnreader.chunk = chunk


def post_worker_init(worker):
    _bound_request_reads(worker.log)
    # Open the database and start the background writer in the worker, after
    # the fork, so that the uptime heartbeat runs even before the first request.
    start = getattr(getattr(worker, "wsgi", None), "start", None)
    if start is not None:
        start()


def worker_exit(server, worker):
    # On SIGTERM: stop taking jobs, let running ones finish while gunicorn's
    # graceful timeout allows (it kills the worker after that), then write
    # what the log and the audit writer still hold.
    # A worker whose app failed to load has no wsgi attribute.
    stop = getattr(getattr(worker, "wsgi", None), "stop", None)
    if stop is not None:
        stop(grace=max(1.0, worker.cfg.graceful_timeout * 0.8))
