"""Where jobs live: the job vocabulary (statuses, priorities, the errors a
store raises) and the two job stores, in memory and in SQLite, which keep
one contract (``contracts.JobStore``)."""

import collections
import heapq
import json
import threading
import time

class QueueFull(Exception):
    """The job store holds as many jobs as it may."""


class IdempotencyMismatch(Exception):
    """An Idempotency-Key already used, within its lifetime, for another body."""


# What a workflow may be called: registration, intake and claims all hold
# names to it (no control or direction characters can hide in one).
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
JOB_FINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
PRIORITIES = ("high", "normal", "low")
# How far ahead of a low job each priority starts, in units of the aging step:
# a waiting job overtakes a fresher one of the next priority up after one step.
PRIORITY_HEAD_START = {"high": 2, "normal": 1, "low": 0}


def callback_due(job):
    """When a pending callback next needs a sender: its next attempt, or
    when the hold of the sender that has it now runs out. None if none is pending."""
    state = job.get("callback") or {}
    if state.get("state") != "pending":
        return None
    return max(state.get("next_attempt_at") or 0, job.get("callback_sending_until") or 0)


def claim_changes(job, changes, per_workflow):
    """What a claim sets on ``job``: ``changes``, then its workflow's entry of
    ``per_workflow``, and one more attempt."""
    return {**changes, **(per_workflow or {}).get(job["workflow"], {}),
            "attempts": job["attempts"] + 1}


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

    Its methods are the ``contracts.JobStore`` contract, which every job
    store keeps (tests/test_store_contract.py). Every change is a
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
        self._idempotency = {}                # (key_id, key) -> (body_hash, job_id, expires)
        self._idempotency_order = collections.deque()  # (expires, (key_id, key))
        self._counts = collections.Counter()  # (status, priority) -> n
        self._seq = 0

    # -- bookkeeping, always under the lock -----------------------------------

    def _purge(self, now):
        cutoff = now - self.ttl
        finished = self._finished
        gone = 0
        while finished and finished[0][0] <= cutoff:
            _, job_id = finished.popleft()
            job = self._jobs.get(job_id)
            # A job retried after it finished has a newer finish time: keep it.
            if job is not None and job["status"] in JOB_FINAL and job["finished_at"] <= cutoff:
                del self._jobs[job_id]
                self._counts[job["status"], job["priority"]] -= 1
                gone += 1
        order = self._idempotency_order
        while order and order[0][0] <= now:
            _, scope = order.popleft()
            entry = self._idempotency.get(scope)
            if entry is not None and entry[2] <= now:
                del self._idempotency[scope]
        return gone

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

        ``idempotency`` is (key_id, key, body_hash, ttl): if that key was used
        within ttl for the same body, the job it made is returned instead
        (created False); for another body, IdempotencyMismatch. Checked and
        recorded under the one lock, so concurrent duplicates make one job.
        """
        with self._lock:
            now = self.clock()
            self._purge(now)
            if idempotency is not None:
                key_id, key, body_hash, ttl = idempotency
                entry = self._idempotency.get((key_id, key))
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
                self._idempotency[key_id, key] = (body_hash, job["job_id"], now + ttl)
                self._idempotency_order.append((now + ttl, (key_id, key)))
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

    def claim(self, workflows, changes, per_workflow=None):
        """Take the best ready job among ``workflows`` (None: any) and make it
        running with ``changes`` (see ``contracts.JobStore.claim``); the new
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
            self._set(job, claim_changes(job, changes, per_workflow), now)
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
            self._promote(self.clock())  # what is due is ready, not delayed
            delayed = self._delayed
            while delayed and self._live(delayed[0]) is None:
                heapq.heappop(delayed)  # canceled, or queued again since
            return delayed[0][0] if delayed else None

    def counts(self):
        """Jobs held by status, and queued jobs by priority."""
        with self._lock:
            counts = self._counts
            by_status = {s: sum(counts[s, p] for p in PRIORITIES) for s in JOB_STATUSES}
            queued = {p: counts["queued", p] for p in PRIORITIES}
        return {"by_status": by_status, "queued_by_priority": queued}

    def page(self, key_id, status=None, workflow=None, limit=20, before_seq=None):
        """Up to ``limit`` jobs made with ``key_id``, newest first, older than
        ``before_seq``; and whether more follow."""
        found = []
        with self._lock:
            for job in reversed(self._jobs.values()):
                if before_seq is not None and job["seq"] >= before_seq:
                    continue
                if job["key_id"] != key_id or (status is not None and job["status"] != status) \
                        or (workflow is not None and job["workflow"] != workflow):
                    continue
                if len(found) == limit:
                    return found, True
                found.append(dict(job))
        return found, False

    def purge(self, now):
        """Drop finished jobs past their time (add() does it too); returns how many went."""
        with self._lock:
            return self._purge(now)

    def pending_callbacks(self, due_by=None):
        """(job_id, callback_id, due) of pending deliveries, those due by
        ``due_by`` only if given (see SqlJobStore.pending_callbacks)."""
        with self._lock:
            found = [(job["job_id"], job["callback_id"], callback_due(job))
                     for job in self._jobs.values() if job["callback"] is not None]
        return [f for f in found if f[2] is not None and (due_by is None or f[2] <= due_by)]

    def quarantine(self):
        return []  # nothing here was ever read back from text

    def watch(self, wake):
        """Nothing to watch: no other process can queue a job here."""

    def __len__(self):
        with self._lock:
            return len(self._jobs)


