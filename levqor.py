"""Levqor: a job orchestration backend for AI automation, as one WSGI app.

This module reads the configuration, writes the log, and assembles the
services and the middleware in ``create_app()``. The module-level ``app`` is
the WSGI callable, built on first use, so ``gunicorn levqor:app`` serves it,
any other WSGI server can embed it, and importing this module has no side
effect. Routes and handlers live in ``wsgi_routes``, the middleware in
``middleware``, what is kept in the stores (``storage``, ``jobstore``,
``ledger``, ``recorder``).
"""

import dataclasses
import ipaddress
import json
import os
import sys
import threading
import time
import traceback
import urllib.parse
from json.encoder import encode_basestring_ascii as _esc

import jsonschema

import callbacks
import costs
import dashboard
import engine
import llm
import metrics
import middleware
import pg
import schemas
from background import Background
from callbacks import verify_webhook  # noqa: F401  (for receivers: levqor.verify_webhook)
from jobstore import MemoryJobStore, SqlJobStore
from insights import Insights
from ledger import Ledger
from recorder import Recorder
from schedules import Scheduler, ScheduleStore
from storage import Database, KeyStore, StorageError, UserStore
from web import whole_number
from wsgi_routes import Api, KeyRing, openapi_body

HERE = os.path.dirname(os.path.realpath(__file__))

