"""PostgreSQL: the database several Levqor hosts share (``DATABASE_URL``).

``PgDatabase`` answers the same calls as ``storage.Database`` (``query``,
``write``, ``write_one``, ``ping``, ``close``), so every store runs on either;
the statements that must differ live beside each store's own, in a
``POSTGRES`` table of overrides. Here: the connection pool, transactions,
the versioned schema and its migrations, the notifications that wake idle
workers on every host, and the one clock all hosts read.

psycopg and psycopg_pool are optional (requirements-postgres.txt): this
module imports them only when a PgDatabase is made.
"""

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import urllib.parse

from background import Background
from storage import StorageError

INSTALL_HINT = "pip install -r requirements-postgres.txt"
CHANNEL = "levqor_jobs"  # NOTIFY'd with the workflow's name when a job is queued

# Each entry moves the schema from version i to i + 1 (the row in
# schema_version). Append only: a released migration is never edited, and a
# later one may add a column, an index or a table without a manual step.
MIGRATIONS = [
    r"""
    CREATE TABLE users (
        id         text PRIMARY KEY,
        owner      text NOT NULL,
        email      text NOT NULL,
        name       text,
        locale     text,
        currency   text,
        meta       jsonb NOT NULL DEFAULT '{}',
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        UNIQUE (owner, email)
    );
    -- RFC 7396 merge patch, as SQLite's json_patch: a null removes a key.
    CREATE FUNCTION json_patch(target jsonb, patch jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE k text; v jsonb;
    BEGIN
        IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN RETURN patch; END IF;
        IF jsonb_typeof(target) IS DISTINCT FROM 'object' THEN target := '{}'; END IF;
        FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
            IF jsonb_typeof(v) = 'null' THEN
                target := target - k;
            ELSE
                target := jsonb_set(target, ARRAY[k], json_patch(target -> k, v));
            END IF;
        END LOOP;
        RETURN target;
    END $$;

    CREATE TABLE audit_log (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts         double precision NOT NULL,
        key_id     text NOT NULL,
        method     text NOT NULL,
        path       text NOT NULL,
        status     integer NOT NULL,
        request_id text NOT NULL
    );
    CREATE INDEX audit_log_ts ON audit_log (ts);
    CREATE TABLE minutes (
        minute      bigint PRIMARY KEY,
        jobs        bigint NOT NULL DEFAULT 0,
        auth_writes bigint NOT NULL DEFAULT 0,
        finished    bigint NOT NULL DEFAULT 0
    );

    -- Jobs: the whole job as jsonb in data, and beside it the columns the
    -- queue, the sweeps and the listings search by (as in SQLite).
    CREATE TABLE jobs (
        seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id           text NOT NULL UNIQUE,
        status           text NOT NULL,
        workflow         text NOT NULL,
        priority         text NOT NULL,
        key_id           text NOT NULL,
        score            double precision NOT NULL,
        not_before       double precision NOT NULL,
        lease_expires_at double precision,
        finished_at      double precision,
        callback_due     double precision,
        concurrency_key  text,
        schedule         text,
        created_at       double precision,
        data             jsonb NOT NULL
    );
    -- A claim reads the first entry of one of these: the score (priority
    -- aging included) is fixed when the job is queued, so no claim sorts.
    CREATE INDEX jobs_ready ON jobs (score, seq) WHERE status = 'queued';
    CREATE INDEX jobs_queue ON jobs (workflow, score, seq) WHERE status = 'queued';
    CREATE INDEX jobs_due ON jobs (not_before) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_owner ON jobs (key_id, seq);
    CREATE INDEX jobs_callbacks ON jobs (callback_due) WHERE callback_due IS NOT NULL;
    CREATE INDEX jobs_running ON jobs (workflow, concurrency_key) WHERE status = 'running';
    CREATE INDEX jobs_scheduled ON jobs (not_before) WHERE status = 'scheduled';
    CREATE INDEX jobs_waiting ON jobs (seq) WHERE status = 'waiting';
    CREATE TABLE workflow_limits (
        workflow   text PRIMARY KEY,
        limits     text NOT NULL,
        rate_count integer,
        rate_per   double precision,
        next_slot  integer NOT NULL DEFAULT 0
    );
    CREATE TABLE workflow_starts (
        workflow text NOT NULL,
        slot     integer NOT NULL,
        started  double precision NOT NULL,
        PRIMARY KEY (workflow, slot)
    );
    CREATE TABLE schedules (
        key_id     text NOT NULL,
        name       text NOT NULL,
        spec       text NOT NULL,
        paused     integer NOT NULL DEFAULT 0,
        next_fire  double precision,
        last_fire  double precision,
        last_job   text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (key_id, name)
    );
    CREATE INDEX schedules_due ON schedules (next_fire) WHERE paused = 0;
    CREATE TABLE llm_minutes (
        model    text NOT NULL,
        minute   bigint NOT NULL,
        requests bigint NOT NULL,
        tokens   bigint NOT NULL,
        PRIMARY KEY (model, minute)
    );

    -- How many jobs are held: an intake takes a slot in the same statement
    -- as its insert (jobstore.POSTGRES["insert"]), and deletes give theirs
    -- back by this trigger, so MAX_JOBS holds exactly across hosts.
    CREATE TABLE job_count (id integer PRIMARY KEY CHECK (id = 1), n bigint NOT NULL);
    INSERT INTO job_count VALUES (1, 0);
    CREATE FUNCTION jobs_counted_out() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE job_count SET n = n - (SELECT count(*) FROM gone) WHERE id = 1;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION jobs_counted_out();

    -- Wake the idle workers of every host when a job is queued; sent at
    -- commit, so a worker never looks before the job is there.
    CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('levqor_jobs', NEW.workflow);
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_queued AFTER INSERT OR UPDATE OF status, not_before ON jobs
        FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION jobs_notify();

    CREATE TABLE idempotency (
        key_id    text NOT NULL,
        key       text NOT NULL,
        body_hash text NOT NULL,
        job_id    text NOT NULL,
        expires   double precision NOT NULL,
        PRIMARY KEY (key_id, key)
    );
    CREATE INDEX idempotency_expires ON idempotency (expires);

    CREATE TABLE ledger (
        id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts       double precision NOT NULL,
        day      text NOT NULL,
        job_id   text NOT NULL,
        key_id   text NOT NULL,
        workflow text NOT NULL,
        amount   bigint NOT NULL,
        kind     text NOT NULL CHECK (kind IN ('reserve', 'charge', 'release')),
        note     text
    );
    CREATE INDEX ledger_day ON ledger (day, key_id);
    CREATE INDEX ledger_job ON ledger (job_id);
    CREATE TABLE ledger_days (
        day    text NOT NULL,
        key_id text NOT NULL,
        used   bigint NOT NULL,
        PRIMARY KEY (day, key_id)
    );
    CREATE TABLE ledger_jobs (
        job_id   text PRIMARY KEY,
        day      text NOT NULL,
        key_id   text NOT NULL,
        workflow text NOT NULL,
        reserved bigint NOT NULL,
        spent    bigint NOT NULL
    );
    CREATE INDEX ledger_jobs_reserved ON ledger_jobs (day, key_id) WHERE reserved > 0;

    CREATE TABLE api_keys (
        id              text PRIMARY KEY,
        name            text NOT NULL,
        role            text NOT NULL CHECK (role IN ('client', 'worker')),
        prefix          text NOT NULL,
        digest          bytea NOT NULL UNIQUE,
        daily_budget    bigint,
        rate_per_minute integer,
        created_at      double precision NOT NULL,
        last_used_at    double precision,
        revoked_at      double precision,
        workflows       text
    );
    CREATE TABLE job_outcomes (
        day      text NOT NULL,
        workflow text NOT NULL,
        key_id   text NOT NULL,
        status   text NOT NULL,
        n        bigint NOT NULL,
        PRIMARY KEY (day, workflow, key_id, status)
    );
    """,
    """
    -- Operator dashboard sessions, as in storage.MIGRATIONS.
    CREATE TABLE admin_sessions (
        digest     text PRIMARY KEY,
        key_id     text NOT NULL,
        csrf       text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL
    );
    CREATE INDEX admin_sessions_expires ON admin_sessions (expires_at);
    ALTER TABLE minutes ADD COLUMN failed bigint NOT NULL DEFAULT 0;
    """,
    """
    -- Durable steps (as in storage.MIGRATIONS): parents' waits never due,
    -- sleeps due when they end; the step a charge was made in.
    UPDATE jobs SET not_before = 1e18, data = jsonb_set(data, '{not_before}', '1e18')
        WHERE status = 'waiting';
    CREATE INDEX jobs_waking ON jobs (not_before) WHERE status = 'waiting';
    ALTER TABLE ledger ADD COLUMN step text;
    """,
    """
    -- A batch's own idempotency key (as in storage.MIGRATIONS): its jobs' ids.
    ALTER TABLE idempotency ADD COLUMN job_ids text;
    """,
]