# The columns beside each job's JSON, which the queue, the sweeps and the
# listings search by; and every statement of the SQL job store, named.
JOB_COLUMNS = ("job_id", "status", "workflow", "priority", "key_id", "score", "not_before",
               "lease_expires_at", "finished_at", "callback_due", "data")
NO_CURSOR = 2**62  # "before" for a first page: every seq is below it
# Written for SQLite; POSTGRES below replaces the few that PostgreSQL must
# have otherwise. NOTE: in "x = :p OR :p IS NULL" the comparison comes
# first, so that PostgreSQL learns the parameter's type from it.
SQL = {
    # The limit is checked by the insert itself, against the count that
    # triggers keep in the same transaction: exact across processes.
    "insert": f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)})"
              f" SELECT {', '.join(':' + c for c in JOB_COLUMNS)}"
              " WHERE (SELECT n FROM job_count) < :max_jobs RETURNING seq",
    "save": "UPDATE jobs SET status = :status, score = :score, not_before = :not_before,"
            " lease_expires_at = :lease_expires_at, finished_at = :finished_at,"
            " callback_due = :callback_due, data = :data WHERE job_id = :job_id",
    "get": "SELECT seq, data FROM jobs WHERE job_id = :job_id",
    "get_to_change": "SELECT seq, data FROM jobs WHERE job_id = :job_id",
    "idempotent": "SELECT body_hash, job_id FROM idempotency"
                  " WHERE key_id = :key_id AND key = :key AND expires > :now",
    "remember": "INSERT INTO idempotency (key_id, key, body_hash, job_id, expires)"
                " VALUES (:key_id, :key, :body_hash, :job_id, :expires)"
                " ON CONFLICT (key_id, key) DO UPDATE SET body_hash = excluded.body_hash,"
                " job_id = excluded.job_id, expires = excluded.expires",
    # SQLite binds no lists: the workflows come as one JSON array. Two
    # statements, not one with "OR :any", which would keep SQLite from the
    # jobs_queue index.
    "next_queued": "SELECT job_id FROM jobs WHERE status = 'queued' AND not_before <= :now"
                   " ORDER BY score, seq LIMIT 1",
    "next_queued_in": "SELECT job_id FROM jobs WHERE status = 'queued' AND not_before <= :now"
                      " AND workflow IN (SELECT value FROM json_each(:workflows))"
                      " ORDER BY score, seq LIMIT 1",
    "expired": "SELECT seq, data FROM jobs WHERE status = 'running' AND lease_expires_at <= :now",
    "next_due": "SELECT MIN(not_before) AS t FROM jobs WHERE status = 'queued' AND not_before > :now",
    "counts": "SELECT status, priority, COUNT(*) AS n FROM jobs GROUP BY status, priority",
    "page": "SELECT seq, data FROM jobs WHERE key_id = :key_id AND seq < :before"
            " AND (status = :status OR :status IS NULL) AND (workflow = :workflow OR :workflow IS NULL)"
            " ORDER BY seq DESC LIMIT :limit",
    # NOTE: json_extract fails the whole query on one malformed row; CASE
    # (unlike AND) is sure to ask json_valid first.
    "pending_callbacks": "SELECT job_id, callback_due AS due, CASE WHEN json_valid(data)"
                         " THEN json_extract(data, '$.callback_id') END AS callback_id FROM jobs"
                         " WHERE callback_due IS NOT NULL AND callback_due <= :due_by",
    "unreadable": "SELECT seq FROM jobs WHERE NOT json_valid(data)",
    "unreadable_one": "SELECT job_id FROM jobs WHERE seq = :seq AND NOT json_valid(data)",
    "set_aside": "INSERT INTO jobs_quarantine (seq, job_id, data, reason, quarantined_at)"
                 " SELECT seq, job_id, data, 'corrupt_record', :now FROM jobs WHERE seq = :seq",
    "delete_one": "DELETE FROM jobs WHERE seq = :seq",
    "purge_jobs": "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished_at IS NOT NULL"
                  " AND finished_at <= :cutoff LIMIT :batch)",
    "purge_keys": "DELETE FROM idempotency WHERE (key_id, key) IN (SELECT key_id, key FROM idempotency"
                  " WHERE expires <= :now LIMIT :batch)",
    "count": "SELECT COUNT(*) AS n FROM jobs",
}