# ---------------------------------------------------------------------------
# Configuration: read once, from the environment, into one frozen object
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting is missing or malformed; the service refuses to start."""


# Parsers: text (already stripped) -> value, or ValueError saying what is wrong.

def whole(low, high):
    def parse(raw):
        value = whole_number(raw)  # ASCII digits only
        if value is None:
            raise ValueError(f"must be a whole number, not {raw!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, not {raw}")
        return value
    return parse


def seconds(low, high):
    def parse(raw):
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number of seconds, not {raw!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"must be between {low} and {high}, not {raw}")
        return value
    return parse


def choice(*choices):
    def parse(raw):
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {raw!r}")
        return raw.lower()
    return parse


def text(raw):
    return raw


def lower(raw):
    return raw.lower()


def flag(raw):
    return raw.lower() in ("1", "true", "yes", "on")


def names(raw):
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def api_keys(raw):
    keys = names(raw)
    for key in keys:
        if not key.isascii() or not key.isprintable() or len(key) < 16:
            raise ValueError("every key must be at least 16 printable ASCII characters")
        if key.startswith("lq_"):  # the managed keys' prefix: such a key could never authenticate
            raise ValueError("keys must not start with lq_ (the prefix of managed keys)")
    return keys


def token(raw):
    if raw and (not raw.isascii() or not raw.isprintable() or " " in raw or len(raw) < 16):
        raise ValueError("must be at least 16 printable ASCII characters without spaces")
    return raw


def money(raw):
    try:
        return costs.to_micro(raw)
    except (ValueError, ArithmeticError):
        raise ValueError(f"must be an amount of dollars, like 0.35, not {raw!r}") from None


def money_or_blank(raw):
    return money(raw) if raw else None


def networks(raw):
    return tuple(ipaddress.ip_network(p, strict=False) for p in names(raw))


def database_url(raw):
    # The message never repeats the value: it may hold a password.
    if raw and urllib.parse.urlsplit(raw).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// (or postgres://) URL")
    return raw


def llm_limits(raw):
    if not raw:
        return {}
    try:
        return llm.load_limits(raw)
    except json.JSONDecodeError:
        raise ValueError("must be JSON, such as {\"gpt-4o-mini\": {\"rpm\": 500, \"tpm\": 200000}}") from None


def secret(raw):
    if raw:
        callbacks.parse_secret(raw)
    return raw


# Every setting: (field, environment variable, parser, default as the
# variable would spell it, or a dict of defaults for "production" and every
# "other" LEVQOR_ENV). Unset or blank means the default, except for a list,
# where blank is the empty list. This table is the one place a default
# is written; gunicorn.conf.py reads its settings through it too.
SETTINGS = (
    ("env", "LEVQOR_ENV", lower, "development"),
    ("api_keys", "API_KEYS", api_keys, ""),
    ("api_keys_next", "API_KEYS_NEXT", api_keys, ""),
    ("public_user_reads", "PUBLIC_USER_READS", flag, "0"),
    # Writes per minute: the seed's limits in production; more room on a
    # developer's machine, where the validation script alone makes dozens.
    ("rate_burst", "RATE_BURST", whole(1, 10**9), {"production": "20", "other": "300"}),
    ("rate_global", "RATE_GLOBAL", whole(1, 10**9), {"production": "200", "other": "3000"}),
    ("rate_read", "RATE_READ", whole(1, 10**9), "600"),
    ("rate_worker", "RATE_WORKER", whole(1, 10**9), "600"),
    ("rate_anon", "RATE_ANON", whole(1, 10**9), "10"),
    ("rate_anon_global", "RATE_ANON_GLOBAL", whole(1, 10**9), "100"),
    ("rate_table_size", "RATE_TABLE_SIZE", whole(16, 10**7), "10000"),
    ("trusted_proxies", "TRUSTED_PROXIES", networks, ""),
    ("max_content_length", "MAX_CONTENT_LENGTH", whole(1024, 64 * 1024 * 1024), "524288"),
    # POST /api/v1/intake/batch alone: up to 1,000 jobs in one body.
    ("max_batch_content_length", "MAX_BATCH_CONTENT_LENGTH", whole(1024, 256 * 1024 * 1024),
     "4194304"),
    ("cors_origins", "CORS_ORIGINS", names, "https://levqor.ai"),
    # Set: every store is in PostgreSQL, shared by every host (SQLITE_PATH
    # and JOB_STORE are then ignored). Blank: the SQLite file and JOB_STORE.
    ("database_url", "DATABASE_URL", database_url, ""),
    ("database_statement_timeout", "DATABASE_STATEMENT_TIMEOUT_MS", whole(100, 600_000), "5000"),
    ("sqlite_path", "SQLITE_PATH", text, "levqor.db"),
    ("sqlite_busy_timeout", "SQLITE_BUSY_TIMEOUT_MS", whole(10, 600_000), "5000"),
    ("job_store", "JOB_STORE", choice("memory", "sqlite"), "memory"),
    ("job_ttl", "JOB_TTL", whole(1, 365 * 86_400), "86400"),
    ("max_jobs", "MAX_JOBS", whole(1, 10**8), "100000"),
    ("worker_threads", "WORKER_THREADS", whole(0, 256), "4"),
    ("job_timeout", "JOB_TIMEOUT", whole(1, 7 * 86_400), "300"),
    ("job_max_attempts", "JOB_MAX_ATTEMPTS", whole(1, 100), "3"),
    ("job_backoff", "JOB_BACKOFF", whole(0, 3600), "2"),
    ("job_backoff_cap", "JOB_BACKOFF_CAP", whole(0, 86_400), "300"),
    ("job_priority_aging", "JOB_PRIORITY_AGING", whole(1, 86_400), "60"),
    ("job_lease", "JOB_LEASE", whole(1, 3600), "30"),
    ("sweep_interval", "SWEEP_INTERVAL", seconds(0.01, 60), "0.25"),
    ("purge_interval", "PURGE_INTERVAL", seconds(0.01, 3600), "5"),
    ("workflows", "LEVQOR_WORKFLOWS", names, ""),
    ("callback_secret", "CALLBACK_SECRET", secret, ""),
    ("callback_secret_next", "CALLBACK_SECRET_NEXT", secret, ""),
    ("callback_allow_private", "CALLBACK_ALLOW_PRIVATE", flag, "0"),
    ("callback_threads", "CALLBACK_THREADS", whole(1, 64), "2"),
    ("max_cost_per_job", "MAX_COST_PER_JOB", money, "0.35"),
    ("max_cost_per_day", "MAX_COST_PER_DAY", money, "10"),
    ("openai_base_url", "OPENAI_BASE_URL", text, "https://api.openai.com/v1"),
    ("openai_api_key", "OPENAI_API_KEY", text, ""),
    ("model_prices", "MODEL_PRICES", text, ""),  # path of a JSON file
    ("llm_limits", "LLM_LIMITS", llm_limits, ""),
    ("log_level", "LOG_LEVEL", choice("debug", "info", "warning", "error"), "info"),
    ("public_dir", "LEVQOR_PUBLIC_DIR", text, os.path.join(HERE, "public")),
    # Read by gunicorn.conf.py: the server around the app.
    ("host", "HOST", text, ""),  # blank: 0.0.0.0 in production, else 127.0.0.1
    ("port", "PORT", whole(1, 65535), "5000"),
    ("web_concurrency", "WEB_CONCURRENCY", whole(0, 256), "0"),  # 0: by JOB_STORE
    ("threads", "THREADS", whole(1, 256), "4"),
    ("read_timeout", "READ_TIMEOUT", seconds(0.1, 3600), "5"),
    ("request_timeout", "REQUEST_TIMEOUT", seconds(0.1, 3600), "10"),
    ("keepalive_linger", "KEEPALIVE_LINGER", seconds(0, 5), "0.1"),
    ("gunicorn_log_level", "GUNICORN_LOG_LEVEL", choice("debug", "info", "warning", "error",
                                                        "critical"), "info"),
    # Blank: a quarter of MAX_COST_PER_DAY (costs.Guardrails).
    ("key_daily_budget", "KEY_DAILY_BUDGET", money_or_blank, ""),
    ("callback_scan_interval", "CALLBACK_SCAN_INTERVAL", seconds(0.1, 3600), "30"),
    # Claims held waiting for a job (claim's "wait") per process: each holds
    # a request thread, so at most THREADS - 1, leaving one to serve others.
    ("claim_waiters", "CLAIM_WAITERS", whole(0, 256), "2"),
    ("public_job_status", "PUBLIC_JOB_STATUS", flag, "0"),
    ("admin_session_ttl", "ADMIN_SESSION_TTL", whole(60, 30 * 86_400), "28800"),  # 8 h
    ("metrics_token", "METRICS_TOKEN", token, ""),  # a bearer token for scrapers; blank: none
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting Levqor reads, one field per row of SETTINGS; nothing
    else looks at os.environ. Build one with ``Settings.from_env()``."""

    env: str
    api_keys: tuple
    api_keys_next: tuple
    public_user_reads: bool
    rate_burst: int
    rate_global: int
    rate_read: int
    rate_worker: int
    rate_anon: int               # writes without a valid key, per client address
    rate_anon_global: int        # ... and from all of them together
    rate_table_size: int
    trusted_proxies: tuple
    max_content_length: int
    max_batch_content_length: int
    cors_origins: tuple
    database_url: str = dataclasses.field(repr=False)  # may hold a password
    database_statement_timeout: int  # ms any one PostgreSQL statement may take
    sqlite_path: str
    sqlite_busy_timeout: int     # ms a write waits for another process's lock
    job_store: str
    job_ttl: int
    max_jobs: int
    worker_threads: int
    job_timeout: int
    job_max_attempts: int
    job_backoff: int
    job_backoff_cap: int
    job_priority_aging: int
    job_lease: int
    sweep_interval: float        # seconds between the engine's lease sweeps
    purge_interval: float        # seconds between retention purges
    workflows: tuple
    callback_secret: str
    callback_secret_next: str
    callback_allow_private: bool
    callback_threads: int
    max_cost_per_job: int        # micro-dollars
    max_cost_per_day: int
    openai_base_url: str
    openai_api_key: str
    model_prices: str
    llm_limits: dict             # {model: {"rpm": n, "tpm": n}}; empty: none
    log_level: str
    public_dir: str
    host: str
    port: int
    web_concurrency: int
    threads: int
    read_timeout: float          # seconds of silence in one read of a request
    request_timeout: float       # seconds for a whole request's head and body
    keepalive_linger: float      # seconds a thread waits on its kept-alive connection
    gunicorn_log_level: str
    key_daily_budget: object     # micro-dollars for a managed key without its own; None: default
    callback_scan_interval: float  # seconds between scans for deliveries whose sender died
    claim_waiters: int  # requests that may wait at once (claims, status reads), per process
    public_job_status: bool      # production: anyone with a job id may read its status
    admin_session_ttl: int       # seconds a dashboard session lasts from its login
    metrics_token: str = dataclasses.field(repr=False)  # Bearer token that may read /metrics

    @property
    def production(self):
        return self.env == "production"

    @property
    def dev_endpoints(self):
        return not self.production

    @property
    def job_status_public(self):
        """Anyone with a job id may read its status: in development, or with PUBLIC_JOB_STATUS=1."""
        return self.public_job_status or not self.production

    @property
    def callback_secrets(self):
        """CALLBACK_SECRET, then CALLBACK_SECRET_NEXT: the keys deliveries are signed with."""
        return tuple(s for s in (self.callback_secret, self.callback_secret_next) if s)

    @property
    def bind(self):
        # Open development mode must not listen on every interface.
        host = self.host or ("0.0.0.0" if self.production else "127.0.0.1")
        return f"{host}:{self.port}"

    @property
    def shared_jobs(self):
        """Whether jobs are in a database every process can open (SQLite or
        PostgreSQL), rather than in one process's memory."""
        return bool(self.database_url) or self.job_store == "sqlite"

    @property
    def workers(self):
        """gunicorn worker processes: one with the memory job store (jobs
        live in one process's memory), one per core with a database."""
        if self.web_concurrency:
            return self.web_concurrency
        return (os.cpu_count() or 1) if self.shared_jobs else 1

    @classmethod
    def from_env(cls, environ=None):
        env = os.environ if environ is None else environ
        values = {}
        for field, variable, parse, default in SETTINGS:
            raw = env.get(variable)
            if raw is None or (not raw.strip() and parse is not names):
                raw = default
                if isinstance(default, dict):  # LEVQOR_ENV is the first row: read already
                    raw = default["production" if values["env"] == "production" else "other"]
            try:
                values[field] = parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{variable} {exc}") from None
        if values["callback_secret_next"] and not values["callback_secret"]:
            raise ConfigError("CALLBACK_SECRET_NEXT is set without CALLBACK_SECRET")
        values["log_level"] = values["log_level"].upper()
        if values["job_store"] == "memory" and values["web_concurrency"] > 1 \
                and not values["database_url"]:
            # Each process would hold jobs the others cannot see, and release
            # money they hold as if their jobs were gone.
            raise ConfigError("JOB_STORE=memory keeps jobs in one process: set WEB_CONCURRENCY "
                              "to 1, or use JOB_STORE=sqlite for several workers")
        return cls(**values)


