"""The money ledger: reservations, charges and releases in micro-dollars,
with running totals per day and per job, kept in the SQLite database."""

import time

from costs import BudgetExceeded, utc_day

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
            entry = {"job_id": job["job_id"], "day": day, "key_id": job["key_id"],
                     "workflow": job["workflow"]}
            # A job retried on another day reserves again, on that day.
            conn.execute("INSERT INTO ledger_jobs VALUES (:job_id, :day, :key_id, :workflow, :amount, 0)"
                         " ON CONFLICT DO UPDATE SET day = excluded.day, reserved = excluded.reserved",
                         dict(entry, amount=amount))
            self._row(conn, now, entry, amount, "reserve", "job cap")
            self._add_use(conn, day, job["key_id"], amount)
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
