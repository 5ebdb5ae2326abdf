"""The SQLite file: connections, transactions and migrations, and the
stores that live only in it: user profiles and managed API keys.

This module knows nothing of HTTP: callers get plain dicts back and
storage failures as ``StorageError`` with a kind (``busy`` or ``full``)
that the web layer turns into 503 or 507. The other stores built on
``Database`` live beside it: ``recorder`` (audit log and statistics),
``ledger`` (money) and ``jobstore`` (jobs).
"""

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import select
import socket
import sqlite3
import stat
import threading
import time
import uuid

from background import Background

# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
# Append only: a released migration is never edited. Statements are split on
# semicolons (rejoined where a trigger's body holds some), so comments in them
# must not hold one.
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
    """
    -- One name for the caller's key everywhere: key_id.
    ALTER TABLE audit_log RENAME COLUMN key_fp TO key_id;
    ALTER TABLE jobs RENAME COLUMN key_fp TO key_id;
    ALTER TABLE idempotency RENAME COLUMN key_fp TO key_id;
    UPDATE jobs SET data = json_remove(json_set(data, '$.key_id', json_extract(data, '$.key_fp')),
                                       '$.key_fp')
        WHERE json_type(data, '$.key_fp') IS NOT NULL;
    """,
    """
    -- Profiles belong to the key that made them: unique per (owner, email).
    -- Profiles made before this had no recorded owner: the operator's
    -- ('admin') is the safe one to give them.
    CREATE TABLE users_owned (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        email      TEXT NOT NULL,
        name       TEXT,
        locale     TEXT,
        currency   TEXT,
        meta       TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (owner, email)
    );
    INSERT INTO users_owned SELECT id, 'admin', email, name, locale, currency, meta, created_at,
        updated_at FROM users;
    DROP TABLE users;
    ALTER TABLE users_owned RENAME TO users;
    """,
    """
    -- The jobs still holding a reservation, by day and key: a budget's
    -- refusal sums them to say whether to ask again soon or at midnight.
    CREATE INDEX ledger_jobs_reserved ON ledger_jobs(day, key_id) WHERE reserved > 0;
    """,
    """
    -- How many jobs the table holds, kept by triggers in the same
    -- transaction as each insert and delete, so that MAX_JOBS is checked
    -- exactly across processes without counting the table per intake.
    CREATE TABLE job_count (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        n  INTEGER NOT NULL
    );
    INSERT INTO job_count SELECT 1, COUNT(*) FROM jobs;
    CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs
        BEGIN UPDATE job_count SET n = n + 1 WHERE id = 1; END;
    CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs
        BEGIN UPDATE job_count SET n = n - 1 WHERE id = 1; END;
    """,
    """
    -- Job rows whose data is not valid JSON (a non-finite number stored by
    -- an older version, a torn write), moved here at start-up: no scan meets
    -- them again, and the operator still has every byte to look at.
    CREATE TABLE jobs_quarantine (
        seq            INTEGER PRIMARY KEY,
        job_id         TEXT NOT NULL,
        data           TEXT NOT NULL,
        reason         TEXT NOT NULL,
        quarantined_at REAL NOT NULL
    );
    """,
    """
    -- When a job's pending callback next needs a sender: its next attempt,
    -- or the end of the hold of the process sending it now. NULL when no
    -- delivery is pending. Every process scans it for deliveries nobody
    -- holds, so one whose sender died is sent by another.
    ALTER TABLE jobs ADD COLUMN callback_due REAL;
    UPDATE jobs SET callback_due = MAX(COALESCE(json_extract(data, '$.callback.next_attempt_at'), 0),
                                       COALESCE(json_extract(data, '$.callback_sending_until'), 0))
        WHERE finished_at IS NOT NULL AND CASE WHEN json_valid(data)
            THEN json_extract(data, '$.callback.state') = 'pending' END;
    CREATE INDEX jobs_callbacks ON jobs(callback_due) WHERE callback_due IS NOT NULL;
    """,
    """
    -- The workflow names (or prefixes ending in *) a worker key may claim,
    -- as a JSON list; NULL: any.
    ALTER TABLE api_keys ADD COLUMN workflows TEXT;
    """,
    """
    -- Flow control. Jobs gain the columns that limits and searches read;
    -- scheduled jobs wait for their time, waiting ones for their parents.
    ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
    ALTER TABLE jobs ADD COLUMN schedule TEXT;
    ALTER TABLE jobs ADD COLUMN created_at REAL;
    UPDATE jobs SET created_at = CASE WHEN json_valid(data) THEN json_extract(data, '$.created_at') END;
    CREATE INDEX jobs_running ON jobs(workflow, concurrency_key) WHERE status = 'running';
    CREATE INDEX jobs_scheduled ON jobs(not_before) WHERE status = 'scheduled';
    CREATE INDEX jobs_waiting ON jobs(seq) WHERE status = 'waiting';
    -- Each workflow's limits (JSON, with its rate's count and window beside
    -- it), and the times of its last rate_count starts, a ring: the slot
    -- next_slot holds the oldest, and a start may come only once that one
    -- has left the window. One row to read a claim, whatever the rate.
    CREATE TABLE workflow_limits (
        workflow   TEXT PRIMARY KEY,
        limits     TEXT NOT NULL,
        rate_count INTEGER,
        rate_per   REAL,
        next_slot  INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE workflow_starts (
        workflow TEXT NOT NULL,
        slot     INTEGER NOT NULL,
        started  REAL NOT NULL,
        PRIMARY KEY (workflow, slot)
    );
    -- Recurring schedules, each its owner's (key_id) by name. next_fire is
    -- when it next makes a job; moving it on is a compare-and-set, so one
    -- process makes each fire's job.
    CREATE TABLE schedules (
        key_id     TEXT NOT NULL,
        name       TEXT NOT NULL,
        spec       TEXT NOT NULL,
        paused     INTEGER NOT NULL DEFAULT 0,
        next_fire  REAL,
        last_fire  REAL,
        last_job   TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (key_id, name)
    );
    CREATE INDEX schedules_due ON schedules(next_fire) WHERE paused = 0;
    -- Requests and tokens per model and minute (LLM_LIMITS), kept a few minutes.
    CREATE TABLE llm_minutes (
        model    TEXT NOT NULL,
        minute   INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        tokens   INTEGER NOT NULL,
        PRIMARY KEY (model, minute)
    );
    """,
    """
    -- Operator dashboard sessions (dashboard.py): only a digest of each
    -- cookie's token is kept, so a copy of the database opens no session.
    CREATE TABLE admin_sessions (
        digest     TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX admin_sessions_expires ON admin_sessions(expires_at);
    -- Jobs that ended failed, per minute, beside those that finished: the
    -- dashboard's failure charts.
    ALTER TABLE minutes ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
    """,
    """
    -- Durable steps. A job waiting for its parents is never due: its
    -- not_before is FOREVER (engine.FOREVER); one waiting out a durable
    -- sleep, or an event's timeout, is due when it ends.
    UPDATE jobs SET not_before = 1e18, data = json_set(data, '$.not_before', 1e18)
        WHERE status = 'waiting' AND json_valid(data);
    CREATE INDEX jobs_waking ON jobs(not_before) WHERE status = 'waiting';
    -- The step a charge was made in (NULL: none).
    ALTER TABLE ledger ADD COLUMN step TEXT;
    """,
    """
    -- A batch's own idempotency key is one row for all its jobs: their ids,
    -- in order, as a JSON array (job_id holds the first). NULL: one job's key.
    ALTER TABLE idempotency ADD COLUMN job_ids TEXT;
    """,
]
# What the Recorder counts per minute: columns of the minutes table.
COUNTERS = ("jobs", "auth_writes", "finished", "failed")


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


