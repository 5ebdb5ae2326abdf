"""What the operator sees: read-only questions across every key's jobs,
asked by the dashboard (``dashboard``) and the Prometheus exposition
(``metrics``).

The job stores' contract (``contracts.JobStore``) answers a client about
its own jobs; an operator asks about all of them at once: how many by status
and workflow, how long they ran, the oldest waiting, the deliveries failing,
a listing by any key and time. ``Insights`` answers those for each store:
named SQL over the ``jobs`` table for the SQL store (SQLite or PostgreSQL,
the few statements that read inside a job's JSON written per dialect), and
a walk of the in-memory store's jobs for the memory store. The figures that
live only in the database whatever the job store (per-minute statistics,
the ledger, the audit log, every key's schedules) are named SQL shared by
both dialects. Nothing here writes (the attempt log the job page shows is
the engine's, kept with each job).
"""

import json

import jobstore
import schedules

# A job's fields inside its JSON, as each database reads them.
_FIELDS = {
    "sqlite": {
        "created_at": "json_extract(data, '$.created_at')",
        "queued_at": "json_extract(data, '$.queued_at')",
        "started_at": "json_extract(data, '$.started_at')",
        "callback_state": "json_extract(data, '$.callback.state')",
        "callback_error": "json_extract(data, '$.callback.last_error')",
        "statuses": jobstore.IN_LIST["sqlite"].format("statuses"),
    },
    "postgres": {
        "created_at": "CAST(data ->> 'created_at' AS double precision)",
        "queued_at": "CAST(data ->> 'queued_at' AS double precision)",
        "started_at": "CAST(data ->> 'started_at' AS double precision)",
        "callback_state": "(data #>> '{callback,state}')",
        "callback_error": "(data #>> '{callback,last_error}')",
        "statuses": jobstore.IN_LIST["postgres"].format("statuses"),
    },
}
# Over the jobs table; {name} is a field above (or, for {statuses}, a list
# bound as one JSON array, as the job store binds it). NOTE: "x = :p OR :p IS NULL"
# puts the comparison first so that PostgreSQL learns the parameter's type.
_JOB_SQL = {
    "by_status_workflow": "SELECT status, workflow, COUNT(*) AS n FROM jobs GROUP BY status, workflow",
    "oldest_queued": "SELECT MIN({queued_at}) AS t FROM jobs WHERE status = 'queued'",
    # Pending with an error (callback_due is set only while one is pending),
    # or given up, among jobs that finished since :since.
    "callbacks_failing": "SELECT COUNT(*) AS n FROM jobs WHERE finished_at >= :since"
                         " AND (({callback_state} = 'pending' AND {callback_error} IS NOT NULL)"
                         " OR {callback_state} = 'failed')",
    "run_times": "SELECT workflow, finished_at - {started_at} AS seconds FROM jobs"
                 " WHERE finished_at >= :since AND {started_at} IS NOT NULL"
                 " ORDER BY finished_at DESC LIMIT :limit",
    "list": "SELECT seq, data FROM jobs WHERE seq < :before"
            " AND (status IN {statuses} OR :any_status = 1) AND (workflow = :workflow OR :workflow IS NULL)"
            " AND (key_id = :key_id OR :key_id IS NULL) AND (schedule = :schedule OR :schedule IS NULL)"
            " AND (concurrency_key = :concurrency_key OR :concurrency_key IS NULL)"
            " AND ({created_at} >= :since OR :since IS NULL) AND ({created_at} < :until OR :until IS NULL)"
            " ORDER BY seq DESC LIMIT :limit",
}
# The same on SQLite and PostgreSQL, whatever the job store.
SQL = {
    "minutes": "SELECT minute, jobs, finished, failed FROM minutes WHERE minute >= :start ORDER BY minute",
    "ledger_lines": "SELECT ts, day, kind, amount, note FROM ledger WHERE job_id = :job_id ORDER BY id",
    "spent_ever": "SELECT CAST(COALESCE(SUM(spent), 0) AS BIGINT) AS s FROM ledger_jobs",
    "audit": "SELECT id, ts, key_id, method, path, status, request_id FROM audit_log WHERE id < :before"
             " AND (key_id = :key_id OR :key_id IS NULL) AND (method = :method OR :method IS NULL)"
             " AND (status = :status OR :status IS NULL)"
             " AND (ts >= :since OR :since IS NULL) AND (ts < :until OR :until IS NULL)"
             " ORDER BY id DESC LIMIT :limit",
    # Every key's schedules by name (then owner), after the cursor's (name, key_id);
    # the store's own columns, read back by the store's own reader.
    "schedules": f"SELECT {schedules.SCHEDULE_COLUMNS} FROM schedules"
                 " WHERE (key_id = :key_id OR :key_id IS NULL) AND (paused = :paused OR :paused IS NULL)"
                 " AND (name > :after_name OR (name = :after_name AND key_id > :after_key)"
                 " OR :after_name IS NULL)"
                 " ORDER BY name, key_id LIMIT :limit",
}
RUN_TIME_SAMPLE = 20_000  # the newest finished jobs that run-time percentiles are taken over


