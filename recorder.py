"""Audit rows and per-minute service statistics, written off the request path."""

import collections
import threading
import time

from storage import COUNTERS

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

    def audit(self, key_id, method, path, status, request_id):
        now = self.clock()
        minute = int(now // 60)
        with self._lock:
            self._counts[minute, "auth_writes"] += 1
            if len(self._rows) < self.MAX_PENDING:
                self._rows.append((round(now, 3), key_id, method, path, status, request_id))

    def outcome(self, job):
        """Count a finished job for the usage report (by day, workflow, key, status)."""
        day = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        with self._lock:
            self._outcomes[day, job["workflow"], job["key_id"], job["status"]] += 1

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
                    "INSERT INTO audit_log (ts, key_id, method, path, status, request_id)"
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
