"""The money ledger: reservations, charges and releases in micro-dollars,
with running totals per day and per job, kept in the SQLite database."""

import time
import types

from costs import BudgetExceeded, fits, utc_day

# Named statements, with named parameters, the same on SQLite and
# PostgreSQL (sums are cast, as PostgreSQL's sum of bigints is numeric).
# ledger_days and ledger_jobs are running totals of the ledger rows, written
# in the same transactions.
SQL = {
    "row": "INSERT INTO ledger (ts, day, job_id, key_id, workflow, amount, kind, note, step)"
           " VALUES (:ts, :day, :job_id, :key_id, :workflow, :amount, :kind, :note, :step)",
    "add_use": "INSERT INTO ledger_days (day, key_id, used) VALUES (:day, :key_id, :amount)"
               " ON CONFLICT (day, key_id) DO UPDATE SET used = ledger_days.used + excluded.used",
    "used": "SELECT used FROM ledger_days WHERE day = :day AND key_id = :key_id",
    "outstanding": "SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT) AS r FROM ledger_jobs"
                   " WHERE day = :day AND reserved > 0 AND (key_id = :key_id OR :key_id IS NULL)",
    "hold": "INSERT INTO ledger_jobs (job_id, day, key_id, workflow, reserved, spent)"
            " VALUES (:job_id, :day, :key_id, :workflow, :amount, 0)"
            " ON CONFLICT (job_id) DO UPDATE SET day = excluded.day,"
            " reserved = ledger_jobs.reserved + excluded.reserved",
    "job": "SELECT job_id, day, key_id, workflow, reserved, spent FROM ledger_jobs WHERE job_id = :job_id",
    "spend": "INSERT INTO ledger_jobs (job_id, day, key_id, workflow, reserved, spent)"
             " VALUES (:job_id, :day, :key_id, :workflow, 0, :amount)"
             " ON CONFLICT (job_id) DO UPDATE SET day = excluded.day,"
             " reserved = ledger_jobs.reserved - :covered, spent = ledger_jobs.spent + :amount"
             " RETURNING spent",
    "release_all": "UPDATE ledger_jobs SET reserved = 0 WHERE job_id = :job_id",
    "held": "SELECT job_id FROM ledger_jobs AS j WHERE reserved > 0"
            " AND (SELECT MAX(ts) FROM ledger WHERE ledger.job_id = j.job_id) < :before LIMIT :limit",
    # Grouped by day, workflow or key: {column} is one of those three names.
    "usage_money": "SELECT {column} AS g,"
                   " CAST(COALESCE(SUM(CASE WHEN kind = 'charge' THEN amount END), 0) AS BIGINT) AS spend,"
                   " CAST(COALESCE(SUM(CASE WHEN kind != 'charge' THEN amount END), 0) AS BIGINT) AS reserved"
                   " FROM ledger WHERE day BETWEEN :first AND :last"
                   " AND (key_id = :key_id OR :key_id IS NULL) GROUP BY g",
    "usage_outcomes": "SELECT {column} AS g, status, CAST(SUM(n) AS BIGINT) AS n FROM job_outcomes"
                      " WHERE day BETWEEN :first AND :last AND (key_id = :key_id OR :key_id IS NULL)"
                      " GROUP BY g, status",
}
# By step: what was charged outside any step (and reservations) is in "".
GROUP_COLUMNS = {"day": "day", "workflow": "workflow", "key": "key_id", "step": "COALESCE(step, '')"}
# Every transaction that moves money takes this lock first (an advisory lock
# in PostgreSQL; SQLite's write transactions run one at a time anyway), so
# checks and writes never interleave, on one host or many. Row locks would
# serialise them all the same (every reservation writes the service's row
# of the day), with more statements and a lock order to keep; serializable
# transactions would abort and retry exactly under the 300-way races the
# budget exists for.
MONEY = "ledger"