class _Queued:
    """A statement waiting for ``Database.write_one``'s group commit."""

    __slots__ = ("sql", "params", "rows", "error", "done")

    def __init__(self, sql, params):
        self.sql, self.params = sql, params
        self.rows = self.error = None
        self.done = False


class Database:
    """One SQLite file, one connection per thread.

    Connections open lazily, on the thread that first needs one, so nothing is
    opened before gunicorn forks; a connection inherited across a fork is never
    reused (the pid is checked). Every connection sets its pragmas at open.
    """

    dialect = "sqlite"

    # Announcing: at most once per this many seconds per process; one held
    # back meanwhile is sent by this process's watch at its next look.
    ANNOUNCE_EVERY = 0.005
    MAX_PEERS = 64  # wake sockets an announce sends to
    PEERS_EVERY = 1.0  # seconds between an announcer's reads of the list of them

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
        self._queued = []   # write_one's statements waiting for the write lock
        self._queue_lock = threading.Lock()
        self._changes = None  # this process's Changes, once something watches
        self._told = (None, 0.0, [], None)  # (pid, when, the peers' wake sockets, a socket to send from)
        self._announced = 0.0
        self._news = set()  # what this process announced and has not sent yet (see announce)
        self._news_lock = threading.Lock()
        self.owes_announce = False  # an announce was held back: Changes sends it
        self.writes = 0  # write transactions this process began (Changes: whose change?)

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
                statement = ""
                for part in script.split(";"):
                    # A trigger's body holds semicolons: run only whole statements.
                    statement += part + ";"
                    if sqlite3.complete_statement(statement):
                        if statement.strip(" \n;"):
                            conn.execute(statement)
                        statement = ""
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _writer(self):
        """Hold the write locks: this process's, then the one shared by all."""
        with self._write_lock, self._file_lock():
            yield

    @contextlib.contextmanager
    def _file_lock(self):
        """The write lock shared by every process (with the thread lock held)."""
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
    def write(self, lock=None, pipeline=False):
        """A write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on any error.

        ``lock`` names what the transaction must have to itself, and
        ``pipeline`` asks for fewer round trips (see pg.PgDatabase.write);
        here every write transaction has the whole database to itself, and
        there are no round trips, so neither needs anything more."""
        conn = self.connection()
        with self._writer():
            self.writes += 1
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
        """One statement, committed when this returns; its RETURNING rows.

        PERF: group commit. The statements of threads waiting for the write
        lock meanwhile are run by whichever gets it first, in one
        transaction (each sees the ones before it, as if run one after
        another); the others find theirs done. A lone statement needs no
        BEGIN and COMMIT: SQLite commits it when it has run to completion,
        which fetchall() ensures. If a group fails, each of its statements
        is run again alone, so an error is only its own caller's.
        """
        mine = _Queued(sql, params)
        with self._queue_lock:
            self._queued.append(mine)
        with self._write_lock:
            if not mine.done:
                with self._file_lock():
                    with self._queue_lock:  # with those that came while the file lock was awaited
                        group, self._queued = self._queued, []
                    self._run_group(group)
        if mine.error is not None:
            raise mine.error
        return mine.rows

    def _run_group(self, group):
        self.writes += 1
        alone = group
        if len(group) > 1:
            conn = self.connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in group:
                    statement.rows = conn.execute(statement.sql, statement.params).fetchall()
                conn.execute("COMMIT")
                alone = []
            except Exception:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        for statement in alone:  # a lone statement, or each of a failed group's
            try:
                statement.rows = self.query(statement.sql, statement.params)
            except Exception as exc:
                statement.error = exc
        for statement in group:
            statement.done = True

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

    def announce(self, workflow=None, ended=False):
        """Wake the other processes watching this file (Changes) now: this
        one queued a job of ``workflow``, or (``ended``) ended one; None:
        something changed. The datagram names the workflows, so a process
        wakes only what waits for them (a pool that does not run a
        workflow stays asleep for its jobs). Costs a datagram per watcher;
        the list of them is read at most every PEERS_EVERY (a second)."""
        if not self.shared:
            return
        with self._news_lock:
            self._news.add(None if workflow is None else ("e" if ended else "q", workflow))
        self.send_news()

    def send_news(self):
        """Send what was announced, unless this process sent some within
        ANNOUNCE_EVERY: then it is owed, and its watch calls this again."""
        now = time.monotonic()
        with self._news_lock:
            held = now - self._announced < self.ANNOUNCE_EVERY
            newly_owed = held and bool(self._news) and not self.owes_announce
            if held:
                self.owes_announce = bool(self._news)  # a busy file: this process's watch sends it soon
            else:
                news, self._news = self._news, set()
                self._announced, self.owes_announce = now, False
        changes = self._changes
        if newly_owed and changes is not None and changes.pid == os.getpid():
            # A watch with a socket waits up to DOUBT_EVERY (IDLE_EVERY when
            # quiet): have it look now, and so send this within
            # ANNOUNCE_EVERY (its datagram of no news).
            with contextlib.suppress(OSError):
                self._sender(now)[1].sendto(NEWS_HEAD.encode(), changes.path)
        if held or not news:
            return
        message, full = news_message(news), False
        peers, sender = self._sender(now)
        for path in peers:
            try:
                sender.sendto(message, path)
            except ConnectionRefusedError:  # nobody bound: left by a process that died
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except BlockingIOError:  # its queue is full (a few datagrams): not told
                full = True
            except OSError:  # gone
                pass
        if full:  # the news goes again, with the next (the others hear it twice)
            with self._news_lock:
                self._news |= news
                self.owes_announce = True

    def _sender(self, now):
        """(the peers' wake sockets, read at most every PEERS_EVERY; this
        process's socket to send from)."""
        pid, read_at, peers, sender = self._told
        if pid != os.getpid():  # a socket of this process's own
            sender, read_at = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), float("-inf")
            sender.setblocking(False)
        if now - read_at > self.PEERS_EVERY:
            peers = self._peers()
            self._told = (os.getpid(), now, peers, sender)
        return peers, sender

    def _peers(self):
        """The wake sockets beside the file but this process's own (never
        a symlink: a datagram goes nowhere else)."""
        mine = self._changes and self._changes.name
        try:
            with os.scandir(self.path + "-wake") as entries:
                return [e.path for e in entries if e.name != mine
                        and stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)][:self.MAX_PEERS]
        except OSError:
            return []

    def watch(self, wake):
        """Call ``wake(workflow, ended)`` soon after another process queues
        a job of ``workflow`` or (``ended``) ends one, and ``wake(None)``
        soon after another connection commits something else (see Changes)."""
        if self._changes is None or self._changes.pid != os.getpid():
            self._changes = Changes(self, wake)
        self._changes.start()

    def close(self):
        if self._changes is not None and self._changes.pid == os.getpid():
            self._changes.stop()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class Changes(Background):
    """SQLite has no notifications between processes. So the thread of
    each process that watches a file binds a datagram socket beside it
    (``<file>-wake/<pid>-<random>``, the folder only its owner may open),
    and a process that queued or ended a job sends each such socket the
    news (``Database.announce``): the workflows whose jobs were queued or
    ended. The others wake at once, not at their next poll (which cost a
    waiting claim or status read 2.5 ms on average whenever the job was
    on another process), and only what waits for those workflows:
    ``wake(workflow, ended)``. As the backstop (a write by anything else,
    a process past the MAX_PEERS that are told, a path too long for a
    socket), the thread also reads ``PRAGMA data_version``: a number in
    shared memory that changes when any other connection commits, read
    without touching the disk. A move wakes everything, ``wake(None)``:
    whatever waits for a job, or for a job's end, looks again.

    PERF: the reads are every DOUBT_EVERY while changes come (EVERY with
    no socket: the reads are all there is), and every IDLE_EVERY once none
    came for QUIET seconds: an idle process of a SQLite host spent 3 to 4 %
    of a core on them, and a busy one, reading every EVERY with a socket
    too, 0.7 ms of CPU per job in the idle-latency bench (a read is a
    query, and takes the GIL from the requests). News held back (within
    ANNOUNCE_EVERY of the last sent) goes with the next announce, or is
    sent by the sender's own watch once ANNOUNCE_EVERY has passed (the
    watch is told to look at once, by a datagram of no news, and looks
    every EVERY while news is owed). A new watch, which its peers learn of
    within a second, reads every EVERY for that second.

    PERF: data_version moves for every commit but this connection's own,
    and most commits are nothing anyone waits for (audit rows, claims,
    this process's own other threads' writes), while Levqor's processes
    say what matters by datagram. So with a socket, news explains the
    moves seen up to it, and a move no news came with wakes everything
    only once DOUBT_EVERY has passed since the last time (a write by
    another program seen in the same look as news is left to the waiters'
    own polls); with no socket, a move over which this process wrote
    nothing (``Database.writes``) wakes everything at once. Before, every
    move woke everything: on a SQLite host of 2 workers whose one process
    took intakes, the other's pool threads looked for jobs about 200
    times a second, and found none."""

    NAME = "levqor-sqlite-changes"
    EVERY = 0.005  # seconds between reads while changes come (or with no socket)
    IDLE_EVERY = 0.1  # between reads once none came for QUIET seconds
    DOUBT_EVERY = 0.02  # between wakes of everything for moves of data_version
    QUIET = 1.0

    def __init__(self, db, wake):
        self.db = db
        self.wake = wake
        self.pid = os.getpid()
        self.name = f"{self.pid}-{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(db.path + "-wake", self.name)
        super().__init__()

    def stop(self):
        self._stop.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"!", self.path)  # out of its wait at once
        super().stop()

    def _run(self):
        sock, seen, mine = self._listen(), None, self.db.writes
        changed = woken = time.monotonic()
        learned = changed + self.db.PEERS_EVERY  # quick reads while the peers learn of this watch
        doubt = False  # data_version moved since everything was last woken
        try:
            while not self._stop.is_set():
                # Whether news is owed, then quiet: news held back meanwhile
                # finds this watch in a longer wait, and nudges it (Database.send_news).
                owed, now = self.db.owes_announce, time.monotonic()
                quiet = sock is not None and now - changed > self.QUIET and not owed
                heard = self._wait(sock, self.EVERY if sock is None or owed or now < learned
                                   else self.IDLE_EVERY if quiet else self.DOUBT_EVERY)
                if heard is not None and not heard:
                    # Its own process's nudge alone (a datagram of no news): the
                    # news goes when it may; the read waits for the next look
                    # (every EVERY while news is owed), not one read more.
                    if self.db.owes_announce:
                        self.db.send_news()
                    continue
                if heard and heard is not ANYTHING:
                    # PERF: what waits for these jobs looks before this thread
                    # reads data_version (a cold read after an idle spell).
                    for kind, workflow in sorted(heard):
                        self.wake(workflow, kind == "e")
                if self.db.owes_announce:
                    self.db.send_news()
                # Read before the version: an own commit between the two reads
                # is taken for another's (one wake more, never one fewer).
                writes = self.db.writes
                try:
                    version = self.db.query("PRAGMA data_version")[0]["data_version"]
                except StorageError:  # busy or away: the waiters' own polls cover it
                    version = seen
                now = time.monotonic()
                moved = seen is not None and version != seen
                # News explains the moves seen up to it (its sender committed,
                # then told): only a move no news came with is in doubt.
                doubt = (doubt or moved) and not heard
                # Without a socket, no announce comes: another's move is all there is.
                foreign = moved and writes == mine and sock is None
                if heard is ANYTHING or foreign or (doubt and now - woken >= self.DOUBT_EVERY):
                    self.wake(None)
                    woken, doubt = now, False
                if heard is not None or moved:
                    changed = now
                seen, mine = version, writes
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                sock.close()

    def _listen(self):
        """This thread's wake socket, bound; None where it cannot be (the
        data_version reads alone then)."""
        if len(self.path.encode()) >= 100:  # AF_UNIX paths are short (108 bytes on Linux)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            sock.setblocking(False)
            sock.bind(self.path)
            return sock
        except OSError:  # a folder it may not write, say
            sock.close()
            return None

    def _wait(self, sock, timeout):
        """Wait up to ``timeout`` seconds; what the announces that came
        meanwhile said (every datagram waiting read: one look covers them
        all): None if none came, else a set of (kind, workflow), or
        ANYTHING."""
        if sock is None:
            self._stop.wait(timeout)
            return None
        if not select.select([sock], [], [], timeout)[0]:
            return None
        heard = set()
        with contextlib.suppress(OSError):  # BlockingIOError: none left
            while True:
                message = sock.recv(NEWS_BYTES + 1)
                news = news_heard(message) if len(message) <= NEWS_BYTES else None  # cut short
                heard = ANYTHING if news is None or heard is ANYTHING else heard | news
        return heard