# The claim in PostgreSQL is one statement: the row lock is the claim. The
# subquery takes the first ready job in index order (jobs_ready or
# jobs_queue) and skips any row another claimer has locked, so claimers on
# every host never wait on each other and never take the same job.
_PG_CLAIM = (
    "UPDATE jobs SET status = :status,"
    " lease_expires_at = COALESCE(CAST(CAST(:per_workflow AS jsonb) -> workflow ->> 'lease_expires_at'"
    " AS double precision), :lease_expires_at),"
    " data = data || CAST(:changes AS jsonb) || COALESCE(CAST(:per_workflow AS jsonb) -> workflow, '{{}}')"
    " || jsonb_build_object('attempts', CAST(data ->> 'attempts' AS integer) + 1)"
    " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' AND not_before <= :now {only}"
    " ORDER BY score, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING seq, data")
POSTGRES = {
    # The count is a row of its own, taken in the same statement as the
    # insert: the row lock makes concurrent intakes on every host count in
    # turn (a snapshot read of the count, as SQLite's statement has, would
    # let them all see room for one more).
    "insert": "WITH slot AS (UPDATE job_count SET n = n + 1 WHERE id = 1 AND n < :max_jobs RETURNING n)"
              f" INSERT INTO jobs ({', '.join(JOB_COLUMNS)})"
              f" SELECT {', '.join(':' + c for c in JOB_COLUMNS[:-1])}, CAST(:data AS jsonb)"
              " FROM slot RETURNING seq",
    # SQLite's BEGIN IMMEDIATE already holds the database; here a row lock.
    "get_to_change": "SELECT seq, data FROM jobs WHERE job_id = :job_id FOR UPDATE",
    "claim": _PG_CLAIM.format(only=""),
    "claim_in": _PG_CLAIM.format(
        only="AND workflow IN (SELECT jsonb_array_elements_text(CAST(:workflows AS jsonb)))"),
    "pending_callbacks": "SELECT job_id, callback_due AS due, data ->> 'callback_id' AS callback_id"
                         " FROM jobs WHERE callback_due IS NOT NULL AND callback_due <= :due_by",
    # jsonb holds valid JSON only: no row can be unreadable.
    "unreadable": "SELECT seq FROM jobs WHERE FALSE",
}


