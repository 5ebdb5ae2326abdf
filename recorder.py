"""Audit rows, job outcomes and per-minute service statistics, written
with group commit by one background thread."""

import collections
import threading
import time

from costs import utc_day
from storage import COUNTERS, StorageError

# Named statements, the same on SQLite and PostgreSQL. The minutes upsert
# adds what was counted to what the minute already holds, so several
# processes (and hosts) can write the same minute.
SQL = {
    "audit": "INSERT INTO audit_log (ts, key_id, method, path, status, request_id)"
             " VALUES (:ts, :key_id, :method, :path, :status, :request_id)",
    "minutes": f"INSERT INTO minutes (minute, {', '.join(COUNTERS)})"
               f" VALUES (:minute, {', '.join(':' + c for c in COUNTERS)})"
               " ON CONFLICT (minute) DO UPDATE SET "
               + ", ".join(f"{c} = minutes.{c} + excluded.{c}" for c in COUNTERS),
    "outcomes": "INSERT INTO job_outcomes (day, workflow, key_id, status, n)"
                " VALUES (:day, :workflow, :key_id, :status, :n)"
                " ON CONFLICT (day, workflow, key_id, status) DO UPDATE SET n = job_outcomes.n + excluded.n",
    "first_minute": "SELECT MIN(minute) AS m FROM minutes",
    "minutes_up": "SELECT COUNT(*) AS n FROM minutes WHERE minute >= :start AND minute < :end",
    "since": "SELECT CAST(COALESCE(SUM(jobs), 0) AS BIGINT) AS jobs,"
             " CAST(COALESCE(SUM(finished), 0) AS BIGINT) AS finished,"
             " CAST(COALESCE(SUM(auth_writes), 0) AS BIGINT) AS auth_writes"
             " FROM minutes WHERE minute >= :start",
    "audited_since": "SELECT COUNT(*) AS n FROM audit_log WHERE ts >= :since",
}
AUDIT_FIELDS = ("ts", "key_id", "method", "path", "status", "request_id")
OUTCOME_FIELDS = ("day", "workflow", "key_id", "status")


