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
import re
import sys
import threading
import time
import traceback
import uuid

from storage import Database, MemoryJobStore, Recorder, StorageError, UserStore
from wsgi_routes import STATUS_LINES, Api, HTTPError, KeyRing, json_body

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


def _keys(environ, name):
    keys = _list(environ, name)
    for key in keys:
        if not key.isascii() or not key.isprintable() or len(key) < 16:
            raise ConfigError(f"{name}: every key must be at least 16 printable ASCII characters")
    return keys


@dataclasses.dataclass(frozen=True)
class Settings:
    env: str = "development"
    api_keys: tuple = ()
    api_keys_next: tuple = ()
    public_user_reads: bool = False
    rate_burst: int = 20
    rate_global: int = 200
    rate_read: int = 600
    rate_table_size: int = 10_000
    trusted_proxies: tuple = ()
    max_content_length: int = 512 * 1024
    cors_origins: tuple = ("https://levqor.ai",)
    sqlite_path: str = "levqor.db"
    job_ttl: int = 86_400
    max_jobs: int = 100_000
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
            trusted_proxies=proxies,
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 512 * 1024, 1024, 64 * 1024 * 1024),
            cors_origins=_list(env, "CORS_ORIGINS", ("https://levqor.ai",)),
            sqlite_path=env.get("SQLITE_PATH", "").strip() or "levqor.db",
            job_ttl=_int(env, "JOB_TTL", 86_400, 1, 365 * 86_400),
            max_jobs=_int(env, "MAX_JOBS", 100_000, 1, 10**8),
            log_level=level,
        )


# ---------------------------------------------------------------------------
# Logging: one JSON object per line
# ---------------------------------------------------------------------------