# An announce's datagram: NEWS_HEAD, then a line for each job queued
# ("q <workflow>") or ended ("e <workflow>") since the last. Anything else
# (b"!" for more than NEWS_MAX of them, or from a process that does not
# say) means that anything may have changed.
NEWS_HEAD = "levqor-news 1"
NEWS_MAX = 16
NEWS_BYTES = 4096  # more than NEWS_MAX lines of workflow names of up to 128 characters
ANYTHING = frozenset([None])


def news_message(news):
    """The datagram that tells ``news``: {("q" or "e", workflow)}, None in it for anything."""
    if None in news or len(news) > NEWS_MAX:
        return b"!"
    return "\n".join([NEWS_HEAD] + [f"{kind} {workflow}" for kind, workflow in sorted(news)]).encode()


def news_heard(message):
    """What a datagram tells: a set of ("q" or "e", workflow), or None (anything)."""
    lines = message.decode("utf-8", "replace").split("\n")
    if lines[0] != NEWS_HEAD:
        return None
    heard = set()
    for line in lines[1:]:
        kind, _, workflow = line.partition(" ")
        if kind not in ("q", "e") or not workflow:
            return None
        heard.add((kind, workflow))
    return heard


def _now():
    return round(time.time(), 3)


def _user_out(row):
    if row is None:
        return None
    user = dict(row)
    user["meta"] = json.loads(user["meta"])
    return user