class _Reads:
    """``db.query`` in the shape of a transaction's connection
    (``execute(...).fetchone()``), for a check that writes nothing."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, params=()):
        rows = self.db.query(sql, params)
        return types.SimpleNamespace(fetchone=lambda: rows[0] if rows else None)


class Ledger:
    """Reservations, charges and releases in integer micro-dollars.

    Every check of a budget and the rows it allows are one BEGIN IMMEDIATE
    transaction, so no number of concurrent requests can take a reservation
    past a budget's limit. A job's cap is reserved against its day at intake;
    each charge turns part of the reservation into spend (a charge row and an
    equal release row); ``settle`` releases what is left when the job ends.
    Money spent is recorded in full even past the reservation: that part is
    a charge row alone, which counts against the day at once. So a day's use
    is always the sum of its rows, and spend the sum of charges.
    ``ledger_days`` and ``ledger_jobs`` keep those sums as running totals,
    written in the same transactions, so every check reads a row, not a day.
    """

    SERVICE = "*"

    def __init__(self, db, clock=time.time):
        self.db = db
        self.clock = clock

    @staticmethod
    def _row(conn, now, job, amount, kind, note, step=None):
        conn.execute(SQL["row"], {"ts": now, "day": job["day"], "job_id": job["job_id"],
                                  "key_id": job["key_id"], "workflow": job["workflow"],
                                  "amount": amount, "kind": kind, "note": note and str(note)[:200],
                                  "step": step})

    def _add_use(self, conn, day, key_id, amount):
        conn.executemany(SQL["add_use"], [{"day": day, "key_id": k, "amount": amount}
                                          for k in (self.SERVICE, key_id)])

    @staticmethod
    def _used(conn, day, key_id):
        row = conn.execute(SQL["used"], {"day": day, "key_id": key_id}).fetchone()
        return row["used"] if row else 0

    def _refusal(self, conn, day, amount, limits):
        """The state of the first of ``limits`` (scope, key_id or None for
        the whole service, limit) that ``amount`` more does not fit on
        ``day``, with the reservations outstanding in its scope; else None."""
        for scope, key_id, limit in limits:
            used = self._used(conn, day, key_id or self.SERVICE)
            if not fits(used, amount, limit):
                # Read only on a refusal: the rows still holding a reservation.
                reserved = conn.execute(SQL["outstanding"], {"day": day, "key_id": key_id}).fetchone()["r"]
                return {"scope": scope, "limit": limit, "used": used, "requested": amount,
                        "day": day, "reserved": reserved}
        return None

    def _hold(self, conn, now, day, job, amount, note):
        """Add ``amount`` to the job's reservation, on ``day`` (today, unless
        it already holds a reservation on another)."""
        entry = {"job_id": job["job_id"], "day": day, "key_id": job["key_id"],
                 "workflow": job["workflow"]}
        conn.execute(SQL["hold"], dict(entry, amount=amount))
        self._row(conn, now, entry, amount, "reserve", note)
        self._add_use(conn, day, job["key_id"], amount)

    def reserve(self, job, amount, limits):
        """Reserve ``amount`` for a new job against today's ``limits``.
        BudgetExceeded names the first that would be passed; nothing is
        written then. An amount of 0 only checks that something is left."""
        return self.reserve_many([(job, amount)], limits)

    def reserve_many(self, items, limits):
        """Reserve for each (job, amount) in turn, all in one transaction:
        on the first that does not fit, BudgetExceeded (its ``index`` the
        item's place) and nothing is written."""
        now = self.clock()
        day = utc_day(now)
        if not any(amount for _, amount in items):
            # PERF: nothing to hold, only whether anything is left: a read,
            # without the money's write lock (in SQLite, the whole file's).
            refused = self._refusal(_Reads(self.db), day, 0, limits)
            if refused is not None:
                raise BudgetExceeded(refused, 0)  # each item is the same check: the first fails
            return day
        with self.db.write(lock=MONEY) as conn:
            for index, (job, amount) in enumerate(items):
                refused = self._refusal(conn, day, amount, limits)
                if refused is not None:
                    raise BudgetExceeded(refused, index)
                if amount:
                    self._hold(conn, now, day, job, amount, "job cap")
        return day

    def reserve_rest(self, job, cap, limits):
        """For a retry: reserve what is left of the job's ``cap`` after what
        it spent in earlier attempts, today (a retry on a later day reserves
        on that day). Returns the amount; None, with nothing written, while
        the job still holds a reservation: then another retry has taken it,
        or the last attempt's is not released yet."""
        now = self.clock()
        day = utc_day(now)
        with self.db.write(lock=MONEY) as conn:
            row = conn.execute(SQL["job"], job).fetchone() or {"reserved": 0, "spent": 0}
            if row["reserved"]:
                return None
            amount = max(0, cap - row["spent"])
            if amount:
                refused = self._refusal(conn, day, amount, limits)
                if refused is not None:
                    raise BudgetExceeded(refused)
                self._hold(conn, now, day, job, amount, "job cap, less what it spent")
        return amount

    def top_up(self, job, amount, limits):
        """Raise a running job's reservation to at least ``amount`` (a
        workflow about to spend up to that); BudgetExceeded, and nothing
        written, if the difference does not fit ``limits``."""
        now = self.clock()
        with self.db.write(lock=MONEY) as conn:
            row = conn.execute(SQL["job"], job).fetchone()
            held = row["reserved"] if row else 0
            if amount <= held:
                return
            day = row["day"] if held else utc_day(now)
            refused = self._refusal(conn, day, amount - held, limits)
            if refused is not None:
                raise BudgetExceeded(refused)
            self._hold(conn, now, day, job, amount - held, "before spending")

    def charge(self, job, amount, limits=(), note=None, total=False, step=None):
        """Record ``amount`` spent by the job (with ``total``: raise what it
        has spent to ``amount``, charging the difference, nothing if it is
        not higher), always in full, in ``step``'s name if given. Its reservation covers what it can; the
        rest counts against the day at once. Returns (what the job has spent
        in all, the state of the first of ``limits`` that rest passed, or
        None). One transaction: concurrent reports of one total charge once."""
        now = self.clock()
        with self.db.write(lock=MONEY) as conn:
            row = conn.execute(SQL["job"], job).fetchone() or {"reserved": 0, "spent": 0}
            if total:
                amount -= row["spent"]
            if amount <= 0:
                return row["spent"], None
            covered = min(amount, row["reserved"])
            # Spending past a reservation counts on the reservation's day; with
            # none left, today.
            day = row["day"] if row["reserved"] else utc_day(now)
            passed = None
            if amount > covered:
                passed = self._refusal(conn, day, amount - covered, limits)
                self._add_use(conn, day, job["key_id"], amount - covered)
            entry = {"job_id": job["job_id"], "day": day, "key_id": job["key_id"],
                     "workflow": job["workflow"]}
            spent = conn.execute(SQL["spend"], dict(entry, amount=amount, covered=covered)).fetchone()["spent"]
            self._row(conn, now, entry, amount, "charge", note, step)
            if covered:  # the reservation was the job's, not the step's
                self._row(conn, now, entry, -covered, "release", note)
        return spent, passed

    def settle(self, job_id, note):
        """Release what is left of a job's reservation; returns what it spent."""
        # PERF: most jobs end holding nothing (nothing declared, or all
        # spent): a read says so without the money's write lock.
        rows = self.db.query(SQL["job"], {"job_id": job_id})
        if not rows or rows[0]["reserved"] <= 0:
            return rows[0]["spent"] if rows else 0
        now = self.clock()
        with self.db.write(lock=MONEY) as conn:
            job = conn.execute(SQL["job"], {"job_id": job_id}).fetchone()
            if job is None:
                return 0
            if job["reserved"] > 0:
                conn.execute(SQL["release_all"], {"job_id": job_id})
                self._row(conn, now, job, -job["reserved"], "release", note)
                self._add_use(conn, job["day"], job["key_id"], -job["reserved"])
        return job["spent"]

    def held(self, before, limit=500):
        """Ids of jobs that still hold a reservation last changed before
        ``before`` (at most ``limit``)."""
        return [row["job_id"] for row in self.db.query(SQL["held"], {"before": before, "limit": limit})]

    def spent(self, job_id):
        rows = self.db.query(SQL["job"], {"job_id": job_id})
        return rows[0]["spent"] if rows else 0

    def used_today(self, key_id=None):
        rows = self.db.query(SQL["used"], {"day": utc_day(self.clock()), "key_id": key_id or self.SERVICE})
        return rows[0]["used"] if rows else 0

    def usage(self, first_day, last_day, group_by, key_id=None):
        """Spend and outstanding reservations per group, with job outcomes.
        Summed from the ledger rows themselves: this is the audit view."""
        column = GROUP_COLUMNS[group_by]
        params = {"first": first_day, "last": last_day, "key_id": key_id}
        groups = {}
        for row in self.db.query(SQL["usage_money"].format(column=column), params):
            groups[row["g"]] = {"spend": row["spend"], "reserved": row["reserved"], "jobs": {}}
        if group_by == "step":
            return groups  # outcomes are counted per job, not per step
        for row in self.db.query(SQL["usage_outcomes"].format(column=column), params):
            entry = groups.setdefault(row["g"], {"spend": 0, "reserved": 0, "jobs": {}})
            entry["jobs"][row["status"]] = row["n"]
        return groups