def installed():
    """Whether psycopg and psycopg_pool can be imported."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return False
    return True


def lock_key(name):
    """The advisory lock's number for ``name``: a signed 64-bit digest."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def redact(url):
    """The URL with its password replaced: what a log line may show."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


# Named parameters, written ``:name`` as SQLite takes them, become psycopg's
# ``%(name)s``; a quoted string, a ``::cast`` and a literal % are left as
# they are meant.
_TOKENS = re.compile(r"'[^']*'|::|(?<![\w:]):([A-Za-z_]\w*)|%")


def translate(sql):
    def one(match):
        if match.group(1):
            return f"%({match.group(1)})s"
        return "%%" if match.group(0) == "%" else match.group(0)
    return _TOKENS.sub(one, sql)


UNAVAILABLE = "the database is unavailable; try again shortly"
# SQLSTATE classes and codes, and what a caller is told.
_BUSY = {"57014", "40001", "40P01", "55P03"}  # statement timeout, serialization, deadlock, lock
_REFUSED = {"22P05"}  # a string PostgreSQL cannot store (\u0000)


def _storage_error(exc):
    """The StorageError for a psycopg or pool error; None for a bug of ours
    (bad SQL, a constraint), which must surface as such."""
    import psycopg
    import psycopg_pool
    if isinstance(exc, psycopg_pool.PoolTimeout) or isinstance(exc, psycopg.OperationalError) \
            and getattr(exc, "sqlstate", None) not in _BUSY | {"53100"}:
        return StorageError("unavailable", UNAVAILABLE)
    state = getattr(exc, "sqlstate", None)
    if state in _BUSY:
        return StorageError("busy", "the database is busy, try again shortly")
    if state == "53100":
        return StorageError("full", "the database cannot grow: the disk is full")
    if state in _REFUSED:
        return StorageError("refused", "a string holds \\u0000, which this database cannot store")
    return None


class _Connection:
    """A connection inside a transaction, with the calls the stores make of
    a sqlite3 connection: ``execute`` (a cursor) and ``executemany``."""

    def __init__(self, conn, statements):
        self.conn = conn
        self.statements = statements

    def execute(self, sql, params=None):
        return self.conn.execute(self.statements(sql), params)

    def executemany(self, sql, seq):
        seq = list(seq)
        if seq:
            with self.conn.cursor() as cur:
                cur.executemany(self.statements(sql), seq)


class PgDatabase:
    """A PostgreSQL database, through a pool of connections per process.

    The pool opens lazily in the process that first needs it (never before
    gunicorn forks) and holds at most ``pool_size`` connections: one per
    thread that may query at once. Every statement has ``statement_timeout``
    and every connection attempt ``connect_timeout``, so no thread waits on a
    database that is gone for longer than that: it gets StorageError
    "unavailable" (503), and the pool replaces the broken connections by
    itself once the server is back.
    """

    dialect = "postgres"
    DOWN_FOR = 1.0  # seconds after a connection failure in which requests fail at once

    def __init__(self, url, pool_size=10, statement_timeout_ms=5000, connect_timeout=3,
                 log=None):
        if not installed():
            raise RuntimeError(f"DATABASE_URL is set but psycopg is not installed: {INSTALL_HINT}")
        self.url = url
        self.pool_size = pool_size
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout = connect_timeout
        self.log = log
        self._pool = None
        self._pid = None
        self._lock = threading.Lock()
        self._migrated_in = None
        self._sql = {}  # statement as written -> as psycopg takes it
        self._listener = None
        self._down_until = 0.0  # while the database is failing: until when to answer at once
        # The pool logs every failed reconnection to stderr; Levqor logs the
        # outage itself, once per refused request, as JSON.
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

    # -- connections -------------------------------------------------------------

    def statements(self, sql):
        translated = self._sql.get(sql)
        if translated is None:
            translated = self._sql[sql] = translate(sql)
        return translated

    def _configure(self, conn):
        from psycopg.types.string import TextLoader
        # JSON comes back as text, exactly as from SQLite: the stores parse
        # it themselves, one code path for both databases.
        conn.adapters.register_loader("jsonb", TextLoader)
        conn.adapters.register_loader("json", TextLoader)
        conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
        conn.execute("SET idle_in_transaction_session_timeout = 60000")

    def _pool_now(self):
        if self._migrated_in == os.getpid():  # PERF: the pool is open and the schema current
            return self._pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                from psycopg.rows import dict_row
                from psycopg_pool import ConnectionPool
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=False,
                    kwargs={"autocommit": True, "row_factory": dict_row,
                            "connect_timeout": self.connect_timeout},
                    configure=self._configure, timeout=self.connect_timeout + 2,
                    reconnect_timeout=0, name="levqor")
                self._pool.open(wait=False)
                self._pid = os.getpid()
        self.migrate()
        return self._pool

    @contextlib.contextmanager
    def _connection(self):
        import psycopg
        import psycopg_pool
        down_until = self._down_until
        if down_until:
            # The database failed lately. Within DOWN_FOR of that, answer at
            # once rather than have every thread wait out the pool's timeout;
            # then one request at a time looks, with a connection of its own
            # (the pool, having failed to connect, would make it wait out its
            # whole timeout).
            now = time.monotonic()
            if now < down_until:
                raise StorageError("unavailable", UNAVAILABLE)
            self._down_until = now + self.DOWN_FOR
            self._probe()
        try:
            with self._pool_now().connection() as conn:
                yield conn
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            error = _storage_error(exc)
            if error is None:
                raise
            if error.kind == "unavailable":
                self._down_until = time.monotonic() + self.DOWN_FOR
                if self._pool is not None:
                    self._pool.check()  # replace the other idle connections that broke too
            raise error from exc
        self._down_until = 0.0

    def _probe(self):
        """Whether the database answers again: StorageError if not."""
        import psycopg
        try:
            with psycopg.connect(self.url, connect_timeout=self.connect_timeout) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            self._down_until = time.monotonic() + self.DOWN_FOR
            raise StorageError("unavailable", UNAVAILABLE) from exc
        if self._pool is not None:
            self._pool.check()  # back: replace what broke while it was away

    def connection(self):
        """Open the pool and migrate (what storage.Database.connection does at start)."""
        with self._connection() as conn:
            conn.execute("SELECT 1")

    # -- the calls the stores make -------------------------------------------------

    @contextlib.contextmanager
    def write(self, lock=None, pipeline=False):
        """A transaction: COMMIT at the end, ROLLBACK on any error.

        ``lock`` names what the transaction must have to itself (its money,
        an idempotency key): it holds a transaction-scoped advisory lock on
        that name, taken first, so such transactions run one after another
        across every host. In SQLite every write transaction is that already.

        PERF: ``pipeline`` sends each statement without waiting for the one
        before, until a result is read (psycopg's pipeline mode): for a
        transaction whose statements need few answers. Without it, BEGIN and
        the lock still go in one round trip (one simple query, which is why
        the lock's key is a number made here, not a parameter).
        """
        lock_sql = None if lock is None else f"SELECT pg_advisory_xact_lock({lock_key(lock)})"
        with self._connection() as conn:
            with conn.pipeline() if pipeline else contextlib.nullcontext():
                if pipeline or lock_sql is None:
                    conn.execute("BEGIN")
                    if lock_sql is not None:
                        conn.execute(lock_sql)
                else:
                    conn.execute(f"BEGIN; {lock_sql}")
                try:
                    yield _Connection(conn, self.statements)
                except BaseException:
                    if not conn.closed:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    def write_one(self, sql, params=()):
        """One statement as its own transaction (autocommit); its RETURNING rows."""
        with self._connection() as conn:
            cur = conn.execute(self.statements(sql), params or None)
            return cur.fetchall() if cur.description else []

    def query(self, sql, params=()):
        """Rows of a statement as dicts."""
        with self._connection() as conn:
            return conn.execute(self.statements(sql), params or None).fetchall()

    def checkpoint(self):
        """Nothing to do: PostgreSQL checkpoints by itself."""

    def ping(self):
        return self.query("SELECT 1 AS ok")[0]["ok"] == 1

    def now(self):
        """The database's clock, in Unix seconds."""
        return float(self.query("SELECT extract(epoch FROM clock_timestamp()) AS t")[0]["t"])

    def listen(self, wake):
        """Call ``wake(workflow)`` whenever any host queues a job (one
        Listener thread per process, started in the process that asks)."""
        if self._listener is None or self._listener.pid != os.getpid():
            self._listener = Listener(self.url, wake, self.log)
        self._listener.start()

    def close(self):
        if self._listener is not None and self._listener.pid == os.getpid():
            self._listener.stop()
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None

    # -- migrations --------------------------------------------------------------

    def migrate(self):
        """Bring the schema to the newest version, once across all hosts.

        A session-level advisory lock makes hosts starting together take
        turns: the first migrates, the others then find nothing to do. Each
        migration commits with its version number, so no host ever sees a
        half-migrated schema. The lock is per schema (tests use several).
        """
        import psycopg
        with self._lock:
            if self._migrated_in == os.getpid():
                return
            try:
                with self._pool.connection() as conn:
                    lock = "SELECT pg_advisory_lock(hashtextextended('levqor.migrate.' || current_schema(), 0))"
                    conn.execute(lock)
                    try:
                        self._migrate(conn)
                    finally:
                        conn.execute(lock.replace("pg_advisory_lock", "pg_advisory_unlock"))
            except psycopg.Error as exc:
                raise (_storage_error(exc) or exc) from exc
            self._migrated_in = os.getpid()

    @staticmethod
    def _migrate(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version VALUES (0)")
        version = row["version"] if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with conn.transaction():
                conn.execute(script)
                conn.execute("UPDATE schema_version SET version = %s", (number,))


class DbClock(Background):
    """The database's clock, read without a round trip.

    Every host judges leases, backoffs, TTLs and budget days by this clock,
    so hosts whose own clocks disagree still agree on them. It is the host's
    clock plus an offset measured against ``clock_timestamp()`` (to within
    half a round trip): once on first use, then every ``every`` seconds by a
    thread of its own once ``start``ed, so that reading the time never waits
    on the database. If the database cannot be asked, the last offset stands.
    """

    NAME = "levqor-clock"

    def __init__(self, db, host_clock=time.time, every=30.0):
        self.db = db
        self.host_clock = host_clock
        self.every = every
        self.offset = 0.0
        self._measured = False
        super().__init__()

    def measure(self):
        try:
            before = self.host_clock()
            db_now = self.db.now()
            after = self.host_clock()
        except StorageError:
            return self.offset  # keep the last one
        self.offset = db_now - (before + after) / 2
        return self.offset

    def _run(self):
        while not self._stop.wait(self.every):
            self.measure()

    def __call__(self):
        if not self._measured:
            self._measured = True
            self.measure()
        return self.host_clock() + self.offset


class Listener(Background):
    """One connection per process that LISTENs for queued jobs and calls
    ``wake(workflow)`` for each notification (None: anything may be queued), so an idle worker on any host starts a
    job within milliseconds of its intake on another. If the connection
    drops it reconnects; the workers' one-second poll covers the gap."""

    NAME = "levqor-listen"
    JOIN = 3.0

    def __init__(self, url, wake, log=None):
        self.url = url
        self.wake = wake
        self.log = log
        self.pid = os.getpid()
        super().__init__()

    def _run(self):
        import psycopg
        lost = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    lost = False
                    self.wake(None)  # anything queued while we were not listening
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self.wake(notice.payload)  # the workflow's name
            except Exception as exc:
                if self.log is not None and not lost and not self._stop.is_set():
                    self.log.warning("job notifications lost; polling until the database is back",
                                     error=type(exc).__name__)
                lost = True
                self._stop.wait(1.0)