class MetaTooLarge(ValueError):
    """A profile's merged ``meta`` would pass its limits; nothing was written."""


_USER = "id, email, name, locale, currency, meta, created_at, updated_at"
# NOTE: a field not given is bound as NULL and keeps its value (no profile
# field may be set to null), so each write is one fixed statement. The same
# statements run on PostgreSQL, where json_patch is a function of the
# schema's (pg.MIGRATIONS) and "owner = :owner" comes before ":owner IS
# NULL" so that PostgreSQL learns the parameter's type from it.
USER_SQL = {
    "upsert": f"""
        INSERT INTO users (id, owner, email, name, locale, currency, meta, created_at, updated_at)
        VALUES (:id, :owner, :email, :name, :locale, :currency, json_patch('{{}}', :meta), :now, :now)
        ON CONFLICT (owner, email) DO UPDATE SET
            name = COALESCE(:name, users.name), locale = COALESCE(:locale, users.locale),
            currency = COALESCE(:currency, users.currency),
            meta = json_patch(users.meta, :meta), updated_at = :now
        RETURNING {_USER}""",
    "patch": f"""
        UPDATE users SET name = COALESCE(:name, name), locale = COALESCE(:locale, locale),
            currency = COALESCE(:currency, currency), meta = json_patch(meta, :meta),
            updated_at = :now
        WHERE id = :id AND (owner = :owner OR :owner IS NULL)
        RETURNING {_USER}""",
    "get": f"SELECT {_USER} FROM users WHERE id = :id AND (owner = :owner OR :owner IS NULL)",
    "get_by_email": f"SELECT {_USER} FROM users WHERE owner = :owner AND email = :email",
}


