"""Levqor's stores: SQLite for users, the audit log and service statistics;
a locked dict for jobs.

This module owns every byte Levqor keeps. It knows nothing of HTTP: callers
get plain dicts back and storage failures as ``StorageError`` with a kind
(``busy`` or ``full``) that the web layer turns into 503 or 507.
"""

import base64
import collections
import contextlib
import fcntl
import hashlib
import heapq
import json
import os
import sqlite3
import threading
import time
import uuid

# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
# Append only: a released migration is never edited. Statements are split on
# semicolons, so comments in them must not hold one.
MIGRATIONS = [
    """
    CREATE TABLE users (
        id         TEXT PRIMARY KEY,
        email      TEXT NOT NULL UNIQUE,
        name       TEXT,
        locale     TEXT,
        currency   TEXT,
        meta       TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE audit_log (
        id         INTEGER PRIMARY KEY,
        ts         REAL NOT NULL,
        key_fp     TEXT NOT NULL,
        method     TEXT NOT NULL,
        path       TEXT NOT NULL,
        status     INTEGER NOT NULL,
        request_id TEXT NOT NULL
    );
    CREATE INDEX audit_log_ts ON audit_log(ts);
    -- One row per minute in which the service was up, with what it counted
    -- in that minute. Uptime and the daily figures are sums over it.
    CREATE TABLE minutes (
        minute      INTEGER PRIMARY KEY,
        jobs        INTEGER NOT NULL DEFAULT 0,
        auth_writes INTEGER NOT NULL DEFAULT 0
    );
    """,
    """
    ALTER TABLE minutes ADD COLUMN finished INTEGER NOT NULL DEFAULT 0;
    """,
    """
    -- The durable job store (JOB_STORE=sqlite). The whole job is kept as
    -- JSON in data, and the columns beside it are copies that the queue,
    -- the sweeps and the listings search by.
    CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id           TEXT NOT NULL UNIQUE,
        status           TEXT NOT NULL,
        workflow         TEXT NOT NULL,
        priority         TEXT NOT NULL,
        key_fp           TEXT NOT NULL,
        score            REAL NOT NULL,
        not_before       REAL NOT NULL,
        lease_expires_at REAL,
        finished_at      REAL,
        data             TEXT NOT NULL
    );
    CREATE INDEX jobs_queue ON jobs(workflow, score) WHERE status = 'queued';
    CREATE INDEX jobs_due ON jobs(not_before) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs(lease_expires_at) WHERE status = 'running';
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_owner ON jobs(key_fp, seq);
    CREATE TABLE idempotency (
        key_fp    TEXT NOT NULL,
        key       TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        job_id    TEXT NOT NULL,
        expires   REAL NOT NULL,
        PRIMARY KEY (key_fp, key)
    );
    CREATE INDEX idempotency_expires ON idempotency(expires);
    """,
    """
    -- Every reservation, charge and release of money, in micro-dollars.
    -- day is the UTC day whose budget the row counts against (the day the
    -- job was accepted). Spend is the sum of charges, and what a day has
    -- used is the sum of all its rows.
    CREATE TABLE ledger (
        id       INTEGER PRIMARY KEY,
        ts       REAL NOT NULL,
        day      TEXT NOT NULL,
        job_id   TEXT NOT NULL,
        key_id   TEXT NOT NULL,
        workflow TEXT NOT NULL,
        amount   INTEGER NOT NULL,
        kind     TEXT NOT NULL CHECK (kind IN ('reserve', 'charge', 'release')),
        note     TEXT
    );
    CREATE INDEX ledger_day ON ledger(day, key_id);
    CREATE INDEX ledger_job ON ledger(job_id);
    -- Running totals of the ledger, kept in the same transactions, so a
    -- budget check reads one row instead of summing a day. key_id '*' is
    -- the whole service.
    CREATE TABLE ledger_days (
        day    TEXT NOT NULL,
        key_id TEXT NOT NULL,
        used   INTEGER NOT NULL,
        PRIMARY KEY (day, key_id)
    );
    CREATE TABLE ledger_jobs (
        job_id   TEXT PRIMARY KEY,
        day      TEXT NOT NULL,
        key_id   TEXT NOT NULL,
        workflow TEXT NOT NULL,
        reserved INTEGER NOT NULL,
        spent    INTEGER NOT NULL
    );
    -- Managed API keys: only a SHA-256 digest of each secret is kept.
    CREATE TABLE api_keys (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        role            TEXT NOT NULL CHECK (role IN ('client', 'worker')),
        prefix          TEXT NOT NULL,
        digest          BLOB NOT NULL UNIQUE,
        daily_budget    INTEGER,
        rate_per_minute INTEGER,
        created_at      REAL NOT NULL,
        last_used_at    REAL,
        revoked_at      REAL
    );
    -- Finished jobs counted per UTC day, workflow, key and outcome.
    CREATE TABLE job_outcomes (
        day      TEXT NOT NULL,
        workflow TEXT NOT NULL,
        key_id   TEXT NOT NULL,
        status   TEXT NOT NULL,
        n        INTEGER NOT NULL,
        PRIMARY KEY (day, workflow, key_id, status)
    );
    """,
]
# What the Recorder counts per minute: columns of the minutes table.
COUNTERS = ("jobs", "auth_writes", "finished")