def percentile(sorted_values, q):
    """The q-quantile (0..1) of sorted values, nearest rank; None for none."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


class Insights:
    """Read-only operator questions over ``services``' stores."""

    def __init__(self, jobs, db):
        self.db = db
        self.memory = isinstance(jobs, jobstore.MemoryJobStore)
        self.jobs = jobs
        fields = _FIELDS[db.dialect if not self.memory else "sqlite"]
        self.job_sql = {name: sql.format(**fields) for name, sql in _JOB_SQL.items()}

    # -- jobs --------------------------------------------------------------------------

    def _held(self):
        """Every job of the memory store: the job dicts themselves, taken under
        the store's own lock and read after it without changing them.
        NOTE: the store has no method for every key's jobs (its contract
        serves clients); a scan of it is the operator's view."""
        with self.jobs._lock:
            return list(self.jobs._jobs.values())

    def by_status_workflow(self):
        """{(status, workflow): n} of the jobs held."""
        if self.memory:
            counts = {}
            for job in self._held():
                key = (job["status"], job["workflow"])
                counts[key] = counts.get(key, 0) + 1
            return counts
        return {(r["status"], r["workflow"]): r["n"]
                for r in self.db.query(self.job_sql["by_status_workflow"])}

    def oldest_queued(self):
        """When the job waiting longest entered the queue, or None."""
        if self.memory:
            return min((j["queued_at"] for j in self._held() if j["status"] == "queued"), default=None)
        return self.db.query(self.job_sql["oldest_queued"])[0]["t"]

    def callbacks_failing(self, since):
        """Jobs finished since ``since`` whose callback is failing: retrying
        after an error, or given up."""
        if self.memory:
            return sum(1 for j in self._held() if (j["finished_at"] or 0) >= since and _failing(j))
        return self.db.query(self.job_sql["callbacks_failing"], {"since": since})[0]["n"]

    def run_times(self, since):
        """{workflow: (p50, p95, n)} in seconds over the newest jobs (at most
        RUN_TIME_SAMPLE) that finished since ``since``, by their last attempt."""
        if self.memory:
            rows = [(j["workflow"], j["finished_at"] - j["started_at"]) for j in self._held()
                    if (j["finished_at"] or 0) >= since and j["started_at"] is not None]
            rows = rows[-RUN_TIME_SAMPLE:]
        else:
            rows = [(r["workflow"], r["seconds"]) for r in self.db.query(
                self.job_sql["run_times"], {"since": since, "limit": RUN_TIME_SAMPLE})]
        per = {}
        for workflow, seconds in rows:
            per.setdefault(workflow, []).append(max(0.0, seconds))
        return {w: (percentile(sorted(v), 0.5), percentile(sorted(v), 0.95), len(v))
                for w, v in per.items()}

    def list(self, statuses=(), workflow=None, key_id=None, since=None, until=None, limit=50,
             before_seq=None, schedule=None, concurrency_key=None):
        """Up to ``limit`` jobs of any key, newest first, below ``before_seq``,
        matching every filter given (``statuses``: any of them; none, any
        status); and whether more follow."""
        if self.memory:
            found = []
            for job in reversed(self._held()):
                if (before_seq is not None and job["seq"] >= before_seq) \
                        or (statuses and job["status"] not in statuses) \
                        or (workflow is not None and job["workflow"] != workflow) \
                        or (key_id is not None and job["key_id"] != key_id) \
                        or (schedule is not None and job.get("schedule") != schedule) \
                        or (concurrency_key is not None and job.get("concurrency_key") != concurrency_key) \
                        or (since is not None and job["created_at"] < since) \
                        or (until is not None and job["created_at"] >= until):
                    continue
                if len(found) == limit:
                    return found, True
                found.append(dict(job))
            return found, False
        rows = self.db.query(self.job_sql["list"], {
            "statuses": json.dumps(list(statuses)), "any_status": 0 if statuses else 1,
            "workflow": workflow, "key_id": key_id, "schedule": schedule,
            "concurrency_key": concurrency_key, "since": since, "until": until, "limit": limit + 1,
            "before": jobstore.NO_CURSOR if before_seq is None else before_seq})
        jobs = [jobstore.SqlJobStore._job(r) for r in rows]
        return jobs[:limit], len(jobs) > limit

    # -- the database's own figures -------------------------------------------------------

    def minutes(self, start_minute):
        """Per-minute jobs accepted, finished and failed since ``start_minute``."""
        return self.db.query(SQL["minutes"], {"start": start_minute})

    def ledger_lines(self, job_id):
        return self.db.query(SQL["ledger_lines"], {"job_id": job_id})

    def spent_ever(self):
        """Micro-dollars every job has spent, ever."""
        return self.db.query(SQL["spent_ever"])[0]["s"]

    def audit(self, key_id=None, method=None, status=None, since=None, until=None, limit=50,
              before_id=None):
        """Audit rows newest first, below ``before_id``, matching every filter
        given; and whether more follow."""
        rows = self.db.query(SQL["audit"], {
            "key_id": key_id, "method": method, "status": status, "since": since,
            "until": until, "limit": limit + 1,
            "before": jobstore.NO_CURSOR if before_id is None else before_id})
        return rows[:limit], len(rows) > limit

    def schedules(self, key_id=None, paused=None, limit=50, after=None):
        """Every key's schedules, by name then owner, after ``after`` (the
        (name, key_id) a page ended on), of ``key_id`` and paused or not if
        given: each as the store gives it, its owner in ``key_id``; and
        whether more follow. The store (``schedules.ScheduleStore``) answers
        a key about its own; this is the operator's view of them all."""
        after_name, after_key = after if after is not None else (None, None)
        rows = self.db.query(SQL["schedules"], {
            "key_id": key_id, "paused": None if paused is None else int(paused),
            "after_name": after_name, "after_key": after_key, "limit": limit + 1})
        found = [schedules.schedule_out(r) for r in rows]
        return found[:limit], len(found) > limit


def _failing(job):
    state = job.get("callback") or {}
    return state.get("state") == "failed" or (state.get("state") == "pending"
                                               and state.get("last_error") is not None)