class UserStore:
    """User profiles, each owned by the key that made it (``owner``), keyed
    by id and unique by (owner, normalised email): every tenant has its own
    set, and one tenant's profiles are invisible to another.

    ``meta`` is merged as RFC 7396 says, and its limits (``max_meta_keys``,
    ``max_meta_bytes`` as compact JSON) hold for the merged result, checked
    in the same transaction as the write: MetaTooLarge, and nothing written.
    """

    def __init__(self, db, max_meta_keys=100, max_meta_bytes=16 * 1024):
        self.db = db
        self.max_meta_keys = max_meta_keys
        self.max_meta_bytes = max_meta_bytes

    def _write(self, name, params):
        params = {f: None for f in ("name", "locale", "currency")} | params
        with self.db.write() as conn:
            row = conn.execute(USER_SQL[name], params).fetchone()
            if row is not None:
                user = _user_out(row)
                self._check_meta(user["meta"])  # raising rolls the write back
        return row and user

    def _check_meta(self, meta):
        if len(meta) > self.max_meta_keys:
            raise MetaTooLarge(f"meta: must have at most {self.max_meta_keys} keys once merged")
        if len(json.dumps(meta, separators=(",", ":"))) > self.max_meta_bytes:
            raise MetaTooLarge(f"meta: must be at most {self.max_meta_bytes} bytes as JSON once merged")

    def upsert(self, owner, email, fields):
        """Create ``owner``'s user with this email, or update the fields given;
        returns (created, user). One statement, so two concurrent upserts of
        a new email make one user."""
        new_id = uuid.uuid4().hex
        user = self._write("upsert", {**fields, "id": new_id, "owner": owner, "email": email,
                                      "now": _now(), "meta": _meta(fields)})
        return user["id"] == new_id, user

    def patch(self, user_id, fields, owner=None):
        """Update the given fields of a user (of ``owner``'s, unless None: any);
        None if there is none."""
        return self._write("patch", {**fields, "id": user_id, "owner": owner, "now": _now(),
                                     "meta": _meta(fields)})

    def get(self, user_id, owner=None):
        rows = self.db.query(USER_SQL["get"], {"id": user_id, "owner": owner})
        return _user_out(rows[0]) if rows else None

    def get_by_email(self, email, owner):
        rows = self.db.query(USER_SQL["get_by_email"], {"email": email, "owner": owner})
        return _user_out(rows[0]) if rows else None