USER_COLUMNS = ("id", "email", "name", "locale", "currency", "meta", "created_at", "updated_at")


class StorageError(Exception):
    """The database cannot take the request now: ``kind`` is busy or full."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def _translate(exc):
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StorageError("busy", "the database is busy, try again shortly")
    if "full" in text or "disk i/o" in text:
        return StorageError("full", "the database cannot grow: the disk is full")
    return None


def _dict_row(cursor, row):
    return {d[0]: v for d, v in zip(cursor.description, row)}


class Database:
    """One SQLite file, one connection per thread.

    Connections open lazily, on the thread that first needs one, so nothing is
    opened before gunicorn forks; a connection inherited across a fork is never
    reused (the pid is checked). Every connection sets its pragmas at open.
    """

    def __init__(self, path, busy_timeout_ms=5000, shared=False):
        self.path = path
        self.shared = shared  # several processes write (JOB_STORE=sqlite): lock across them
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._migrated_in = None  # pid that has run the migrations
        self._lock = threading.Lock()
        # One writer at a time. SQLite allows one anyway, but a writer that
        # finds SQLite's lock taken sleeps in steps of milliseconds (its busy
        # handler), while one waiting on these locks is woken the moment the
        # writer is done: a thread lock within the process, and an flock on
        # a file beside the database across processes (several gunicorn
        # workers). busy_timeout still covers writers that take neither.
        self._write_lock = threading.Lock()
        self._flock = None  # (pid, fd) of this process's lock file

    def connection(self):
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = local.conn = self._open()
            local.pid = os.getpid()
        return conn

    def _open(self):
        # One thread of this process opens at a time: the first open of a new
        # file switches it to WAL, which needs the file to itself.
        with self._lock:
            try:
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                       isolation_level=None, check_same_thread=True)
                conn.row_factory = _dict_row
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                self._wal(conn)
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                # PERF: the Recorder thread checkpoints the WAL every second, so a
                # request never pays for copying it back (a stall of tens of ms).
                # This is only the backstop should that thread not run.
                conn.execute("PRAGMA wal_autocheckpoint = 10000")
                if self._migrated_in != os.getpid():
                    self._migrate(conn)
                    self._migrated_in = os.getpid()
            except sqlite3.OperationalError as exc:
                raise (_translate(exc) or exc) from exc
        return conn

    def _wal(self, conn):
        """Switch to WAL. Another process switching the same new file at the
        same moment makes SQLite answer busy at once, without waiting: retry."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if _translate(exc) is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _migrate(self, conn):
        # BEGIN IMMEDIATE so that two processes starting at once migrate once.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()["user_version"]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _writer(self):
        """Hold the write locks: this process's, then the one shared by all."""
        with self._write_lock:
            if not self.shared:
                # PERF: flock gives up the GIL twice; with one writing process
                # the thread lock is all it takes.
                yield
                return
            if self._flock is None or self._flock[0] != os.getpid():
                fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
                self._flock = (os.getpid(), fd)
            fd = self._flock[1]
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def write(self):
        """A write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on any error."""
        conn = self.connection()
        with self._writer():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise (_translate(exc) or exc) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _translate(exc):
                    raise _translate(exc) from exc
                raise

    def write_one(self, sql, params=()):
        """One statement as its own transaction; its RETURNING rows.

        PERF: a single statement needs no BEGIN and COMMIT round trips:
        SQLite commits it when it has run to completion, which fetchall()
        ensures before we answer.
        """
        with self._writer():
            return self.query(sql, params)

    def checkpoint(self):
        """Copy the WAL back into the database without blocking anyone."""
        self.query("PRAGMA wal_checkpoint(PASSIVE)")

    def query(self, sql, params=()):
        """Rows of a statement as dicts (outside a transaction: autocommit)."""
        try:
            return self.connection().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise (_translate(exc) or exc) from exc

    def ping(self):
        return self.query("SELECT 1 AS ok")[0]["ok"] == 1

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _now():
    return round(time.time(), 3)


def _user_out(row):
    if row is None:
        return None
    user = dict(row)
    user["meta"] = json.loads(user["meta"])
    return user