assert [f.name for f in dataclasses.fields(Settings)] == [row[0] for row in SETTINGS]

# ---------------------------------------------------------------------------
# Logging: one JSON object per line
# ---------------------------------------------------------------------------


class JsonLog(Background):
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
    NAME = "levqor-log"

    def __init__(self, stream, level="INFO", interval=0.25):
        self.stream = stream
        self.threshold = self.LEVELS[level]
        self.interval = interval
        super().__init__()
        self._lock = threading.Lock()
        self._buffer = []
        self._size = 0
        self._second = None
        self._prefix = ""

    def stop(self):
        super().stop()
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
# Assembly
# ---------------------------------------------------------------------------


class Services:
    """What handlers reach through ``request.services``: settings, stores, the
    job engine, the log."""

    def __init__(self, settings, log, registry):
        self.settings = settings
        self.log = log
        self.keys = KeyRing(settings.api_keys + settings.api_keys_next)
        clock = time.time
        if settings.database_url:
            self.db = self._postgres(settings)
            # Every host reads the database's clock: leases, backoffs, TTLs
            # and budget days agree however far apart the hosts' clocks are.
            clock = pg.DbClock(self.db)
            self.jobs = SqlJobStore(self.db, settings.max_jobs, settings.job_ttl,
                                    settings.job_priority_aging, clock=clock)
        else:
            # Several worker processes write the file: they queue on a lock
            # file (and watch it for jobs). One alone needs neither.
            self.db = Database(settings.sqlite_path, settings.sqlite_busy_timeout,
                               shared=settings.job_store == "sqlite" and settings.workers > 1)
            if settings.job_store == "sqlite":
                self.jobs = SqlJobStore(self.db, settings.max_jobs, settings.job_ttl,
                                        settings.job_priority_aging)
            else:
                self.jobs = MemoryJobStore(settings.max_jobs, settings.job_ttl,
                                           settings.job_priority_aging)
        self.clock = clock
        self.users = UserStore(self.db, schemas.MAX_META_KEYS, schemas.MAX_META_BYTES)
        self.recorder = Recorder(self.db, log, clock=clock)
        self.callbacks = callbacks.Callbacks(
            self.jobs, log, settings.callback_secrets, settings.callback_allow_private,
            threads=settings.callback_threads, view=engine.status_view,
            scan_interval=settings.callback_scan_interval, clock=clock)
        self.ledger = Ledger(self.db, clock=clock)
        self.key_store = KeyStore(self.db, clock=clock)
        self.guardrails = costs.Guardrails(self.ledger, settings.max_cost_per_job,
                                           settings.max_cost_per_day,
                                           key_budget=settings.key_daily_budget,
                                           keys=self.key_store)
        self.engine = engine.Engine(
            self.jobs, registry, log, threads=settings.worker_threads,
            timeout=settings.job_timeout, max_attempts=settings.job_max_attempts,
            backoff=settings.job_backoff, backoff_cap=settings.job_backoff_cap,
            local_lease=settings.job_lease, guardrails=self.guardrails,
            sweep_interval=settings.sweep_interval, purge_interval=settings.purge_interval,
            claim_waiters=max(0, min(settings.claim_waiters, settings.threads - 1)),
            clock=clock, on_finish=[self._finished, self.guardrails.settle, self.callbacks.on_finish])
        self.schedules = ScheduleStore(self.db, clock=clock)
        self.scheduler = Scheduler(self.schedules, self.engine, self.key_store, log, clock=clock)
        if settings.openai_api_key and settings.model_prices:
            try:
                prices = llm.load_prices(settings.model_prices)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"MODEL_PRICES: {exc}") from None
            self.engine.llm = llm.Client(settings.openai_base_url, settings.openai_api_key, prices)
        if settings.llm_limits:
            self.engine.llm_limits = llm.ProviderLimits(self.db, settings.llm_limits, clock)
        # The operator's views across every key, and this host's metrics
        # (the dashboard and /metrics): outcomes, and callback attempts, counted.
        self.insights = Insights(self.jobs, self.db)
        self.metrics = metrics.Metrics(self)
        self.engine.on_finish.append(self.metrics.on_finish)
        self.callbacks.post = self.metrics.counted(self.callbacks.post)
        self.openapi_body = openapi_body(settings.max_cost_per_job, settings.job_status_public)
        # Workflows' payload schemas, compiled once.
        self.payload_validators = {}
        for name in registry.names():
            schema = registry.get(name).schema
            if schema is not None:
                jsonschema.Draft202012Validator.check_schema(schema)
                self.payload_validators[name] = schemas.Validator(schema)
        self.started_at = time.time()
        self._db_checked = (float("-inf"), True)  # (when, answer) of the last ping
        self.pid = None  # the process whose background threads are running
        self.stopped = False  # stop() has begun: requests are answered 503 (middleware.ErrorGuard)
        self._lock = threading.Lock()

    def _postgres(self, settings):
        # A connection for each thread that may query at once: request
        # threads, job and callback threads, and the background ones
        # (sweeper, recorder, callback scanner, and one to spare).
        pool_size = settings.threads + settings.worker_threads + settings.callback_threads + 4
        try:
            return pg.PgDatabase(settings.database_url, pool_size=pool_size,
                                 statement_timeout_ms=settings.database_statement_timeout,
                                 log=self.log)
        except RuntimeError as exc:  # psycopg is not installed
            raise ConfigError(str(exc)) from None

    def database_ok(self):
        """Whether the database answers, asked at most once a second (the
        health check is polled hard). The SQLite file is this host's own:
        a request that cannot use it says so itself."""
        if not self.settings.database_url:
            return True
        now = time.monotonic()
        if now - self._db_checked[0] >= 1.0:
            try:
                ok = self.db.ping()
            except Exception:
                ok = False
            self._db_checked = (now, ok)
        return self._db_checked[1]

    def _finished(self, job):
        self.recorder.count("finished")
        if job["status"] == "failed":  # the dashboard's failure charts
            self.recorder.count("failed")
        self.recorder.outcome(job)

    def start(self):
        """Open the database and start the background writer, once per process.

        Called by gunicorn's post_worker_init hook, and on the first request
        for servers that have no such hook. Never before a fork.
        """
        with self._lock:
            if self.pid == os.getpid():
                return
            self.log.start()
            if self.settings.database_url:
                self.log.info("storage: PostgreSQL; SQLITE_PATH and JOB_STORE are ignored",
                              database=pg.redact(self.settings.database_url))
                try:
                    self.db.connection()  # opens the pool and migrates
                except StorageError:  # serve 503s meanwhile; the first query retries
                    self.log.error("the database is unavailable at start; retrying on use")
                self.clock.measure()
                self.clock.start()
            else:
                self.db.connection()  # migrates; a bad SQLITE_PATH fails here, loudly
            self.recorder.start()
            self._quarantine()
            self.engine.start()
            self.callbacks.start()
            self.scheduler.start()
            self.pid = os.getpid()
            self.stopped = False

    def _quarantine(self):
        """Set aside job rows that cannot be read, before anything scans them.

        They go to their own table rather than stay as failed jobs: a row
        that SQLite cannot read as JSON breaks every query that looks inside
        it, and its job could not be shown, retried or sent on intact either.
        """
        try:
            for job_id in self.jobs.quarantine():
                self.log.error("corrupt job record set aside", job_id=job_id,
                               table="jobs_quarantine", error_type="corrupt_record")
        except Exception:  # start anyway: the next start looks again
            self.log.error("corrupt record scan failed", traceback=traceback.format_exc())

    def stop(self, grace=25.0):
        """Let running jobs finish within ``grace`` seconds, then write what is buffered."""
        self.stopped = True  # first: nothing new is taken while the stores close
        self.scheduler.stop()
        self.engine.stop(grace)
        self.callbacks.stop()
        self.recorder.stop()
        if self.settings.database_url:
            self.clock.stop()
        self.db.close()  # the pool and the listening connection, or the file's watch
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

    def stopping(self):
        """A stop is coming (SIGTERM): claims waiting for a job answer now,
        and the pool starts no more jobs, so that the requests in flight,
        which the server lets finish first, finish at once."""
        self.services.engine.stopping()

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
    wsgi = dashboard.Dashboard(wsgi, services)  # /admin: the operator's pages
    wsgi = middleware.ErrorGuard(wsgi, log, stopped=lambda: services.stopped)
    wsgi = metrics.HttpMetrics(wsgi, services.metrics)
    wsgi = middleware.SecureHeaders(wsgi, settings)
    wsgi = middleware.AccessLog(wsgi, settings, log)
    return Levqor(wsgi, services)


def __getattr__(name):
    """``levqor.app``, built from the environment on first use (PEP 562), so
    that importing this module reads no setting and opens nothing."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