class Recorder:
    """Audit rows, job outcomes and per-minute counters, written by one
    background thread with group commit.

    An audited request appends its row in memory and waits for the
    transaction that carries it: the writer takes everything
    pending as one batch, so however many threads wait, each batch costs one
    transaction, and an acknowledged change always has its audit row on disk
    (a kill -9 loses nothing that was answered). Counters and outcomes
    are statistics: the thread writes them every ``interval``, and a kill -9
    loses at most that much of them. With nothing to write, the
    thread wakes every ``interval`` seconds for a heartbeat row for the
    current minute (at least one each minute), which is what uptime is
    measured from. ``auth_writes`` is counted apart from the audit row, so a
    row that is lost (queue full) shows as audit coverage below 100%.
    """

    MAX_PENDING = 50_000
    WAIT = 10.0  # seconds an audited request waits for its row before 503

    def __init__(self, db, log, interval=1.0, clock=time.time):
        self.db = db
        self.log = log
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # signals a batch written, or failed
        self._flushing = threading.Lock()  # one batch at a time, so batches commit in order
        self._rows = []
        self._counts = collections.Counter()  # (minute, column) -> n, not yet written
        self._outcomes = collections.Counter()  # (day, workflow, key_id, status) -> n
        self._wake = threading.Event()  # rows nobody writes: the writer thread's cue
        self._taken = 0       # batches taken for writing
        self._written = 0     # batches committed
        self._failed = 0      # the last batch whose write failed (its rows wait for the next)
        self._beat_minute = None  # the last minute with a heartbeat written
        self._stop = threading.Event()
        self._thread = None

    # -- callers: append, then wait for the batch that carries it ------------

    def audit(self, key_id, method, path, status, request_id):
        """Record an audited request. An accepted change (2xx) returns once
        its row is on disk; a refusal changed nothing and does not wait
        (the database may be the very thing that refused it)."""
        self.audit_many(key_id, method, [path], status, request_id)

    def audit_many(self, key_id, method, paths, status, request_id):
        """``audit`` with a row for each of ``paths`` (a batch intake has one per job)."""
        now = self.clock()
        with self._lock:
            self._counts[int(now // 60), "auth_writes"] += len(paths)
            room = max(0, self.MAX_PENDING - len(self._rows))
            self._rows += [(round(now, 3), key_id, method, path, status, request_id)
                           for path in paths[:room]]
            waits = 200 <= status < 300
            ticket = self._take_ticket(wake_writer=not waits)
        if waits:
            self._wait_written(ticket)

    def statements(self, key_id, method, paths, status, request_id):
        """The rows ``audit_many`` would write, as statements (each with its
        rows of parameters) for the transaction of the change they record (a
        job store's ``also``): committed with it, they need no wait and no
        write of their own. ``carried`` counts them once it has committed."""
        ts = round(self.clock(), 3)
        return [(SQL["audit"], [dict(zip(AUDIT_FIELDS, (ts, key_id, method, path, status, request_id)))
                                for path in paths])]

    def carried(self, n):
        """Count ``n`` audit rows committed with their change (``statements``)."""
        with self._lock:
            self._counts[int(self.clock() // 60), "auth_writes"] += n

    def outcome(self, job):
        """Count a finished job for the usage report (by day, workflow, key,
        status); written with the next batch, as ``count`` is. PERF: a job's
        end does not wait for it (a transaction of its own per job would
        halve the pool's throughput); what a process killed within that
        second had not written is lost from the report, never from the money."""
        day = utc_day(self.clock())
        with self._lock:
            self._outcomes[day, job["workflow"], job["key_id"], job["status"]] += 1

    def count(self, column, n=1):
        """Count ``n`` events of this minute; written by the writer thread's
        next flush, within ``interval`` (a request does not wait for it)."""
        assert column in COUNTERS
        minute = int(self.clock() // 60)
        with self._lock:
            self._counts[minute, column] += n

    def _take_ticket(self, wake_writer=True):
        """The number of the batch that will carry what was just appended
        (under the lock): the next one taken. A caller that will wait for it
        writes it itself (``_wait_written``); a row nobody waits for wakes
        the writer thread."""
        if wake_writer:
            self._wake.set()
        return self._taken + 1

    def _wait_written(self, ticket):
        """Return once batch ``ticket`` is committed. PERF: the waiting caller
        writes the batch itself when no batch is being written, instead of
        handing it to the writer thread and being woken back (two thread
        switches, about half of what an audited request cost); while one is
        being written, the rows that arrive meanwhile wait for it and then
        go together in the next, whose writer is the first of them to get
        there: group commit, as before."""
        deadline = time.monotonic() + self.WAIT
        while True:
            with self._cond:
                while self._written < ticket and self._flushing.locked():
                    if time.monotonic() >= deadline:
                        raise StorageError("busy", "the audit log could not be written in time")
                    self._cond.wait(deadline - time.monotonic())
                if self._written >= ticket:
                    return
                if self._failed >= ticket:  # the database refused it: no use waiting longer
                    raise StorageError("unavailable", "the audit log cannot be written now; "
                                                      "its row is kept for the next write")
            try:
                self._flush(rows_only=True)
            except Exception as exc:  # the rows are kept for the next batch; _failed says so
                self.log.error("recorder flush failed", error=f"{type(exc).__name__}: {exc}")

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
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _run(self):
        checkpointed = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
                # PERF: copying the WAL back is not every batch's cost.
                if time.monotonic() - checkpointed >= self.interval:
                    checkpointed = time.monotonic()
                    self.db.checkpoint()
            except Exception as exc:  # keep the heartbeat alive through a bad moment
                self.log.error("recorder flush failed", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.05)  # and do not spin on a database that refuses

    def flush(self):
        """Write pending rows and counters, and a heartbeat for this minute,
        as one transaction; then wake whoever waited for them, once the
        next batch may be written (``_wait_written`` waits for both)."""
        self._flush()

    def _flush(self, rows_only=False):
        """``flush``; with ``rows_only``, the audit rows alone, for a request
        waiting on its row. PERF: the counters and outcomes wait for the
        writer thread's next flush (within ``interval``), which spares every
        audited request the upsert of this minute's row (an in-process
        intake took 11% less time)."""
        try:
            with self._flushing:
                self._write_batch(rows_only)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _write_batch(self, rows_only=False):
        counts, outcomes = collections.Counter(), collections.Counter()
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows_only:
                counts, self._counts = self._counts, collections.Counter()
                outcomes, self._outcomes = self._outcomes, collections.Counter()
            self._taken += 1
            batch = self._taken
        this_minute = int(self.clock() // 60)
        minutes = {}
        if counts or (not rows_only and this_minute != self._beat_minute):
            minutes[this_minute] = dict.fromkeys(COUNTERS, 0)  # this minute's heartbeat, at least
            for (minute, column), n in counts.items():
                minutes.setdefault(minute, dict.fromkeys(COUNTERS, 0))[column] += n
        if rows or minutes or outcomes:
            try:
                if len(rows) == 1 and not minutes and not outcomes:
                    # PERF: one statement commits itself: no BEGIN and COMMIT to run.
                    self.db.write_one(SQL["audit"], dict(zip(AUDIT_FIELDS, rows[0])))
                else:
                    with self.db.write() as conn:
                        # Rows in key order: hosts flushing at once lock them in one order.
                        for name, params in (
                                ("audit", [dict(zip(AUDIT_FIELDS, r)) for r in rows]),
                                ("minutes", [{"minute": m, **minutes[m]} for m in sorted(minutes)]),
                                ("outcomes", [dict(zip(OUTCOME_FIELDS, k), n=outcomes[k])
                                              for k in sorted(outcomes)])):
                            if params:
                                conn.executemany(SQL[name], params)
                if minutes:
                    self._beat_minute = this_minute
            except Exception:
                with self._lock:  # put it back for the next batch, newest last
                    self._rows[:0] = rows[: self.MAX_PENDING - len(self._rows)]
                    self._counts.update(counts)
                    self._outcomes.update(outcomes)
                    if rows or outcomes:
                        self._wake.set()
                    self._failed = batch
                raise
        with self._lock:
            self._written = batch

    # -- what /public/metrics shows -------------------------------------------

    def _pending(self, column, since_minute):
        with self._lock:
            return sum(n for (m, c), n in self._counts.items() if c == column and m >= since_minute)

    def metrics(self):
        now = self.clock()
        this_minute = int(now // 60)
        week_ago = this_minute - 7 * 24 * 60 + 1
        first = self.db.query(SQL["first_minute"])[0]["m"]
        start = max(week_ago, first if first is not None else this_minute)
        up = self.db.query(SQL["minutes_up"], {"start": start, "end": this_minute})[0]["n"]
        uptime = 100.0 * (up + 1) / (this_minute - start + 1)  # + this minute: we are answering

        midnight_minute = int((now - now % 86400) // 60)
        today = self.db.query(SQL["since"], {"start": midnight_minute})[0]

        day_ago = now - 86400
        writes = self.db.query(SQL["since"], {"start": int(day_ago // 60)})[0]["auth_writes"] \
            + self._pending("auth_writes", int(day_ago // 60))
        with self._lock:
            queued = len(self._rows)
        audited = self.db.query(SQL["audited_since"], {"since": day_ago})[0]["n"] + queued
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

    @property
    def full(self):
        """Whether an audit row would be dropped now: audited changes wait."""
        return len(self._rows) >= self.MAX_PENDING