def _dumps(value):
    # No NaN or Infinity: neither database's JSON takes them.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class SqlJobStore:
    """Jobs in a SQL database (SQLite, or PostgreSQL), shared by every
    process, and every host, that opens it.

    The same interface and rules as MemoryJobStore, made durable: an
    acknowledged intake is committed before it is answered, and every
    change, claims included, is one short transaction, so two processes can
    never both move a job from queued to running. Leases, retries and
    timeouts are timestamps in the table, so any process's sweep finds a
    job whose worker died. Finished jobs past ``ttl`` are purged in small
    batches (``purge``), so no purge holds the database for long.
    """

    PURGE_BATCH = 500

    def __init__(self, db, max_jobs=100_000, ttl=86_400, aging=60.0, clock=time.time):
        self.db = db
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.aging = aging
        self.clock = clock
        self.postgres = db.dialect == "postgres"
        self.sql = SQL | POSTGRES if self.postgres else SQL

    def _columns(self, job):
        ready_at = max(job["not_before"], job["queued_at"])
        return {"job_id": job["job_id"], "status": job["status"], "workflow": job["workflow"],
                "priority": job["priority"], "key_id": job["key_id"],
                "score": ready_at - PRIORITY_HEAD_START[job["priority"]] * self.aging,
                "not_before": job["not_before"], "lease_expires_at": job.get("lease_expires_at"),
                "finished_at": job.get("finished_at"), "callback_due": callback_due(job),
                "data": _dumps(job)}

    @staticmethod
    def _job(row):
        return dict(json.loads(row["data"]), seq=row["seq"])

    def _load(self, conn, job_id):
        row = conn.execute(self.sql["get_to_change"], {"job_id": job_id}).fetchone()
        return None if row is None else self._job(row)

    def _save(self, conn, job):
        conn.execute(self.sql["save"], self._columns(job))

    def add(self, job, idempotency=None):
        now = self.clock()
        job = dict(job, queued_at=job["created_at"])
        params = dict(self._columns(job), max_jobs=self.max_jobs)
        insert = self.sql["insert"]
        if idempotency is None:  # PERF: one statement, its own transaction
            for _ in range(2):  # full: purge what is past its time, then once more
                rows = self.db.write_one(insert, params)
                if rows:
                    job["seq"] = rows[0]["seq"]
                    return job, True
                if not self.purge(now):
                    break
            raise QueueFull("the job store is full")
        key_id, key, body_hash, ttl = idempotency
        for _ in range(2):
            # The lock makes the check and the record one step for this key
            # (SQLite's write transactions are one at a time anyway).
            with self.db.write(lock=f"idempotency:{key_id}:{key}") as conn:
                row = conn.execute(self.sql["idempotent"], {"key_id": key_id, "key": key,
                                                            "now": now}).fetchone()
                existing = row and self._load(conn, row["job_id"])
                if existing:
                    if row["body_hash"] != body_hash:
                        raise IdempotencyMismatch(key)
                    return existing, False
                inserted = conn.execute(insert, params).fetchone()
                if inserted is not None:
                    job["seq"] = inserted["seq"]
                    conn.execute(self.sql["remember"], {"key_id": key_id, "key": key,
                                                        "body_hash": body_hash,
                                                        "job_id": job["job_id"], "expires": now + ttl})
                    return job, True
            if not self.purge(now):
                break
        raise QueueFull("the job store is full")

    def get(self, job_id):
        rows = self.db.query(self.sql["get"], {"job_id": job_id})
        return self._job(rows[0]) if rows else None

    def update(self, job_id, expect=None, **changes):
        with self.db.write() as conn:
            job = self._load(conn, job_id)
            if job is None or any(job.get(k) != v for k, v in (expect or {}).items()):
                return None
            job.update(changes)
            self._save(conn, job)
        return job

    def claim(self, workflows, changes, per_workflow=None):
        if workflows is not None and not workflows:
            return None
        params = {"now": self.clock(), "workflows": _dumps(list(workflows or ()))}
        if self.postgres:
            rows = self.db.write_one(self.sql["claim" if workflows is None else "claim_in"], dict(
                params, status=changes["status"], lease_expires_at=changes.get("lease_expires_at"),
                changes=_dumps(changes), per_workflow=_dumps(per_workflow or {})))
            return self._job(rows[0]) if rows else None
        with self.db.write() as conn:
            row = conn.execute(self.sql["next_queued" if workflows is None else "next_queued_in"],
                               params).fetchone()
            if row is None:
                return None
            job = self._load(conn, row["job_id"])
            job.update(claim_changes(job, changes, per_workflow))
            self._save(conn, job)
        return job

    def expired(self, now):
        return [self._job(r) for r in self.db.query(self.sql["expired"], {"now": now})]

    def next_due(self):
        rows = self.db.query(self.sql["next_due"], {"now": self.clock()})
        return rows[0]["t"]

    def counts(self):
        rows = self.db.query(self.sql["counts"])
        by_status = dict.fromkeys(JOB_STATUSES, 0)
        queued = dict.fromkeys(PRIORITIES, 0)
        for r in rows:
            by_status[r["status"]] += r["n"]
            if r["status"] == "queued":
                queued[r["priority"]] += r["n"]
        return {"by_status": by_status, "queued_by_priority": queued}

    def page(self, key_id, status=None, workflow=None, limit=20, before_seq=None):
        rows = self.db.query(self.sql["page"], {
            "key_id": key_id, "status": status, "workflow": workflow, "limit": limit + 1,
            "before": NO_CURSOR if before_seq is None else before_seq})
        jobs = [self._job(r) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def pending_callbacks(self, due_by=None):
        """(job_id, callback_id, due) of deliveries still to make: all of them
        for a process that starts after another stopped mid-schedule; with
        ``due_by``, those due by then that no sender holds (the periodic scan)."""
        rows = self.db.query(self.sql["pending_callbacks"],
                             {"due_by": float("inf") if due_by is None else due_by})
        return [(r["job_id"], r["callback_id"], r["due"]) for r in rows if r["callback_id"]]

    def quarantine(self):
        """Move every row whose data is not valid JSON to jobs_quarantine;
        the job ids moved. json_valid reads any row without failing."""
        found = self.db.query(self.sql["unreadable"])
        if not found:
            return []
        moved = []
        with self.db.write() as conn:
            for row in found:  # another process may have moved it since
                got = conn.execute(self.sql["unreadable_one"], row).fetchone()
                if got is None:
                    continue
                conn.execute(self.sql["set_aside"], {"now": self.clock(), "seq": row["seq"]})
                conn.execute(self.sql["delete_one"], row)
                moved.append(got["job_id"])
        return moved

    def purge(self, now):
        """Delete one small batch of finished jobs past ``ttl``, and expired
        idempotency keys; returns how many jobs went."""
        cutoff = now - self.ttl
        with self.db.write() as conn:
            gone = conn.execute(self.sql["purge_jobs"], {"cutoff": cutoff,
                                                          "batch": self.PURGE_BATCH}).rowcount
            conn.execute(self.sql["purge_keys"], {"now": now, "batch": self.PURGE_BATCH})
        return gone

    def watch(self, wake):
        """Have ``wake`` called when another process may have queued a job:
        with PostgreSQL, on its notification (pg.Listener); SQLite has none,
        so workers there poll."""
        if self.postgres:
            self.db.listen(wake)

    def __len__(self):
        return self.db.query(self.sql["count"])[0]["n"]