def _meta(fields):
    return json.dumps(fields.get("meta", {}), separators=(",", ":"), allow_nan=False)


_KEY = ("id, name, role, prefix, daily_budget, rate_per_minute, created_at, last_used_at,"
        " revoked_at, workflows")
KEY_SQL = {
    "create": f"INSERT INTO api_keys ({_KEY}, digest) VALUES (:id, :name, :role, :prefix,"
              " :daily_budget, :rate_per_minute, :created_at, :last_used_at, :revoked_at,"
              " :workflows, :digest)",
    "lookup": f"SELECT {_KEY} FROM api_keys WHERE digest = :digest AND revoked_at IS NULL",
    "touch": "UPDATE api_keys SET last_used_at = :now WHERE id = :id",
    "get": f"SELECT {_KEY} FROM api_keys WHERE id = :id",
    "list": f"SELECT {_KEY} FROM api_keys ORDER BY created_at",
    "revoke": f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, :now) WHERE id = :id"
              f" RETURNING {_KEY}",
}


class KeyStore:
    """Managed API keys (``lq_...``), held as SHA-256 digests only."""

    def __init__(self, db, clock=time.time):
        self.db = db
        self.clock = clock
        self._touched = {}  # key id -> when last_used_at was last written

    def create(self, name, role, daily_budget=None, rate_per_minute=None, workflows=None):
        """A new key; returns (record, secret). The secret is never stored."""
        secret = "lq_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        record = {"id": "key_" + os.urandom(8).hex(), "name": name, "role": role,
                  "prefix": secret[:11], "daily_budget": daily_budget,
                  "rate_per_minute": rate_per_minute, "created_at": round(self.clock(), 3),
                  "last_used_at": None, "revoked_at": None, "workflows": workflows}
        self.db.write_one(KEY_SQL["create"], dict(
            record, digest=hashlib.sha256(secret.encode()).digest(),
            workflows=None if workflows is None else json.dumps(workflows)))
        return record, secret

    @staticmethod
    def _out(row):
        return dict(row, workflows=row["workflows"] and json.loads(row["workflows"]))

    def lookup(self, secret):
        """The live key with this secret, or None. The digest is the index:
        what the lookup's time depends on is a hash the caller cannot steer."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        rows = self.db.query(KEY_SQL["lookup"], {"digest": digest})
        if not rows:
            return None
        key = self._out(rows[0])
        now = self.clock()
        # PERF: last_used_at is written at most once a minute per key.
        if now - self._touched.get(key["id"], 0) > 60:
            self._touched[key["id"]] = now
            self.db.write_one(KEY_SQL["touch"], {"now": round(now, 3), "id": key["id"]})
        return key

    def get(self, key_id):
        """The key with this id, revoked or not, or None."""
        rows = self.db.query(KEY_SQL["get"], {"id": key_id})
        return self._out(rows[0]) if rows else None

    def list(self):
        return [self._out(r) for r in self.db.query(KEY_SQL["list"])]

    def revoke(self, key_id):
        rows = self.db.write_one(KEY_SQL["revoke"], {"now": round(self.clock(), 3), "id": key_id})
        return self._out(rows[0]) if rows else None