class UserStore:
    """User profiles, keyed by id and unique by (normalised) email."""

    def __init__(self, db):
        self.db = db

    def upsert(self, email, fields):
        """Create the user or update the fields given; returns (created, user).

        One statement, so two concurrent upserts of a new email make one user.
        Fields not given are left as they are; ``meta`` is merged (RFC 7396).
        """
        new_id = uuid.uuid4().hex
        now = _now()
        params = {f: fields.get(f) for f in ("name", "locale", "currency")}
        params.update(id=new_id, email=email, now=now,
                      meta=json.dumps(fields.get("meta", {}), separators=(",", ":")))
        updates = [f"{f} = :{f}" for f in ("name", "locale", "currency") if f in fields]
        if "meta" in fields:
            updates.append("meta = json_patch(users.meta, :meta)")
        updates.append("updated_at = :now")
        sql = (
            "INSERT INTO users (id, email, name, locale, currency, meta, created_at, updated_at)"
            " VALUES (:id, :email, :name, :locale, :currency, json_patch('{}', :meta), :now, :now)"
            f" ON CONFLICT(email) DO UPDATE SET {', '.join(updates)}"
            f" RETURNING {', '.join(USER_COLUMNS)}"
        )
        row = self.db.write_one(sql, params)[0]
        return row["id"] == new_id, _user_out(row)

    def patch(self, user_id, fields):
        """Update the given fields of an existing user; None if there is none."""
        sets = [f"{f} = ?" for f in ("name", "locale", "currency") if f in fields]
        params = [fields[f] for f in ("name", "locale", "currency") if f in fields]
        if "meta" in fields:
            sets.append("meta = json_patch(meta, ?)")
            params.append(json.dumps(fields["meta"], separators=(",", ":")))
        sets.append("updated_at = ?")
        params += [_now(), user_id]
        sql = f"UPDATE users SET {', '.join(sets)} WHERE id = ? RETURNING {', '.join(USER_COLUMNS)}"
        rows = self.db.write_one(sql, params)
        return _user_out(rows[0]) if rows else None

    def get(self, user_id):
        rows = self.db.query(f"SELECT {', '.join(USER_COLUMNS)} FROM users WHERE id = ?", (user_id,))
        return _user_out(rows[0]) if rows else None

    def get_by_email(self, email):
        rows = self.db.query(f"SELECT {', '.join(USER_COLUMNS)} FROM users WHERE email = ?", (email,))
        return _user_out(rows[0]) if rows else None


# ---------------------------------------------------------------------------
# Audit log and service statistics
# ---------------------------------------------------------------------------


