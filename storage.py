"""Levqor's stores: SQLite for users, the audit log and service statistics;
a locked dict for jobs.

This module owns every byte Levqor keeps. It knows nothing of HTTP: callers
get plain dicts back and storage failures as ``StorageError`` with a kind
(``busy`` or ``full``) that the web layer turns into 503 or 507.
"""

import collections
import contextlib
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
# Append only: a released migration is never edited.
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
]

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

    def __init__(self, path, busy_timeout_ms=5000):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._migrated_in = None  # pid that has run the migrations
        self._lock = threading.Lock()
        # One writer at a time in this process. SQLite allows one anyway; a
        # thread that finds the lock taken inside SQLite sleeps in steps of
        # milliseconds (its busy handler), while one waiting here is woken
        # the moment the writer is done. busy_timeout still covers writers
        # in other processes.
        self._write_lock = threading.Lock()

    def connection(self):
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = local.conn = self._open()
            local.pid = os.getpid()
        return conn

    def _open(self):
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=True)
            conn.row_factory = _dict_row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # PERF: the Recorder thread checkpoints the WAL every second, so a
            # request never pays for copying it back (a stall of tens of ms).
            # This is only the backstop should that thread not run.
            conn.execute("PRAGMA wal_autocheckpoint = 10000")
        except sqlite3.OperationalError as exc:
            raise (_translate(exc) or exc) from exc
        with self._lock:
            if self._migrated_in != os.getpid():
                self._migrate(conn)
                self._migrated_in = os.getpid()
        return conn

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
    def write(self):
        """A write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on any error."""
        conn = self.connection()
        with self._write_lock:
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
        with self._write_lock:
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

    def count_job(self):
        minute = int(self.clock() // 60)
        with self._lock:
            self._counts[minute, "jobs"] += 1

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
        this_minute = int(self.clock() // 60)
        if not rows and not counts and this_minute == self._beat_minute:
            return  # nothing new, and this minute's heartbeat is written
        minutes = {this_minute: [0, 0]}
        for (minute, column), n in counts.items():
            minutes.setdefault(minute, [0, 0])[column == "auth_writes"] += n
        try:
            with self.db.write() as conn:
                conn.executemany(
                    "INSERT INTO audit_log (ts, key_fp, method, path, status, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?)", rows)
                conn.executemany(
                    "INSERT INTO minutes (minute, jobs, auth_writes) VALUES (?, ?, ?)"
                    " ON CONFLICT(minute) DO UPDATE SET jobs = jobs + excluded.jobs,"
                    " auth_writes = auth_writes + excluded.auth_writes",
                    [(m, j, w) for m, (j, w) in minutes.items()])
            self._beat_minute = this_minute
        except Exception:
            with self._lock:  # put it back for the next try, newest last
                self._rows[:0] = rows[: self.MAX_PENDING - len(self._rows)]
                self._counts.update(counts)
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
        jobs_today = self.db.query(
            "SELECT COALESCE(SUM(jobs), 0) AS n FROM minutes WHERE minute >= ?",
            (midnight_minute,))[0]["n"] + self._pending("jobs", midnight_minute)

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
            "jobs_today": jobs_today,
            "audit_coverage": round(coverage, 2),
            "last_updated": int(now),
        }

    def pending(self):
        with self._lock:
            return len(self._rows)


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


class QueueFull(Exception):
    """The job store holds as many jobs as it may."""


JOB_FINAL = frozenset({"succeeded", "failed"})


class MemoryJobStore:
    """Jobs in a dict behind one lock, in this process only.

    Jobs live in the memory of the process that accepted them: a restart
    loses them, and a second gunicorn worker cannot see them (which is why
    gunicorn.conf.py runs one worker by default). Every access holds the lock
    briefly and hands out copies, so callers can never change a stored job
    by accident. Finished jobs are kept ``ttl`` seconds, then dropped; at
    most ``max_jobs`` are held at once.

    The interface (add, get, update, counts) is what a durable store must
    offer to replace this one.
    """

    def __init__(self, max_jobs=100_000, ttl=86_400, clock=time.time):
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs = {}
        self._finished = collections.deque()  # (finished_at, job_id), oldest first

    def _purge(self, now):
        cutoff = now - self.ttl
        finished = self._finished
        while finished and finished[0][0] <= cutoff:
            _, job_id = finished.popleft()
            job = self._jobs.get(job_id)
            # A job retried after it finished has a newer finish time: keep it.
            if job is not None and job["status"] in JOB_FINAL and job["updated_at"] <= cutoff:
                del self._jobs[job_id]

    def add(self, job):
        with self._lock:
            self._purge(self.clock())
            if len(self._jobs) >= self.max_jobs:
                raise QueueFull("the job store is full")
            self._jobs[job["job_id"]] = dict(job)

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job is not None else None

    def update(self, job_id, **changes):
        """Apply changes to a job; returns the new copy, or None if absent."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job.update(changes)
            if changes.get("status") in JOB_FINAL:
                self._finished.append((job["updated_at"], job_id))
            return dict(job)

    def counts(self):
        with self._lock:
            counts = collections.Counter(job["status"] for job in self._jobs.values())
        return {status: counts.get(status, 0) for status in ("queued", "running", "succeeded", "failed")}

    def __len__(self):
        with self._lock:
            return len(self._jobs)
