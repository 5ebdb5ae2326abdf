"""Levqor: a job orchestration backend for AI automation, as one WSGI app.

This module reads the configuration, writes the log, holds the middleware,
and assembles them in ``create_app()``. The module-level ``app`` is the WSGI
callable, so ``gunicorn levqor:app`` serves it and any other WSGI server can
embed it. Routes and handlers live in ``wsgi_routes``; what is kept, in
``storage``.
"""

import collections
import dataclasses
import ipaddress
import json
import math
import os
import random
import re
import sys
import threading
import time
import traceback
from json.encoder import encode_basestring_ascii as _esc

import jsonschema

import callbacks
import costs
import engine
import llm
from callbacks import verify_webhook  # noqa: F401  (for receivers: levqor.verify_webhook)
from storage import (Database, KeyStore, Ledger, MemoryJobStore, Recorder, SqliteJobStore,
                     StorageError, UserStore)
from wsgi_routes import ROUTER, STATUS_LINES, Api, HTTPError, KeyRing, json_body, openapi_body

HERE = os.path.dirname(os.path.realpath(__file__))

# ---------------------------------------------------------------------------
# Configuration: read once, from the environment, into one frozen object
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting is missing or malformed; the service refuses to start."""


def _int(environ, name, default, low, high):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _list(environ, name, default=()):
    raw = environ.get(name)
    if raw is None:
        return tuple(default)
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _flag(environ, name):
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _money(environ, name, default):
    raw = environ.get(name, "").strip() or default
    try:
        return costs.to_micro(raw)
    except (ValueError, ArithmeticError):
        raise ConfigError(f"{name} must be an amount of dollars, like 0.35, not {raw!r}") from None


def _choice(environ, name, choices):
    value = environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _keys(environ, name):
    keys = _list(environ, name)
    for key in keys:
        if not key.isascii() or not key.isprintable() or len(key) < 16:
            raise ConfigError(f"{name}: every key must be at least 16 printable ASCII characters")
    return keys


def _secrets(environ):
    found = []
    for name in ("CALLBACK_SECRET", "CALLBACK_SECRET_NEXT"):
        value = environ.get(name, "").strip()
        if value:
            try:
                callbacks.parse_secret(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            found.append(value)
    if len(found) == 1 and environ.get("CALLBACK_SECRET_NEXT", "").strip():
        raise ConfigError("CALLBACK_SECRET_NEXT is set without CALLBACK_SECRET")
    return tuple(found)


@dataclasses.dataclass(frozen=True)
class Settings:
    env: str = "development"
    api_keys: tuple = ()
    api_keys_next: tuple = ()
    public_user_reads: bool = False
    rate_burst: int = 20
    rate_global: int = 200
    rate_read: int = 600
    rate_worker: int = 600
    rate_table_size: int = 10_000
    trusted_proxies: tuple = ()
    max_content_length: int = 512 * 1024
    cors_origins: tuple = ("https://levqor.ai",)
    sqlite_path: str = "levqor.db"
    sqlite_busy_timeout: int = 5000  # ms a write waits for another process's lock
    job_store: str = "memory"
    job_ttl: int = 86_400
    max_jobs: int = 100_000
    worker_threads: int = 4
    job_timeout: int = 300
    job_max_attempts: int = 3
    job_backoff: float = 2.0
    job_backoff_cap: float = 300.0
    job_priority_aging: float = 60.0
    job_lease: int = 30
    workflows: tuple = ()
    callback_secrets: tuple = ()  # CALLBACK_SECRET, then CALLBACK_SECRET_NEXT
    callback_allow_private: bool = False
    callback_threads: int = 2
    max_cost_per_job: int = 350_000       # micro-dollars
    max_cost_per_day: int = 10_000_000
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str = ""
    model_prices: str = ""                # path of a JSON file
    log_level: str = "INFO"
    public_dir: str = os.path.join(HERE, "public")

    @property
    def production(self):
        return self.env == "production"

    @property
    def dev_endpoints(self):
        return not self.production

    @classmethod
    def from_env(cls, environ=None):
        """Every setting Levqor reads; nothing else looks at os.environ."""
        env = os.environ if environ is None else environ
        try:
            proxies = tuple(ipaddress.ip_network(p, strict=False) for p in _list(env, "TRUSTED_PROXIES"))
        except ValueError as exc:
            raise ConfigError(f"TRUSTED_PROXIES: {exc}") from None
        level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if level not in JsonLog.LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(JsonLog.LEVELS)}")
        return cls(
            env=env.get("LEVQOR_ENV", "development").strip().lower() or "development",
            api_keys=_keys(env, "API_KEYS"),
            api_keys_next=_keys(env, "API_KEYS_NEXT"),
            public_user_reads=_flag(env, "PUBLIC_USER_READS"),
            rate_burst=_int(env, "RATE_BURST", 20, 1, 10**9),
            rate_global=_int(env, "RATE_GLOBAL", 200, 1, 10**9),
            rate_read=_int(env, "RATE_READ", 600, 1, 10**9),
            rate_worker=_int(env, "RATE_WORKER", 600, 1, 10**9),
            trusted_proxies=proxies,
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 512 * 1024, 1024, 64 * 1024 * 1024),
            cors_origins=_list(env, "CORS_ORIGINS", ("https://levqor.ai",)),
            sqlite_path=env.get("SQLITE_PATH", "").strip() or "levqor.db",
            sqlite_busy_timeout=_int(env, "SQLITE_BUSY_TIMEOUT_MS", 5000, 10, 600_000),
            job_store=_choice(env, "JOB_STORE", ("memory", "sqlite")),
            job_ttl=_int(env, "JOB_TTL", 86_400, 1, 365 * 86_400),
            max_jobs=_int(env, "MAX_JOBS", 100_000, 1, 10**8),
            worker_threads=_int(env, "WORKER_THREADS", 4, 0, 256),
            job_timeout=_int(env, "JOB_TIMEOUT", 300, 1, 7 * 86_400),
            job_max_attempts=_int(env, "JOB_MAX_ATTEMPTS", 3, 1, 100),
            job_backoff=_int(env, "JOB_BACKOFF", 2, 0, 3600),
            job_backoff_cap=_int(env, "JOB_BACKOFF_CAP", 300, 0, 86_400),
            job_priority_aging=_int(env, "JOB_PRIORITY_AGING", 60, 1, 86_400),
            job_lease=_int(env, "JOB_LEASE", 30, 1, 3600),
            workflows=_list(env, "LEVQOR_WORKFLOWS"),
            callback_secrets=_secrets(env),
            callback_allow_private=_flag(env, "CALLBACK_ALLOW_PRIVATE"),
            callback_threads=_int(env, "CALLBACK_THREADS", 2, 1, 64),
            max_cost_per_job=_money(env, "MAX_COST_PER_JOB", "0.35"),
            max_cost_per_day=_money(env, "MAX_COST_PER_DAY", "10"),
            openai_base_url=env.get("OPENAI_BASE_URL", "").strip() or "https://api.openai.com/v1",
            openai_api_key=env.get("OPENAI_API_KEY", "").strip(),
            model_prices=env.get("MODEL_PRICES", "").strip(),
            log_level=level,
        )


# ---------------------------------------------------------------------------
# Logging: one JSON object per line
# ---------------------------------------------------------------------------


class JsonLog:
    """Writes one JSON object per line. json.dumps escapes every control
    character, so nothing a client sends can start a line of its own.

    Once start()ed, lines are gathered in memory and written by a background
    thread every ``interval`` seconds (or at once past 64 KiB, or for a
    warning or error). PERF: a write per request costs far more under
    gunicorn's threads than the write itself, since every system call hands
    the GIL to another thread; a crash loses at most ``interval`` seconds of
    access lines.
    """

    LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
    MAX_BUFFER = 64 * 1024

    def __init__(self, stream, level="INFO", interval=0.25):
        self.stream = stream
        self.threshold = self.LEVELS[level]
        self.interval = interval
        self._lock = threading.Lock()
        self._buffer = []
        self._size = 0
        self._thread = None
        self._stop = threading.Event()
        self._second = None
        self._prefix = ""

    def start(self):
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="levqor-log", daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self):
        with self._lock:
            lines, self._buffer, self._size = self._buffer, [], 0
            if lines:
                self.stream.write("".join(lines))
                self.stream.flush()

    def _stamp(self):
        # PERF: the second's text is formatted once per second, not per line.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int(now * 1000) % 1000:03d}Z"

    def _write(self, line, urgent=False):
        with self._lock:
            self._buffer.append(line)
            self._size += len(line)
            if not (urgent or self._size > self.MAX_BUFFER) and self._thread is not None:
                return
        self.flush()

    def emit(self, level, msg, **fields):
        if self.LEVELS[level] < self.threshold:
            return
        self._write(json.dumps({"time": self._stamp(), "level": level, "msg": msg, **fields,
                                "pid": os.getpid()},
                               separators=(",", ":"), default=str) + "\n",
                    urgent=self.LEVELS[level] >= 30)

    def access(self, request_id, method, path, status, duration_ms, client_ip, user_agent):
        """The per-request line: emit()'s shape, built by hand because it is
        written for every request. Every string a client controls is escaped."""
        if self.threshold > 20:
            return
        self._write(
            f'{{"time":"{self._stamp()}","level":"INFO","msg":"request",'
            f'"request_id":{_esc(request_id)},"method":{_esc(method)},"path":{_esc(path)},'
            f'"status":{status},"duration_ms":{duration_ms:.3f},"client_ip":{_esc(client_ip)},'
            f'"user_agent":{_esc(user_agent)},"pid":{os.getpid()}}}\n')

    def info(self, msg, **fields):
        self.emit("INFO", msg, **fields)

    def warning(self, msg, **fields):
        self.emit("WARNING", msg, **fields)

    def error(self, msg, **fields):
        self.emit("ERROR", msg, **fields)


# ---------------------------------------------------------------------------
# Middleware, innermost first. create_app() stacks them in this order.
# ---------------------------------------------------------------------------

WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


class TokenBuckets:
    """Token buckets, refilled continuously at ``rate`` tokens a minute.

    The table keeps the ``size`` most recently used buckets; one evicted is
    simply full again when it comes back, which costs an abuser nothing it
    did not already have. The global bucket lives apart and is never evicted.
    """

    def __init__(self, size, clock=time.monotonic):
        self.size = size
        self.clock = clock
        self._buckets = collections.OrderedDict()  # key -> [tokens, last refill]
        self._global = None
        self._lock = threading.Lock()

    def take(self, limits):
        """Take one token from each (key, rate) bucket, all or none.

        Returns None when allowed; otherwise (limit, remaining, reset,
        retry_after) of the emptiest bucket, times in whole seconds.
        """
        now = self.clock()
        buckets = self._buckets
        with self._lock:
            low = None
            for key, rate in limits:
                if key is None:
                    bucket = self._global
                    if bucket is None:
                        bucket = self._global = [float(rate), now]
                else:
                    bucket = buckets.get(key)
                    if bucket is None:
                        bucket = buckets[key] = [float(rate), now]
                        if len(buckets) > self.size:
                            buckets.popitem(last=False)
                    else:
                        buckets.move_to_end(key)
                tokens = bucket[0] + (now - bucket[1]) * rate / 60.0
                bucket[0] = tokens if tokens < rate else float(rate)
                bucket[1] = now
                if low is None or bucket[0] < low[0][0]:
                    low = (bucket, rate)
            if low[0][0] >= 1.0:
                for key, rate in limits:
                    (self._global if key is None else buckets[key])[0] -= 1.0
                return None
            tokens, rate = low[0][0], low[1]
        per_second = rate / 60.0
        return (rate, int(tokens), math.ceil((rate - tokens) / per_second),
                math.ceil((1.0 - tokens) / per_second))


class RateLimiter:
    """Writes: RATE_BURST a minute per client IP and RATE_GLOBAL overall.
    Reads: RATE_READ a minute per client IP, so polling a job's status never
    eats into the budget for submitting jobs. The external worker protocol
    (claim, heartbeat, complete, fail) polls too: RATE_WORKER per IP. Over a
    limit: 429, with Retry-After and the RateLimit-* headers of the emptiest
    bucket."""

    def __init__(self, app, settings, router, clock=time.monotonic):
        self.app = app
        self.settings = settings
        self.router = router
        self.buckets = TokenBuckets(settings.rate_table_size, clock)

    def __call__(self, environ, start_response):
        ip = environ["levqor.client_ip"]
        s = self.settings
        method = environ["REQUEST_METHOD"]
        if method not in WRITE_METHODS:
            limits = ((("r", ip), s.rate_read),)
        elif self.router.is_worker(method, environ.get("PATH_INFO") or "/"):
            limits = ((("k", ip), s.rate_worker),)
        else:
            limits = ((("w", ip), s.rate_burst), (None, s.rate_global))
        refused = self.buckets.take(limits)
        if refused is not None:
            limit, remaining, reset, retry_after = refused
            raise HTTPError(429, "rate_limited", f"too many requests; retry in {retry_after} s",
                            [("Retry-After", str(retry_after)), ("RateLimit-Limit", str(limit)),
                             ("RateLimit-Remaining", str(remaining)), ("RateLimit-Reset", str(reset))])
        return self.app(environ, start_response)


class ErrorGuard:
    """The one place errors become responses.

    An HTTPError becomes its JSON body; a storage failure becomes 503 or 507;
    anything else is logged with its traceback and the request id, and the
    client gets a generic 500 that leaks nothing. KeyboardInterrupt and
    SystemExit pass through.
    """

    def __init__(self, app, log):
        self.app = app
        self.log = log

    def __call__(self, environ, start_response):
        try:
            return self.app(environ, start_response)
        except HTTPError as exc:
            error = exc
        except StorageError as exc:
            if exc.kind == "busy":
                error = HTTPError(503, "storage_busy", str(exc), [("Retry-After", "1")])
            else:
                error = HTTPError(507, "insufficient_storage", str(exc), [("Retry-After", "60")])
            self.log.warning("storage unavailable", request_id=environ["levqor.request_id"],
                             kind=exc.kind)
        except Exception:
            self.log.error("unhandled exception", request_id=environ["levqor.request_id"],
                           method=environ.get("REQUEST_METHOD"), path=environ.get("PATH_INFO"),
                           traceback=traceback.format_exc())
            error = HTTPError(500, "internal_error",
                              "an unexpected error occurred; quote the request id when reporting it")
        body = json_body(error.body(environ["levqor.request_id"]))
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *error.headers]
        start_response(STATUS_LINES[error.status], headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]


API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HTML_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")
EXPOSED = "X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Location"


class SecureHeaders:
    """Adds the headers every response carries, errors and files included:
    security headers, a CSP fit for JSON or HTML, the request id, and CORS
    for origins listed in CORS_ORIGINS (matched exactly, never a pattern)."""

    def __init__(self, app, settings):
        self.app = app
        common = [("X-Content-Type-Options", "nosniff"),
                  ("X-Frame-Options", "DENY"),
                  ("Referrer-Policy", "strict-origin-when-cross-origin"),
                  ("Permissions-Policy", "geolocation=(), microphone=(), camera=()"),
                  ("Vary", "Origin")]
        if settings.production:
            common.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))
        # PERF: built once; each response copies one of two lists.
        self.api_headers = common + [("Content-Security-Policy", API_CSP)]
        self.html_headers = common + [("Content-Security-Policy", HTML_CSP)]
        self.origins = frozenset(settings.cors_origins)
        self.preflight = [("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS"),
                          ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Api-Key"),
                          ("Access-Control-Max-Age", "600")]

    def __call__(self, environ, start_response):
        origin = environ.get("HTTP_ORIGIN")

        def add_headers(status, headers, exc_info=None):
            # PERF: every response of ours names its Content-Type first, so
            # one look decides the CSP. A 304 (static files only) has no type
            # but must repeat the page's CSP: caches merge its headers into the
            # stored page's.
            html = status[0] == "3" or (bool(headers) and headers[0][1].startswith("text/html"))
            headers.extend(self.html_headers if html else self.api_headers)
            headers.append(("X-Request-ID", environ["levqor.request_id"]))
            if origin is not None and origin in self.origins:
                headers.append(("Access-Control-Allow-Origin", origin))
                headers.append(("Access-Control-Expose-Headers", EXPOSED))
                if (environ["REQUEST_METHOD"] == "OPTIONS"
                        and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ):
                    headers.extend(self.preflight)
            return start_response(status, headers, exc_info)

        return self.app(environ, add_headers)


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessLog:
    """Outermost: gives each request an id and a client IP, and logs one
    line when it is answered.

    The client IP is REMOTE_ADDR. X-Forwarded-For is believed only when the
    peer is one of TRUSTED_PROXIES, and then only up to the first address
    (from the right) that is not itself a trusted proxy: anything a client
    wrote further left is its own claim, and gains it nothing.
    """

    def __init__(self, app, settings, log):
        self.app = app
        self.log = log
        self.proxies = settings.trusted_proxies

    def _trusted(self, addr):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def client_ip(self, environ):
        peer = environ.get("REMOTE_ADDR") or "-"
        if not self.proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # garbage in the header: fall back to who we can see
        return peer

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        rid = environ.get("HTTP_X_REQUEST_ID")
        if rid is None or not _SANE_REQUEST_ID.match(rid):
            rid = "%032x" % random.getrandbits(128)  # PERF: os.urandom gives up the GIL
        environ["levqor.request_id"] = rid
        environ["levqor.client_ip"] = ip = self.client_ip(environ)
        status = []

        def capture(line, headers, exc_info=None):
            status.append(line)
            return start_response(line, headers, exc_info)

        body = self.app(environ, capture)
        self.log.access(rid, environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                        int(status[-1][:3]) if status else 0,
                        (time.perf_counter() - started) * 1000,
                        ip, environ.get("HTTP_USER_AGENT", "")[:256])
        return body


# ---------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------


class Services:
    """What handlers reach through ``request.app``: settings, stores, the
    job engine, the log."""

    def __init__(self, settings, log, registry):
        self.settings = settings
        self.log = log
        self.keys = KeyRing(settings.api_keys + settings.api_keys_next)
        self.db = Database(settings.sqlite_path, settings.sqlite_busy_timeout,
                           shared=settings.job_store == "sqlite")
        self.users = UserStore(self.db)
        if settings.job_store == "sqlite":
            self.jobs = SqliteJobStore(self.db, settings.max_jobs, settings.job_ttl,
                                       settings.job_priority_aging)
        else:
            self.jobs = MemoryJobStore(settings.max_jobs, settings.job_ttl, settings.job_priority_aging)
        self.recorder = Recorder(self.db, log)
        self.callbacks = callbacks.Callbacks(
            self.jobs, log, settings.callback_secrets, settings.callback_allow_private,
            threads=settings.callback_threads, view=engine.status_view)
        self.ledger = Ledger(self.db)
        self.key_store = KeyStore(self.db)
        self.key_buckets = TokenBuckets(settings.rate_table_size)
        self.guardrails = costs.Guardrails(self.ledger, settings.max_cost_per_job,
                                           settings.max_cost_per_day)
        self.engine = engine.Engine(
            self.jobs, registry, log, threads=settings.worker_threads,
            timeout=settings.job_timeout, max_attempts=settings.job_max_attempts,
            backoff=settings.job_backoff, backoff_cap=settings.job_backoff_cap,
            local_lease=settings.job_lease, guardrails=self.guardrails,
            on_finish=[self._finished, self.guardrails.settle, self.callbacks.on_finish])
        if settings.openai_api_key and settings.model_prices:
            try:
                prices = llm.load_prices(settings.model_prices)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"MODEL_PRICES: {exc}") from None
            self.engine.llm = llm.Client(settings.openai_base_url, settings.openai_api_key, prices)
        self.openapi_body = openapi_body(settings.max_cost_per_job)
        # Workflows' payload schemas, compiled once.
        self.payload_validators = {}
        for name in registry.names():
            schema = registry.get(name).schema
            if schema is not None:
                jsonschema.Draft202012Validator.check_schema(schema)
                self.payload_validators[name] = jsonschema.Draft202012Validator(schema)
        self.started_at = time.time()
        self.pid = None  # the process whose background threads are running
        self._lock = threading.Lock()

    def _finished(self, job):
        self.recorder.count("finished")
        self.recorder.outcome(job)

    def start(self):
        """Open the database and start the background writer, once per process.

        Called by gunicorn's post_worker_init hook, and on the first request
        for servers that have no such hook. Never before a fork.
        """
        with self._lock:
            if self.pid == os.getpid():
                return
            self.db.connection()  # migrates; a bad SQLITE_PATH fails here, loudly
            self.log.start()
            self.recorder.start()
            self.engine.start()
            self.callbacks.start()
            self.pid = os.getpid()

    def stop(self, grace=25.0):
        """Let running jobs finish within ``grace`` seconds, then write what is buffered."""
        self.engine.stop(grace)
        self.callbacks.stop()
        self.recorder.stop()
        self.log.stop()


class Levqor:
    """The WSGI callable: the middleware stack, plus start() and stop()."""

    def __init__(self, wsgi, services):
        self.wsgi = wsgi
        self.services = services

    def start(self):
        self.services.start()

    def stop(self, grace=25.0):
        self.services.stop(grace)

    def __call__(self, environ, start_response):
        if self.services.pid != os.getpid():
            try:
                self.services.start()
            except Exception as exc:  # the request will meet the same fault and answer it
                self.services.log.error("start failed", error=f"{type(exc).__name__}: {exc}")
        return self.wsgi(environ, start_response)


def create_app(settings=None, log_stream=None, registry=None):
    """Assemble Levqor. Middleware runs top to bottom on the way in.

    ``registry`` holds the workflows this process runs (default: the
    built-ins and those of the LEVQOR_WORKFLOWS modules); an embedding app
    can register its own on ``engine.registry`` before calling this.
    """
    settings = settings or Settings.from_env()
    log = JsonLog(log_stream or sys.stdout, settings.log_level)
    if not settings.api_keys and not settings.api_keys_next:
        if settings.production:
            raise ConfigError("LEVQOR_ENV=production needs API_KEYS: refusing to start without them")
        log.warning("OPEN DEVELOPMENT MODE: no API_KEYS are set, so every request is allowed. "
                    "Set API_KEYS before exposing this service.")
    if not settings.callback_secrets:
        log.info("callbacks are not sent: no CALLBACK_SECRET is set")
    if settings.callback_allow_private:
        log.warning("CALLBACK_ALLOW_PRIVATE=1: callbacks may reach private and loopback addresses")
    if registry is None:
        try:
            engine.import_workflows(settings.workflows)
        except ImportError as exc:
            raise ConfigError(f"LEVQOR_WORKFLOWS: cannot import {exc.name}: {exc}") from None
        registry = engine.registry
    services = Services(settings, log, registry.copy())
    wsgi = Api(services)
    wsgi = RateLimiter(wsgi, settings, ROUTER)
    wsgi = ErrorGuard(wsgi, log)
    wsgi = SecureHeaders(wsgi, settings)
    wsgi = AccessLog(wsgi, settings, log)
    return Levqor(wsgi, services)


app = create_app()