class JsonLog:
    """Writes one JSON object per line. json.dumps escapes every control
    character, so nothing a client sends can start a line of its own."""

    LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}

    def __init__(self, stream, level="INFO"):
        self.stream = stream
        self.threshold = self.LEVELS[level]
        self._lock = threading.Lock()

    def emit(self, level, msg, **fields):
        if self.LEVELS[level] < self.threshold:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        line = json.dumps({"time": stamp, "level": level, "msg": msg, **fields},
                          separators=(",", ":"), default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

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

        Returns (allowed, limit, remaining, reset, retry_after) for the
        bucket with the fewest tokens left; times in whole seconds.
        """
        now = self.clock()
        with self._lock:
            states = []
            for key, rate in limits:
                if key is None:
                    bucket = self._global = self._global or [float(rate), now]
                else:
                    bucket = self._buckets.get(key)
                    if bucket is None:
                        bucket = self._buckets[key] = [float(rate), now]
                        if len(self._buckets) > self.size:
                            self._buckets.popitem(last=False)
                    else:
                        self._buckets.move_to_end(key)
                bucket[0] = min(float(rate), bucket[0] + (now - bucket[1]) * rate / 60.0)
                bucket[1] = now
                states.append((bucket, rate))
            allowed = all(bucket[0] >= 1.0 for bucket, _ in states)
            if allowed:
                for bucket, _ in states:
                    bucket[0] -= 1.0
            bucket, rate = min(states, key=lambda s: s[0][0])
            tokens = bucket[0]
        per_second = rate / 60.0
        retry_after = 0 if allowed else math.ceil((1.0 - tokens) / per_second)
        reset = math.ceil((rate - tokens) / per_second)
        return allowed, rate, int(tokens), reset, retry_after


class RateLimiter:
    """Writes: RATE_BURST a minute per client IP and RATE_GLOBAL overall.
    Reads: RATE_READ a minute per client IP, so polling a job's status never
    eats into the budget for submitting jobs. Over a limit: 429."""

    def __init__(self, app, settings, clock=time.monotonic):
        self.app = app
        self.settings = settings
        self.buckets = TokenBuckets(settings.rate_table_size, clock)

    def __call__(self, environ, start_response):
        ip = environ["levqor.client_ip"]
        s = self.settings
        if environ["REQUEST_METHOD"] in WRITE_METHODS:
            limits = ((("w", ip), s.rate_burst), (None, s.rate_global))
        else:
            limits = ((("r", ip), s.rate_read),)
        allowed, limit, remaining, reset, retry_after = self.buckets.take(limits)
        headers = [("RateLimit-Limit", str(limit)), ("RateLimit-Remaining", str(remaining)),
                   ("RateLimit-Reset", str(reset))]
        if not allowed:
            raise HTTPError(429, "rate_limited", f"too many requests; retry in {retry_after} s",
                            [("Retry-After", str(retry_after)), *headers])

        def add_headers(status, response_headers, exc_info=None):
            response_headers.extend(headers)
            return start_response(status, response_headers, exc_info)

        return self.app(environ, add_headers)


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
        self.preflight = [("Access-Control-Allow-Methods", "GET, POST, PATCH, OPTIONS"),
                          ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Api-Key"),
                          ("Access-Control-Max-Age", "600")]

    def __call__(self, environ, start_response):
        origin = environ.get("HTTP_ORIGIN")

        def add_headers(status, headers, exc_info=None):
            html = any(k == "Content-Type" and v.startswith("text/html") for k, v in headers)
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
            rid = uuid.uuid4().hex
        environ["levqor.request_id"] = rid
        environ["levqor.client_ip"] = ip = self.client_ip(environ)
        status = []

        def capture(line, headers, exc_info=None):
            status.append(line)
            return start_response(line, headers, exc_info)

        body = self.app(environ, capture)
        self.log.info("request", request_id=rid, method=environ["REQUEST_METHOD"],
                      path=environ.get("PATH_INFO", ""),
                      status=int(status[-1][:3]) if status else 0,
                      duration_ms=round((time.perf_counter() - started) * 1000, 3),
                      client_ip=ip, user_agent=environ.get("HTTP_USER_AGENT", "")[:256])
        return body


# ---------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------


class Services:
    """What handlers reach through ``request.app``: settings, stores, log."""

    def __init__(self, settings, log):
        self.settings = settings
        self.log = log
        self.keys = KeyRing(settings.api_keys + settings.api_keys_next)
        self.db = Database(settings.sqlite_path)
        self.users = UserStore(self.db)
        self.jobs = MemoryJobStore(settings.max_jobs, settings.job_ttl)
        self.recorder = Recorder(self.db, log)
        self.started_at = time.time()
        self.pid = None  # the process whose background threads are running
        self._lock = threading.Lock()

    def start(self):
        """Open the database and start the background writer, once per process.

        Called by gunicorn's post_worker_init hook, and on the first request
        for servers that have no such hook. Never before a fork.
        """
        with self._lock:
            if self.pid == os.getpid():
                return
            self.db.connection()  # migrates; a bad SQLITE_PATH fails here, loudly
            self.recorder.start()
            self.pid = os.getpid()

    def stop(self):
        self.recorder.stop()


class Levqor:
    """The WSGI callable: the middleware stack, plus start() and stop()."""

    def __init__(self, wsgi, services):
        self.wsgi = wsgi
        self.services = services

    def start(self):
        self.services.start()

    def stop(self):
        self.services.stop()

    def __call__(self, environ, start_response):
        if self.services.pid != os.getpid():
            try:
                self.services.start()
            except Exception as exc:  # the request will meet the same fault and answer it
                self.services.log.error("start failed", error=f"{type(exc).__name__}: {exc}")
        return self.wsgi(environ, start_response)


def create_app(settings=None, log_stream=None):
    """Assemble Levqor. Middleware runs top to bottom on the way in."""
    settings = settings or Settings.from_env()
    log = JsonLog(log_stream or sys.stdout, settings.log_level)
    if not settings.api_keys and not settings.api_keys_next:
        if settings.production:
            raise ConfigError("LEVQOR_ENV=production needs API_KEYS: refusing to start without them")
        log.warning("OPEN DEVELOPMENT MODE: no API_KEYS are set, so every request is allowed. "
                    "Set API_KEYS before exposing this service.")
    services = Services(settings, log)
    wsgi = Api(services)
    wsgi = RateLimiter(wsgi, settings)
    wsgi = ErrorGuard(wsgi, log)
    wsgi = SecureHeaders(wsgi, settings)
    wsgi = AccessLog(wsgi, settings, log)
    return Levqor(wsgi, services)


app = create_app()