class Recorder:
    """Audit rows and per-minute counters, written off the request path.

    Requests only append to memory; a background thread writes what has
    gathered in one transaction every ``interval`` seconds, with a heartbeat
    row for the current minute (at least one each minute), which is what
    uptime is measured from. ``auth_writes`` is counted when a request is recorded,
    apart from the audit row, so a row that is lost (queue full, failed
    write) shows as audit coverage below 100%.
    """

    MAX_PENDING = 50_000

    def __init__(self, db, log, interval=1.0, clock=time.time):
        self.db = db
        self.log = log
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._rows = []
        self._counts = collections.Counter()  # (minute, column) -> n, not yet written
        self._outcomes = collections.Counter()  # (day, workflow, key_id, status) -> n
        self._beat_minute = None  # the last minute with a heartbeat written
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    # -- request side: memory only, one short lock ---------------------------

    def audit(self, key_fp, method, path, status, request_id):
        now = self.clock()
        minute = int(now // 60)
        with self._lock:
            self._counts[minute, "auth_writes"] += 1
            if len(self._rows) < self.MAX_PENDING:
                self._rows.append((round(now, 3), key_fp, method, path, status, request_id))

    def outcome(self, job):
        """Count a finished job for the usage report (by day, workflow, key, status)."""
        day = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        with self._lock:
            self._outcomes[day, job["workflow"], job["key_fp"], job["status"]] += 1

    def count(self, column):
        assert column in COUNTERS
        minute = int(self.clock() // 60)
        with self._lock:
            self._counts[minute, column] += 1

    # -- the writer ----------------------------------------------------------

    def start(self):
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="levqor-recorder", daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.flush()
                self.db.checkpoint()
            except Exception as exc:  # keep the heartbeat alive through a bad moment
                self.log.error("recorder flush failed", error=f"{type(exc).__name__}: {exc}")
            self._wake.wait(self.interval)
            self._wake.clear()

    def flush(self):
        """Write pending rows and counters, and a heartbeat for this minute."""
        with self._lock:
            rows, self._rows = self._rows, []
            counts, self._counts = self._counts, collections.Counter()
            outcomes, self._outcomes = self._outcomes, collections.Counter()
        this_minute = int(self.clock() // 60)
        if not rows and not counts and not outcomes and this_minute == self._beat_minute:
            return  # nothing new, and this minute's heartbeat is written
        minutes = {this_minute: dict.fromkeys(COUNTERS, 0)}
        for (minute, column), n in counts.items():
            minutes.setdefault(minute, dict.fromkeys(COUNTERS, 0))[column] += n
        try:
            with self.db.write() as conn:
                conn.executemany(
                    "INSERT INTO audit_log (ts, key_fp, method, path, status, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?)", rows)
                conn.executemany(
                    f"INSERT INTO minutes (minute, {', '.join(COUNTERS)})"
                    f" VALUES (:minute, {', '.join(':' + c for c in COUNTERS)})"
                    " ON CONFLICT(minute) DO UPDATE SET "
                    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS),
                    [{"minute": m, **c} for m, c in minutes.items()])
                conn.executemany(
                    "INSERT INTO job_outcomes VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET n = n + excluded.n",
                    [(*k, n) for k, n in outcomes.items()])
            self._beat_minute = this_minute
        except Exception:
            with self._lock:  # put it back for the next try, newest last
                self._rows[:0] = rows[: self.MAX_PENDING - len(self._rows)]
                self._counts.update(counts)
                self._outcomes.update(outcomes)
            raise

    # -- what /public/metrics shows -------------------------------------------

    def _pending(self, column, since_minute):
        with self._lock:
            return sum(n for (m, c), n in self._counts.items() if c == column and m >= since_minute)

    def metrics(self):
        now = self.clock()
        this_minute = int(now // 60)
        week_ago = this_minute - 7 * 24 * 60 + 1
        first = self.db.query("SELECT MIN(minute) AS m FROM minutes")[0]["m"]
        start = max(week_ago, first if first is not None else this_minute)
        up = self.db.query(
            "SELECT COUNT(*) AS n FROM minutes WHERE minute >= ? AND minute < ?",
            (start, this_minute))[0]["n"] + 1  # this minute: we are answering
        uptime = 100.0 * up / (this_minute - start + 1)

        midnight_minute = int((now - now % 86400) // 60)
        today = self.db.query(
            "SELECT COALESCE(SUM(jobs), 0) AS jobs, COALESCE(SUM(finished), 0) AS finished"
            " FROM minutes WHERE minute >= ?", (midnight_minute,))[0]

        day_ago = now - 86400
        writes = self.db.query(
            "SELECT COALESCE(SUM(auth_writes), 0) AS n FROM minutes WHERE minute >= ?",
            (int(day_ago // 60),))[0]["n"] + self._pending("auth_writes", int(day_ago // 60))
        with self._lock:
            queued = len(self._rows)
        audited = self.db.query(
            "SELECT COUNT(*) AS n FROM audit_log WHERE ts >= ?", (day_ago,))[0]["n"] + queued
        coverage = 100.0 if writes == 0 else min(100.0, 100.0 * audited / writes)
        return {
            "uptime_rolling_7d": round(min(uptime, 100.0), 2),
            "jobs_today": today["jobs"] + self._pending("jobs", midnight_minute),
            "finished_today": today["finished"] + self._pending("finished", midnight_minute),
            "audit_coverage": round(coverage, 2),
            "last_updated": int(now),
        }

    def pending(self):
        with self._lock:
            return len(self._rows)


# ---------------------------------------------------------------------------
# Money: the ledger, and managed API keys
# ---------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """A reservation or charge that does not fit: ``state`` says which budget."""

    def __init__(self, state):
        super().__init__(f"the {state['scope']} budget is exhausted")
        self.state = state


def utc_day(ts):
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Ledger:
    """Reservations, charges and releases in integer micro-dollars.

    Every check of a budget and the rows it allows are one BEGIN IMMEDIATE
    transaction, so no number of concurrent requests can take a budget past
    its limit. A job's cap is reserved against its day at intake; each charge
    turns part of the reservation into spend (a charge row and an equal
    release row); ``settle`` releases what is left when the job ends. So a
    day's use is always the sum of its rows, and spend the sum of charges.
    ``ledger_days`` and ``ledger_jobs`` keep those sums as running totals,
    written in the same transactions, so every check reads a row, not a day.
    """

    SERVICE = "*"

    def __init__(self, db, clock=time.time):
        self.db = db
        self.clock = clock

    @staticmethod
    def _row(conn, now, job, amount, kind, note):
        conn.execute("INSERT INTO ledger (ts, day, job_id, key_id, workflow, amount, kind, note)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (now, job["day"], job["job_id"], job["key_id"], job["workflow"], amount, kind,
                      note and str(note)[:200]))

    def _add_use(self, conn, day, key_id, amount):
        conn.executemany("INSERT INTO ledger_days VALUES (?, ?, ?)"
                         " ON CONFLICT DO UPDATE SET used = used + excluded.used",
                         [(day, self.SERVICE, amount), (day, key_id, amount)])

    @staticmethod
    def _used(conn, day, key_id):
        row = conn.execute("SELECT used FROM ledger_days WHERE day = ? AND key_id = ?",
                           (day, key_id)).fetchone()
        return row["used"] if row else 0

    def reserve(self, job, amount, limits):
        """Reserve ``amount`` for a job against today's ``limits``: a list of
        (scope, key_id or None for the whole service, limit). BudgetExceeded
        names the first that would be passed; nothing is written then."""
        now = self.clock()
        day = utc_day(now)
        with self.db.write() as conn:
            for scope, key_id, limit in limits:
                used = self._used(conn, day, key_id or self.SERVICE)
                if used + amount > limit:
                    raise BudgetExceeded({"scope": scope, "limit": limit, "used": used,
                                          "requested": amount, "day": day})
            entry = {"job_id": job["job_id"], "day": day, "key_id": job["key_fp"],
                     "workflow": job["workflow"]}
            # A job retried on another day reserves again, on that day.
            conn.execute("INSERT INTO ledger_jobs VALUES (:job_id, :day, :key_id, :workflow, :amount, 0)"
                         " ON CONFLICT DO UPDATE SET day = excluded.day, reserved = excluded.reserved",
                         dict(entry, amount=amount))
            self._row(conn, now, entry, amount, "reserve", "job cap")
            self._add_use(conn, day, job["key_fp"], amount)
        return day

    def charge(self, job_id, amount, note=None):
        """Spend ``amount`` from the job's reservation; BudgetExceeded (and
        nothing recorded) if it is more than what the reservation has left."""
        now = self.clock()
        with self.db.write() as conn:
            job = conn.execute("UPDATE ledger_jobs SET reserved = reserved - :a, spent = spent + :a"
                               " WHERE job_id = :j AND reserved >= :a RETURNING *",
                               {"a": amount, "j": job_id}).fetchone()
            if job is None:
                state = conn.execute("SELECT reserved, spent FROM ledger_jobs WHERE job_id = ?",
                                     (job_id,)).fetchone() or {"reserved": 0, "spent": 0}
                raise BudgetExceeded({"scope": "job", "limit": state["reserved"] + state["spent"],
                                      "used": state["spent"], "requested": amount})
            self._row(conn, now, job, amount, "charge", note)
            self._row(conn, now, job, -amount, "release", note)
        return job["spent"]

    def settle(self, job_id, note):
        """Release what is left of a job's reservation; returns what it spent."""
        now = self.clock()
        with self.db.write() as conn:
            job = conn.execute("SELECT * FROM ledger_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None:
                return 0
            if job["reserved"] > 0:
                conn.execute("UPDATE ledger_jobs SET reserved = 0 WHERE job_id = ?", (job_id,))
                self._row(conn, now, job, -job["reserved"], "release", note)
                self._add_use(conn, job["day"], job["key_id"], -job["reserved"])
        return job["spent"]

    def spent(self, job_id):
        rows = self.db.query("SELECT spent FROM ledger_jobs WHERE job_id = ?", (job_id,))
        return rows[0]["spent"] if rows else 0

    def used_today(self, key_id=None):
        rows = self.db.query("SELECT used FROM ledger_days WHERE day = ? AND key_id = ?",
                             (utc_day(self.clock()), key_id or self.SERVICE))
        return rows[0]["used"] if rows else 0

    def usage(self, first_day, last_day, group_by, key_id=None):
        """Spend and outstanding reservations per group, with job outcomes.
        Summed from the ledger rows themselves: this is the audit view."""
        column = {"day": "day", "workflow": "workflow", "key": "key_id"}[group_by]
        where, params = "day BETWEEN ? AND ?", [first_day, last_day]
        if key_id is not None:
            where += " AND key_id = ?"
            params.append(key_id)
        groups = {}
        for row in self.db.query(
                f"SELECT {column} AS g, COALESCE(SUM(CASE WHEN kind = 'charge' THEN amount END), 0)"
                f" AS spend, COALESCE(SUM(CASE WHEN kind != 'charge' THEN amount END), 0) AS reserved"
                f" FROM ledger WHERE {where} GROUP BY g", params):
            groups[row["g"]] = {"spend": row["spend"], "reserved": row["reserved"], "jobs": {}}
        for row in self.db.query(f"SELECT {column} AS g, status, SUM(n) AS n FROM job_outcomes"
                                 f" WHERE {where} GROUP BY g, status", params):
            entry = groups.setdefault(row["g"], {"spend": 0, "reserved": 0, "jobs": {}})
            entry["jobs"][row["status"]] = row["n"]
        return groups


class KeyStore:
    """Managed API keys (``lq_...``), held as SHA-256 digests only."""

    COLUMNS = ("id", "name", "role", "prefix", "daily_budget", "rate_per_minute", "created_at",
               "last_used_at", "revoked_at")

    def __init__(self, db, clock=time.time):
        self.db = db
        self.clock = clock
        self._touched = {}  # key id -> when last_used_at was last written

    def create(self, name, role, daily_budget=None, rate_per_minute=None):
        """A new key; returns (record, secret). The secret is never stored."""
        secret = "lq_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        record = {"id": "key_" + os.urandom(8).hex(), "name": name, "role": role,
                  "prefix": secret[:11], "daily_budget": daily_budget,
                  "rate_per_minute": rate_per_minute, "created_at": round(self.clock(), 3),
                  "last_used_at": None, "revoked_at": None}
        self.db.write_one(
            f"INSERT INTO api_keys ({', '.join(self.COLUMNS)}, digest)"
            f" VALUES ({', '.join(':' + c for c in self.COLUMNS)}, :digest)",
            dict(record, digest=hashlib.sha256(secret.encode()).digest()))
        return record, secret

    def lookup(self, secret):
        """The live key with this secret, or None. The digest is the index:
        what the lookup's time depends on is a hash the caller cannot steer."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        rows = self.db.query(f"SELECT {', '.join(self.COLUMNS)} FROM api_keys"
                             " WHERE digest = ? AND revoked_at IS NULL", (digest,))
        if not rows:
            return None
        key = rows[0]
        now = self.clock()
        # PERF: last_used_at is written at most once a minute per key.
        if now - self._touched.get(key["id"], 0) > 60:
            self._touched[key["id"]] = now
            self.db.write_one("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (round(now, 3), key["id"]))
        return key

    def list(self):
        return self.db.query(f"SELECT {', '.join(self.COLUMNS)} FROM api_keys ORDER BY created_at")

    def revoke(self, key_id):
        rows = self.db.write_one(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
            f" RETURNING {', '.join(self.COLUMNS)}", (round(self.clock(), 3), key_id))
        return rows[0] if rows else None


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


class QueueFull(Exception):
    """The job store holds as many jobs as it may."""


class IdempotencyMismatch(Exception):
    """An Idempotency-Key already used, within its lifetime, for another body."""


JOB_FINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
PRIORITIES = ("high", "normal", "low")
# How far ahead of a low job each priority starts, in units of the aging step:
# a waiting job overtakes a fresher one of the next priority up after one step.
PRIORITY_HEAD_START = {"high": 2, "normal": 1, "low": 0}


class MemoryJobStore:
    """Jobs in a dict behind one lock, in this process only.

    Jobs live in the memory of the process that accepted them: a restart
    loses them, and a second gunicorn worker cannot see them (which is why
    gunicorn.conf.py runs one worker by default). Every access holds the lock
    briefly and hands out copies, so callers can never change a stored job
    by accident. Finished jobs are kept ``ttl`` seconds, then dropped; at
    most ``max_jobs`` are held at once.

    It is also the queue. A queued job waits in a heap per workflow, ordered
    by when it became ready less its priority's head start (``aging`` seconds
    per level), so high goes before normal before low, first in first out
    within a priority, and a job that has waited ``aging`` seconds longer
    than another overtakes it whatever their priorities: low never starves.
    A job waiting out a retry backoff sits in a second heap by ``not_before``.

    Its methods (add, get, update, claim, expired, counts, page) are the
    interface a durable store must offer to replace it. Every change is a
    compare-and-set: ``update`` applies only when the job still has the
    ``expect``ed values, which is how a late worker loses a race cleanly.
    """

    def __init__(self, max_jobs=100_000, ttl=86_400, aging=60.0, clock=time.time):
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.aging = aging
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs = {}                       # job_id -> job, in creation order
        self._ready = {}                      # workflow -> heap of (score, seq, job_id, version)
        self._delayed = []                    # heap of (not_before, seq, job_id, version)
        self._running = set()
        self._finished = collections.deque()  # (finished_at, job_id), oldest first
        self._idempotency = {}                # (key_fp, key) -> (body_hash, job_id, expires)
        self._idempotency_order = collections.deque()  # (expires, (key_fp, key))
        self._counts = collections.Counter()  # (status, priority) -> n
        self._seq = 0

    # -- bookkeeping, always under the lock -----------------------------------

    def _purge(self, now):
        cutoff = now - self.ttl
        finished = self._finished
        while finished and finished[0][0] <= cutoff:
            _, job_id = finished.popleft()
            job = self._jobs.get(job_id)
            # A job retried after it finished has a newer finish time: keep it.
            if job is not None and job["status"] in JOB_FINAL and job["finished_at"] <= cutoff:
                del self._jobs[job_id]
                self._counts[job["status"], job["priority"]] -= 1
        order = self._idempotency_order
        while order and order[0][0] <= now:
            _, scope = order.popleft()
            entry = self._idempotency.get(scope)
            if entry is not None and entry[2] <= now:
                del self._idempotency[scope]

    def _enqueue(self, job, now):
        job["queue_version"] = job.get("queue_version", 0) + 1
        entry_tail = (job["seq"], job["job_id"], job["queue_version"])
        if job["not_before"] > now:
            heapq.heappush(self._delayed, (job["not_before"], *entry_tail))
        else:
            ready_at = max(job["not_before"], job["queued_at"])
            score = ready_at - PRIORITY_HEAD_START[job["priority"]] * self.aging
            heapq.heappush(self._ready.setdefault(job["workflow"], []), (score, *entry_tail))

    def _live(self, entry):
        job = self._jobs.get(entry[2])
        return job if job is not None and job["status"] == "queued" \
            and job["queue_version"] == entry[3] else None

    def _promote(self, now):
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            entry = heapq.heappop(delayed)
            job = self._live(entry)
            if job is not None:
                self._enqueue(job, now)

    def _set(self, job, changes, now):
        old_status = job["status"]
        job.update(changes)
        new_status = job["status"]
        if new_status != old_status:
            self._counts[old_status, job["priority"]] -= 1
            self._counts[new_status, job["priority"]] += 1
            self._running.discard(job["job_id"])
            if new_status == "running":
                self._running.add(job["job_id"])
            elif new_status in JOB_FINAL:
                self._finished.append((job["finished_at"], job["job_id"]))
        if new_status == "queued" and ("not_before" in changes or old_status != "queued"):
            self._enqueue(job, now)

    # -- the interface ----------------------------------------------------------

    def add(self, job, idempotency=None):
        """Store a new job; returns (job, created).

        ``idempotency`` is (key_fp, key, body_hash, ttl): if that key was used
        within ttl for the same body, the job it made is returned instead
        (created False); for another body, IdempotencyMismatch. Checked and
        recorded under the one lock, so concurrent duplicates make one job.
        """
        with self._lock:
            now = self.clock()
            self._purge(now)
            if idempotency is not None:
                key_fp, key, body_hash, ttl = idempotency
                entry = self._idempotency.get((key_fp, key))
                if entry is not None and entry[2] > now and entry[1] in self._jobs:
                    if entry[0] != body_hash:
                        raise IdempotencyMismatch(key)
                    return dict(self._jobs[entry[1]]), False
            if len(self._jobs) >= self.max_jobs:
                raise QueueFull("the job store is full")
            self._seq += 1
            job = dict(job, seq=self._seq, queued_at=job["created_at"])
            self._jobs[job["job_id"]] = job
            self._counts[job["status"], job["priority"]] += 1
            if job["status"] == "queued":
                self._enqueue(job, now)
            if idempotency is not None:
                self._idempotency[key_fp, key] = (body_hash, job["job_id"], now + ttl)
                self._idempotency_order.append((now + ttl, (key_fp, key)))
            return dict(job), True

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job is not None else None

    def update(self, job_id, expect=None, **changes):
        """Apply changes if the job has the ``expect``ed values; the new copy, or None."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or any(job.get(k) != v for k, v in (expect or {}).items()):
                return None
            self._set(job, changes, self.clock())
            return dict(job)

    def claim(self, workflows, changes_for):
        """Take the best ready job among ``workflows`` (None: any) and apply
        ``changes_for(job)`` to it (it must make the job running); the new
        copy, or None when nothing is waiting."""
        with self._lock:
            now = self.clock()
            self._promote(now)
            best = None
            for workflow in (self._ready if workflows is None else workflows):
                heap = self._ready.get(workflow)
                while heap and self._live(heap[0]) is None:
                    heapq.heappop(heap)  # canceled, or queued again since
                if heap and (best is None or heap[0] < best[0]):
                    best = (heap[0], heap)
            if best is None:
                return None
            job = self._jobs[heapq.heappop(best[1])[2]]
            self._set(job, changes_for(job), now)
            return dict(job)

    def expired(self, now):
        """Running jobs whose lease (or timeout) ran out by ``now``."""
        with self._lock:
            jobs = (self._jobs[i] for i in self._running)
            return [dict(j) for j in jobs if j["lease_expires_at"] is not None
                    and j["lease_expires_at"] <= now]

    def next_due(self):
        """When the next delayed job becomes ready, or None."""
        with self._lock:
            return self._delayed[0][0] if self._delayed else None

    def counts(self):
        """Jobs held by status, and queued jobs by priority."""
        with self._lock:
            counts = self._counts
            by_status = {s: sum(counts[s, p] for p in PRIORITIES) for s in JOB_STATUSES}
            queued = {p: counts["queued", p] for p in PRIORITIES}
        return {"by_status": by_status, "queued_by_priority": queued}

    def page(self, key_fp, status=None, workflow=None, limit=20, before_seq=None):
        """Up to ``limit`` jobs made with ``key_fp``, newest first, older than
        ``before_seq``; and whether more follow."""
        found = []
        with self._lock:
            for job in reversed(self._jobs.values()):
                if before_seq is not None and job["seq"] >= before_seq:
                    continue
                if job["key_fp"] != key_fp or (status is not None and job["status"] != status) \
                        or (workflow is not None and job["workflow"] != workflow):
                    continue
                if len(found) == limit:
                    return found, True
                found.append(dict(job))
        return found, False

    def purge(self, now):
        """Drop finished jobs past their time (add() does it too)."""
        with self._lock:
            self._purge(now)

    def pending_callbacks(self):
        return []  # nothing outlives the process that would have sent it

    def __len__(self):
        with self._lock:
            return len(self._jobs)


class SqliteJobStore:
    """Jobs in the SQLite database, shared by every process that opens it.

    The same interface and rules as MemoryJobStore, made durable: an
    acknowledged intake is committed before it is answered, and every
    change, claims included, is one short ``BEGIN IMMEDIATE`` transaction, so
    two processes can never both move a job from queued to running. Leases,
    retries and timeouts are timestamps in the table, so any process's sweep
    finds a job whose worker died. Finished jobs past ``ttl`` are purged in
    small batches (``purge``), so no purge holds the database for long.
    """

    PURGE_BATCH = 500

    def __init__(self, db, max_jobs=100_000, ttl=86_400, aging=60.0, clock=time.time):
        self.db = db
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.aging = aging
        self.clock = clock
        self._held = (0.0, 0)  # (when counted, jobs held): a count of a big table is not free

    def _columns(self, job):
        ready_at = max(job["not_before"], job["queued_at"])
        return {"job_id": job["job_id"], "status": job["status"], "workflow": job["workflow"],
                "priority": job["priority"], "key_fp": job["key_fp"],
                "score": ready_at - PRIORITY_HEAD_START[job["priority"]] * self.aging,
                "not_before": job["not_before"], "lease_expires_at": job.get("lease_expires_at"),
                "finished_at": job.get("finished_at"),
                "data": json.dumps(job, separators=(",", ":"))}

    def _load(self, conn, job_id):
        row = conn.execute("SELECT seq, data FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else dict(json.loads(row["data"]), seq=row["seq"])

    def _save(self, conn, job):
        cols = self._columns(job)
        conn.execute("UPDATE jobs SET status = :status, score = :score, not_before = :not_before,"
                     " lease_expires_at = :lease_expires_at, finished_at = :finished_at,"
                     " data = :data WHERE job_id = :job_id", cols)

    def _count(self, now):
        counted_at, held = self._held
        if now - counted_at > 1.0:
            held = self.db.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
            self._held = (now, held)
        return held

    def add(self, job, idempotency=None):
        now = self.clock()
        if self._count(now) >= self.max_jobs:
            self.purge(now)
            self._held = (0.0, 0)
            if self._count(now) >= self.max_jobs:
                raise QueueFull("the job store is full")
        job = dict(job, queued_at=job["created_at"])
        cols = self._columns(job)
        insert = (f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
                  " RETURNING seq")
        if idempotency is None:  # PERF: one statement, its own transaction
            job["seq"] = self.db.write_one(insert, cols)[0]["seq"]
            return job, True
        key_fp, key, body_hash, ttl = idempotency
        with self.db.write() as conn:
            row = conn.execute("SELECT body_hash, job_id FROM idempotency WHERE key_fp = ?"
                               " AND key = ? AND expires > ?", (key_fp, key, now)).fetchone()
            existing = row and self._load(conn, row["job_id"])
            if existing:
                if row["body_hash"] != body_hash:
                    raise IdempotencyMismatch(key)
                return existing, False
            job["seq"] = conn.execute(insert, cols).fetchone()["seq"]
            conn.execute("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                         (key_fp, key, body_hash, job["job_id"], now + ttl))
        return job, True

    def get(self, job_id):
        rows = self.db.query("SELECT seq, data FROM jobs WHERE job_id = ?", (job_id,))
        return dict(json.loads(rows[0]["data"]), seq=rows[0]["seq"]) if rows else None

    def update(self, job_id, expect=None, **changes):
        with self.db.write() as conn:
            job = self._load(conn, job_id)
            if job is None or any(job.get(k) != v for k, v in (expect or {}).items()):
                return None
            job.update(changes)
            self._save(conn, job)
        return job

    def claim(self, workflows, changes_for):
        now = self.clock()
        with self.db.write() as conn:
            sql = "SELECT job_id FROM jobs WHERE status = 'queued' AND not_before <= ?"
            params = [now]
            if workflows is not None:
                if not workflows:
                    return None
                sql += f" AND workflow IN ({', '.join('?' * len(workflows))})"
                params += list(workflows)
            row = conn.execute(sql + " ORDER BY score, seq LIMIT 1", params).fetchone()
            if row is None:
                return None
            job = self._load(conn, row["job_id"])
            job.update(changes_for(job))
            self._save(conn, job)
        return job

    def expired(self, now):
        rows = self.db.query("SELECT seq, data FROM jobs WHERE status = 'running'"
                             " AND lease_expires_at <= ?", (now,))
        return [dict(json.loads(r["data"]), seq=r["seq"]) for r in rows]

    def next_due(self):
        rows = self.db.query("SELECT MIN(not_before) AS t FROM jobs WHERE status = 'queued'"
                             " AND not_before > ?", (self.clock(),))
        return rows[0]["t"]

    def counts(self):
        rows = self.db.query("SELECT status, priority, COUNT(*) AS n FROM jobs GROUP BY status, priority")
        by_status = dict.fromkeys(JOB_STATUSES, 0)
        queued = dict.fromkeys(PRIORITIES, 0)
        for r in rows:
            by_status[r["status"]] += r["n"]
            if r["status"] == "queued":
                queued[r["priority"]] += r["n"]
        return {"by_status": by_status, "queued_by_priority": queued}

    def page(self, key_fp, status=None, workflow=None, limit=20, before_seq=None):
        sql, params = "SELECT seq, data FROM jobs WHERE key_fp = ?", [key_fp]
        for column, value in (("status", status), ("workflow", workflow)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if before_seq is not None:
            sql += " AND seq < ?"
            params.append(before_seq)
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", params + [limit + 1])
        jobs = [dict(json.loads(r["data"]), seq=r["seq"]) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def pending_callbacks(self):
        """(job_id, callback_id, next_attempt_at) of deliveries still to make,
        for a process that starts after another stopped mid-schedule."""
        rows = self.db.query(
            "SELECT json_extract(data, '$.job_id') AS job_id,"
            " json_extract(data, '$.callback_id') AS callback_id,"
            " json_extract(data, '$.callback.next_attempt_at') AS due FROM jobs"
            " WHERE finished_at IS NOT NULL AND json_extract(data, '$.callback.state') = 'pending'")
        return [(r["job_id"], r["callback_id"], r["due"]) for r in rows]

    def purge(self, now):
        """Delete one small batch of finished jobs past ``ttl``, and expired
        idempotency keys; returns how many jobs went."""
        cutoff = now - self.ttl
        with self.db.write() as conn:
            gone = conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished_at IS NOT NULL"
                " AND finished_at <= ? LIMIT ?)", (cutoff, self.PURGE_BATCH)).rowcount
            conn.execute("DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency"
                         " WHERE expires <= ? LIMIT ?)", (now, self.PURGE_BATCH))
        return gone

    def __len__(self):
        return self.db.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
