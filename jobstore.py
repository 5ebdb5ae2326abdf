"""Where jobs live: the job vocabulary (statuses, priorities, limits, the
errors a store raises) and the job stores, in memory and in SQL (SQLite or
PostgreSQL), which keep one contract (``contracts.JobStore``)."""

import collections
import functools
import heapq
import json
import operator
import threading
import time


class QueueFull(Exception):
    """The job store holds as many jobs as it may."""


class IdempotencyMismatch(Exception):
    """An Idempotency-Key already used, within its lifetime, for another body;
    ``index`` is the job's place in a batch (``add_many``)."""

    def __init__(self, key, index=0):
        super().__init__(key)
        self.index = index


# What a workflow may be called: registration, intake and claims all hold
# names to it (no control or direction characters can hide in one).
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
JOB_FINAL = frozenset({"succeeded", "failed", "canceled"})
# scheduled: waits for its run_at; waiting: for the jobs it depends on.
JOB_STATUSES = ("scheduled", "waiting", "queued", "running", "succeeded", "failed", "canceled")
PRIORITIES = ("high", "normal", "low")
# How far ahead of a low job each priority starts, in units of the aging step:
# a waiting job overtakes a fresher one of the next priority up after one step.
PRIORITY_HEAD_START = {"high": 2, "normal": 1, "low": 0}
# A workflow's limits (PUT /api/v1/workflows/<name>/limits), each optional:
# max_concurrency, max_concurrency_per_key, rate {"count": n, "per": seconds}.
LIMIT_NAMES = ("max_concurrency", "max_concurrency_per_key", "rate")
MAX_RATE_WINDOW = 86_400  # seconds: the longest "per" of a rate
# What GET /api/v1/jobs may filter by (JobStore.page): every one optional.
FILTERS = ("status", "workflow", "schedule", "concurrency_key", "created_after", "created_before")


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


def taken(jobs, take, limited):
    """``jobs`` as ``add_many`` stores them with ``take`` (see the contract):
    the one job as a claim with those changes would leave it, unless its
    workflow is ``limited``."""
    if len(jobs) != 1:
        raise ValueError("a job is taken at its intake only alone")
    return jobs if limited else [dict(jobs[0], **claim_changes(jobs[0], take, None))]


def matches(job, filters):
    """Whether ``job`` passes ``filters`` (see FILTERS; status is a list)."""
    f = filters or {}
    return ((not f.get("status") or job["status"] in f["status"])
            and all(f.get(k) is None or job.get(k) == f[k]
                    for k in ("workflow", "schedule", "concurrency_key"))
            and (f.get("created_after") is None or job["created_at"] > f["created_after"])
            and (f.get("created_before") is None or job["created_at"] < f["created_before"]))


class MemoryJobStore:
    """Jobs in a dict behind one lock, in this process only.

    Jobs live in the memory of the process that accepted them: a restart
    loses them, and a second gunicorn worker cannot see them (which is why
    gunicorn.conf.py runs one worker by default). Every access holds the lock
    briefly and hands out copies, so callers can never change a stored job
    by accident. Finished jobs are kept ``ttl`` seconds, then dropped; at
    most ``max_jobs`` are held at once.

    It is also the queue. A queued job waits in a heap per workflow and
    concurrency key, ordered by when it became ready less its priority's
    head start (``aging`` seconds per level), so high goes before normal
    before low, first in first out within a priority, and a job that has
    waited ``aging`` seconds longer than another overtakes it whatever their
    priorities: low never starves. A claim looks only at the heaps whose
    workflow and key the limits let start a job now, so a job held back by
    a limit holds back nobody else. A job waiting out a retry backoff sits in
    a second heap by ``not_before``; a scheduled one, in a third.

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
        self._ready = {}                      # (workflow, key) -> heap of (score, seq, job_id, version)
        self._delayed = []                    # heap of (not_before, seq, job_id, version)
        self._scheduled = []                  # heap of (not_before, seq, job_id): status scheduled
        self._waiting = set()                 # job ids of status waiting
        self._running = set()
        self._running_by = collections.Counter()  # workflow, and (workflow, key) -> n running
        self._starts = {}                     # workflow -> deque of claim times (rate limits)
        self._limits = {}                     # workflow -> limits
        self._finished = collections.deque()  # (finished_at, job_id), oldest first
        self._idempotency = {}                # (key_id, key) -> (body_hash, job ids, expires)
        self._idempotency_order = collections.deque()  # (expires, (key_id, key))
        self._counts = collections.Counter()  # (status, priority, workflow) -> n
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
                self._counts[job["status"], job["priority"], job["workflow"]] -= 1
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
            lane = (job["workflow"], job.get("concurrency_key"))
            heapq.heappush(self._ready.setdefault(lane, []), (score, *entry_tail))

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

    def _running_count(self, job, step):
        self._running_by[job["workflow"]] += step
        if job.get("concurrency_key") is not None:
            self._running_by[job["workflow"], job["concurrency_key"]] += step

    def _set(self, job, changes, now):
        old_status = job["status"]
        job.update(changes)
        new_status = job["status"]
        if new_status != old_status:
            self._counts[old_status, job["priority"], job["workflow"]] -= 1
            self._counts[new_status, job["priority"], job["workflow"]] += 1
            if old_status == "running":
                self._running.discard(job["job_id"])
                self._running_count(job, -1)
            self._waiting.discard(job["job_id"])
            if new_status == "running":
                self._running.add(job["job_id"])
                self._running_count(job, 1)
            elif new_status in JOB_FINAL:
                if job.get("finished_at") is not None:
                    self._finished.append((job["finished_at"], job["job_id"]))
            elif new_status == "waiting":
                self._waiting.add(job["job_id"])
        if new_status in ("scheduled", "waiting") and ("not_before" in changes or new_status != old_status):
            heapq.heappush(self._scheduled, (job["not_before"], job["seq"], job["job_id"]))
        if new_status == "queued" and ("not_before" in changes or old_status != "queued"):
            self._enqueue(job, now)

    def _allows(self, lane, now):
        """Whether the workflow's limits let a job of this lane (workflow,
        concurrency key) start now."""
        workflow, key = lane
        limits = self._limits.get(workflow)
        if not limits:
            return True
        most = limits.get("max_concurrency")
        if most is not None and self._running_by[workflow] >= most:
            return False
        per_key = limits.get("max_concurrency_per_key")
        if per_key is not None and key is not None and self._running_by[workflow, key] >= per_key:
            return False
        rate = limits.get("rate")
        if rate is not None:
            starts = self._starts.get(workflow, ())
            while starts and starts[0] <= now - rate["per"]:
                starts.popleft()  # out of the window: forget it
            if len(starts) >= rate["count"]:
                return False
        return True

    # -- the interface ----------------------------------------------------------

    def add(self, job, idempotency=None):
        return self.add_many([job], [idempotency])[0]

    @property
    def carries_also(self):
        """No database of its own: ``also`` is not written here."""
        return False

    def add_many(self, jobs, idempotency=None, batch_key=None, also=None, take=None):
        """Store new jobs, all or none; [(job, created)] in their order.

        ``idempotency`` holds, for each job, None or (key_id, key,
        body_hash, ttl): if that key was used within ttl for the same body,
        the job it made is returned instead (created False); for another
        body, IdempotencyMismatch. ``batch_key`` is such a key for the
        whole batch: the jobs it made, all of them, are returned instead.
        Checked and recorded under the one lock, so concurrent duplicates
        make one job (or one batch). ``take``: the contract's.
        """
        with self._lock:
            now = self.clock()
            self._purge(now)
            if take is not None:
                jobs = taken(jobs, take, self._limits.get(jobs[0]["workflow"]))
            if batch_key is not None:
                made = self._remembered(batch_key, None, now)
                if made is not None:
                    return [(dict(job), False) for job in made]
                if len(self._jobs) + len(jobs) > self.max_jobs:
                    raise QueueFull("the job store is full")
                added = [(self._store(job, None, now), True) for job in jobs]
                self._remember(batch_key, [job["job_id"] for job, _ in added], now)
                return added
            keys = idempotency or [None] * len(jobs)
            found = [self._remembered(key, i, now) for i, key in enumerate(keys)]
            if len(self._jobs) + found.count(None) > self.max_jobs:
                raise QueueFull("the job store is full")
            return [(dict(existing[0]), False) if existing else (self._store(job, key, now), True)
                    for job, key, existing in zip(jobs, keys, found)]

    def replayed(self, idempotency=None, batch_key=None):
        """What ``add_many`` would answer, if every job would be a replay; else None."""
        with self._lock:
            now = self.clock()
            if batch_key is not None:
                made = self._remembered(batch_key, None, now)
                return made and [dict(job) for job in made]
            found = [self._remembered(key, i, now) for i, key in enumerate(idempotency or [])]
            return [dict(made[0]) for made in found] if found and all(found) else None

    def _remembered(self, key, index, now):
        """The jobs an idempotency key made, if it is still held (all of them)."""
        entry = key and self._idempotency.get(key[:2])
        if not entry or entry[2] <= now or not all(job_id in self._jobs for job_id in entry[1]):
            return None
        if entry[0] != key[2]:
            raise IdempotencyMismatch(key[1], index)
        return [self._jobs[job_id] for job_id in entry[1]]

    def _remember(self, key, job_ids, now):
        key_id, name, body_hash, ttl = key
        self._idempotency[key_id, name] = (body_hash, tuple(job_ids), now + ttl)
        self._idempotency_order.append((now + ttl, (key_id, name)))

    def _store(self, job, key, now):
        self._seq += 1
        stored = dict(job, seq=self._seq, queued_at=job["created_at"], status=None)
        self._jobs[stored["job_id"]] = stored
        self._counts[None, stored["priority"], stored["workflow"]] += 1
        self._set(stored, {"status": job["status"]}, now)
        if key is not None:
            self._remember(key, [stored["job_id"]], now)
        return dict(stored)

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job is not None else None

    def get_many(self, job_ids):
        with self._lock:
            return [None if job is None else dict(job) for job in map(self._jobs.get, job_ids)]

    def update(self, job_id, expect=None, known=None, **changes):
        """Apply changes if the job has the ``expect``ed values; the new copy, or None."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or any(job.get(k) != v for k, v in (expect or {}).items()):
                return None
            self._set(job, changes, self.clock())
            return dict(job)

    def update_many(self, updates):
        return [self.update(job_id, expect, known, **changes)
                for job_id, expect, known, changes in updates]

    def claim(self, workflows, changes, per_workflow=None):
        """Take the best ready job among ``workflows`` (None: any) that its
        workflow's limits let start, and make it running with ``changes``
        (see ``contracts.JobStore.claim``); the new copy, or None."""
        found = self.claim_many(workflows, changes, per_workflow, [changes["lease_token"]])
        return found[0] if found else None

    def claim_many(self, workflows, changes, per_workflow, tokens, also=None):
        """Claim as ``claim`` does, once per token while jobs are ready; the
        copies. ``also``: no transaction here to put it in."""
        found = []
        with self._lock:
            now = self.clock()
            self._promote(now)
            wanted = None if workflows is None else set(workflows)
            for token in tokens:
                job = self._best(wanted, now)
                if job is None:
                    break
                if (self._limits.get(job["workflow"]) or {}).get("rate"):
                    self._starts.setdefault(job["workflow"], collections.deque()).append(now)
                self._set(job, dict(claim_changes(job, changes, per_workflow), lease_token=token), now)
                found.append(dict(job))
        return found

    def _best(self, wanted, now):
        """Take the best ready job of the ``wanted`` workflows that may start now."""
        best = None
        for lane, heap in list(self._ready.items()):
            if wanted is not None and lane[0] not in wanted:
                continue
            while heap and self._live(heap[0]) is None:
                heapq.heappop(heap)  # canceled, or queued again since
            if not heap:
                del self._ready[lane]
            elif (best is None or heap[0] < best[0]) and self._allows(lane, now):
                best = (heap[0], heap)
        return None if best is None else self._jobs[heapq.heappop(best[1])[2]]

    def expired(self, now):
        """Running jobs whose lease (or timeout) ran out by ``now``."""
        with self._lock:
            jobs = (self._jobs[i] for i in self._running)
            return [dict(j) for j in jobs if j["lease_expires_at"] is not None
                    and j["lease_expires_at"] <= now]

    def due(self, now):
        """Scheduled jobs whose ``not_before`` has come."""
        found = []
        with self._lock:
            heap = self._scheduled
            while heap and heap[0][0] <= now:
                _, _, job_id = heapq.heappop(heap)
                job = self._jobs.get(job_id)
                if job is not None and job["status"] in ("scheduled", "waiting"):
                    if job["not_before"] > now:  # its time was moved on
                        heapq.heappush(heap, (job["not_before"], job["seq"], job_id))
                        continue
                    found.append(dict(job))
        return found

    def waiting(self, limit=500, event=None):
        with self._lock:
            found = [self._jobs[i] for i in self._waiting
                     if (self._jobs[i].get("waiting_for") or {}).get("event") == event
                     and (event is not None or not self._jobs[i].get("waiting_for"))]
            return [dict(j) for j in sorted(found, key=lambda j: j["seq"])[:limit]]

    def next_due(self):
        """When the next delayed job becomes ready, or None."""
        with self._lock:
            self._promote(self.clock())  # what is due is ready, not delayed
            delayed = self._delayed
            while delayed and self._live(delayed[0]) is None:
                heapq.heappop(delayed)  # canceled, or queued again since
            return delayed[0][0] if delayed else None

    def counts(self):
        """Jobs held by status, queued jobs by priority, and by workflow and status."""
        with self._lock:
            by_status = dict.fromkeys(JOB_STATUSES, 0)
            queued = dict.fromkeys(PRIORITIES, 0)
            by_workflow = {}
            for (status, priority, workflow), n in self._counts.items():
                if n and status is not None:
                    by_status[status] += n
                    by_workflow.setdefault(workflow, dict.fromkeys(JOB_STATUSES, 0))[status] += n
                    if status == "queued":
                        queued[priority] += n
        return {"by_status": by_status, "queued_by_priority": queued, "by_workflow": by_workflow}

    def page(self, key_id, filters=None, limit=20, before_seq=None):
        """Up to ``limit`` jobs made with ``key_id`` that pass ``filters``,
        newest first, older than ``before_seq``; and whether more follow."""
        found = []
        with self._lock:
            for job in reversed(self._jobs.values()):
                if before_seq is not None and job["seq"] >= before_seq:
                    continue
                if job["key_id"] != key_id or not matches(job, filters):
                    continue
                if len(found) == limit:
                    return found, True
                found.append(dict(job))
        return found, False

    def set_limits(self, workflow, limits):
        with self._lock:
            if limits:
                self._limits[workflow] = dict(limits)
            else:
                self._limits.pop(workflow, None)
            self._starts.pop(workflow, None)

    def limits(self):
        with self._lock:
            return {w: dict(v) for w, v in self._limits.items()}

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

    def announce(self, workflow, ended=False):
        """No other process to tell."""

    def __len__(self):
        with self._lock:
            return len(self._jobs)


# The columns beside each job's JSON, which the queue, the sweeps, the
# limits and the listings search by; and every statement of the SQL job
# store, named.
JOB_COLUMNS = ("job_id", "status", "workflow", "priority", "key_id", "score", "not_before",
               "lease_expires_at", "finished_at", "callback_due", "concurrency_key", "schedule",
               "created_at", "data")
NO_CURSOR = 2**62  # "before" for a first page: every seq is below it
# A list of values is bound as one JSON array, and read as a subquery: the
# one piece of SQL each dialect spells its own way ({name} in a statement).
IN_LIST = {"sqlite": "(SELECT value FROM json_each(:{0}))",
           "postgres": "(SELECT jsonb_array_elements_text(CAST(:{0} AS jsonb)))"}


@functools.lru_cache(maxsize=64)
def _swap_sql(columns):
    """A compare-and-set on the whole record, setting ``columns`` and the
    data: it applies only if the row still holds what was read (SQLite:
    see SqlJobStore._swap). One statement per set of columns a change
    touches: a claim's, a finish's, a progress report's."""
    return ("UPDATE jobs SET " + ", ".join(f"{c} = :{c}" for c in (*columns, "data"))
            + " WHERE job_id = :job_id AND data = :old RETURNING seq")


@functools.lru_cache(maxsize=16)
def _sqlite_claim_sql(only, keys):
    """SQLite, no limits: a claim in one statement, as _PG_CLAIM is for
    PostgreSQL. The first ready job is made running in its columns and in
    its data: ``keys`` of the changes (each bound as its JSON text,
    :c_<key>, so that a number keeps every digit), its workflow's entry of
    :per_workflow, one more attempt; and its seq, as the job's own copy has
    it. The write lock is held for this one statement, and no claimer loses
    a race to another."""
    entry = "(SELECT value FROM json_each(:per_workflow) WHERE key = jobs.workflow)"
    data = "json_set(data, '$.seq', seq, " + ", ".join(f"'$.{k}', json(:c_{k})" for k in keys) + ")"
    data = f"json_patch({data}, COALESCE({entry}, '{{}}'))"
    data = f"json_set({data}, '$.attempts', json_extract(data, '$.attempts') + 1)"
    pick = _pick(only).format(workflows=IN_LIST["sqlite"].format("workflows"))
    return (f"UPDATE jobs SET status = :status, lease_expires_at = COALESCE("
            f"json_extract({entry}, '$.lease_expires_at'), :lease_expires_at), data = {data}"
            f" WHERE seq = (SELECT seq FROM jobs WHERE {pick} ORDER BY score, seq LIMIT 1) RETURNING seq, data")


def _pick(only=False, limited=False):
    """Which queued jobs a claim may take: ready, of the workflows asked for
    (``only``), and not held back by a limit (``limited``): the workflows
    that may start nothing now, and the "workflow|key" pairs at their
    per-key limit. (A workflow name holds no "|".)"""
    where = "status = 'queued' AND not_before <= :now"
    if only:
        where += " AND workflow IN {workflows}"
    if limited:
        where += (" AND workflow NOT IN {blocked}"
                  " AND (workflow || '|' || COALESCE(concurrency_key, '')) NOT IN {pairs}")
    return where


# Written for SQLite; POSTGRES below replaces the few that PostgreSQL must
# have otherwise. NOTE: in "x = :p OR :p IS NULL" the comparison comes
# first, so that PostgreSQL learns the parameter's type from it.
SQL = {
    # The limit is checked by the insert itself, against the count that
    # triggers keep in the same transaction: exact across processes.
    "insert": f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)})"
              f" SELECT {', '.join(':' + c for c in JOB_COLUMNS)}"
              " WHERE (SELECT n FROM job_count) < :max_jobs RETURNING seq, job_id",
    "save": "UPDATE jobs SET " + ", ".join(f"{c} = :{c}" for c in JOB_COLUMNS[1:])
            + " WHERE job_id = :job_id",
    "get": "SELECT seq, data FROM jobs WHERE job_id = :job_id",
    "get_many": "SELECT seq, data FROM jobs WHERE job_id IN {job_ids}",
    "get_to_change": "SELECT seq, data FROM jobs WHERE job_id = :job_id",
    "idempotent": "SELECT key, body_hash, job_id, job_ids FROM idempotency WHERE key_id = :key_id"
                  " AND key IN (SELECT value FROM json_each(:keys)) AND expires > :now",
    # A batch's jobs, without RETURNING (executemany keeps no rows). Their
    # seq is counted back from the last: AUTOINCREMENT gives each row one
    # more than the largest ever given, and this write transaction is the
    # only writer, so a batch's seqs run without a gap (reading them back
    # by job_id cost 1.7-2.8 us a job). The limit is checked once before
    # them, in the same transaction ("held"), not by each row.
    "held": "SELECT n FROM job_count",
    # PERF: bound by position (_row), not by name, which sqlite3 looks up in
    # a dict per parameter and row: about 4 us a job less. (SQLite only.)
    "insert_each": f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)})"
                   f" VALUES ({', '.join('?' for _ in JOB_COLUMNS)})",
    "last_seq": "SELECT last_insert_rowid() AS seq",
    "remember": "INSERT INTO idempotency (key_id, key, body_hash, job_id, job_ids, expires)"
                " VALUES (:key_id, :key, :body_hash, :job_id, :job_ids, :expires)"
                " ON CONFLICT (key_id, key) DO UPDATE SET body_hash = excluded.body_hash,"
                " job_id = excluded.job_id, job_ids = excluded.job_ids, expires = excluded.expires",
    # Whether a claim would find anything (SQLite reads before it writes).
    **{f"any_queued{'_in' * only}": f"SELECT 1 AS found FROM jobs WHERE {_pick(only)} LIMIT 1"
       for only in (False, True)},
    # Four spellings of one pick, not one with "OR :any", which would keep
    # the planner from the queue's indexes.
    **{f"next_queued{'_in' * only}{'_limited' * limited}":
       f"SELECT seq, job_id, data FROM jobs WHERE {_pick(only, limited)} ORDER BY score, seq LIMIT :n"
       for only in (False, True) for limited in (False, True)},
    # What the limited workflows have running (by key), and which of them
    # have a full rate window (started 1): the oldest of their last
    # rate_count starts is still in it. One statement for a claim to read.
    "held_back": "SELECT workflow, concurrency_key, COUNT(*) AS n, 0 AS started FROM jobs"
                 " WHERE status = 'running' AND workflow IN {limited} GROUP BY workflow, concurrency_key"
                 " UNION ALL SELECT l.workflow, NULL, 1, 1 FROM workflow_limits AS l"
                 " JOIN workflow_starts AS s ON s.workflow = l.workflow AND s.slot = l.next_slot"
                 " WHERE l.workflow IN {limited} AND s.started > :now - l.rate_per",
    # A start takes the ring's next slot (the oldest) and moves it on.
    "next_slot": "UPDATE workflow_limits SET next_slot = (next_slot + 1) % rate_count"
                 " WHERE workflow = :workflow RETURNING (next_slot + rate_count - 1) % rate_count AS slot",
    "start": "INSERT INTO workflow_starts (workflow, slot, started) VALUES (:workflow, :slot, :now)"
             " ON CONFLICT (workflow, slot) DO UPDATE SET started = excluded.started",
    "limits": "SELECT workflow, limits FROM workflow_limits",
    # A new rate starts with an empty ring.
    "set_limits": "INSERT INTO workflow_limits (workflow, limits, rate_count, rate_per, next_slot)"
                  " VALUES (:workflow, :limits, :rate_count, :rate_per, 0) ON CONFLICT (workflow)"
                  " DO UPDATE SET limits = excluded.limits, rate_count = excluded.rate_count,"
                  " rate_per = excluded.rate_per, next_slot = 0",
    "forget_starts": "DELETE FROM workflow_starts WHERE workflow = :workflow",
    "clear_limits": "DELETE FROM workflow_limits WHERE workflow = :workflow",
    "expired": "SELECT seq, data FROM jobs WHERE status = 'running' AND lease_expires_at <= :now",
    "due": "SELECT seq, data FROM jobs WHERE status = 'scheduled' AND not_before <= :now"
           " UNION ALL SELECT seq, data FROM jobs WHERE status = 'waiting' AND not_before <= :now"
           " LIMIT 500",
    # NOTE: ->> (PostgreSQL) and json_extract (SQLite) read JSON null as NULL.
    "waiting": "SELECT seq, data FROM jobs WHERE status = 'waiting' AND"
               " (CASE WHEN json_valid(data) THEN json_extract(data, '$.waiting_for') END) IS NULL"
               " ORDER BY seq LIMIT :limit",
    "waiting_event": "SELECT seq, data FROM jobs WHERE status = 'waiting' AND"
                     " (CASE WHEN json_valid(data) THEN json_extract(data, '$.waiting_for.event') END)"
                     " = :event ORDER BY seq LIMIT :limit",
    "next_due": "SELECT MIN(not_before) AS t FROM jobs WHERE status = 'queued' AND not_before > :now",
    "counts": "SELECT status, priority, workflow, COUNT(*) AS n FROM jobs"
              " GROUP BY status, priority, workflow",
    "page": "SELECT seq, data FROM jobs WHERE key_id = :key_id AND seq < :before"
            " AND (status IN {statuses} OR :any_status = 1)"
            " AND (workflow = :workflow OR :workflow IS NULL)"
            " AND (schedule = :schedule OR :schedule IS NULL)"
            " AND (concurrency_key = :concurrency_key OR :concurrency_key IS NULL)"
            " AND (created_at > :created_after OR :created_after IS NULL)"
            " AND (created_at < :created_before OR :created_before IS NULL)"
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
    " data = data || CAST(:changes AS jsonb) || COALESCE(CAST(:per_workflow AS jsonb) -> workflow, jsonb_build_object())"
    " || jsonb_build_object('attempts', CAST(data ->> 'attempts' AS integer) + 1)"
    " WHERE seq = (SELECT seq FROM jobs WHERE {pick}"
    " ORDER BY score, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING seq, data")
# What the limits hold back, counted by the database (see "held_back" for
# SQLite, which counts in the claimer): the workflows that may start
# nothing now (at max_concurrency, or the oldest start of its rate ring
# still in the window), and the "workflow|key" pairs at max_concurrency_per_key.
_PG_BLOCKED = (
    "(SELECT l.workflow FROM workflow_limits AS l WHERE"
    " CAST(CAST(l.limits AS jsonb) ->> 'max_concurrency' AS integer) <= (SELECT count(*) FROM jobs AS r"
    " WHERE r.status = 'running' AND r.workflow = l.workflow)"
    " OR EXISTS (SELECT 1 FROM workflow_starts AS s WHERE s.workflow = l.workflow"
    " AND s.slot = l.next_slot AND s.started > :now - l.rate_per))")
_PG_PAIRS = (
    "(SELECT r.workflow || '|' || r.concurrency_key FROM jobs AS r JOIN workflow_limits AS l"
    " ON l.workflow = r.workflow WHERE r.status = 'running' AND r.concurrency_key IS NOT NULL"
    " GROUP BY r.workflow, r.concurrency_key, l.limits"
    " HAVING count(*) >= CAST(CAST(l.limits AS jsonb) ->> 'max_concurrency_per_key' AS integer))")
# Several at once: the rows locked in the queue's order are numbered, and
# the i-th takes the i-th of the tokens (a JSON array).
_PG_CLAIM_MANY = (
    "WITH locked AS (SELECT seq, score FROM jobs WHERE {pick} ORDER BY score, seq LIMIT :n"
    " FOR UPDATE SKIP LOCKED), picked AS (SELECT seq, row_number() OVER (ORDER BY score, seq) AS i"
    " FROM locked) UPDATE jobs SET status = :status,"
    " lease_expires_at = COALESCE(CAST(CAST(:per_workflow AS jsonb) -> workflow ->> 'lease_expires_at'"
    " AS double precision), :lease_expires_at),"
    " data = data || CAST(:changes AS jsonb)"
    " || COALESCE(CAST(:per_workflow AS jsonb) -> workflow, jsonb_build_object())"
    " || jsonb_build_object('attempts', CAST(data ->> 'attempts' AS integer) + 1,"
    " 'lease_token', CAST(:tokens AS jsonb) ->> CAST(picked.i - 1 AS integer))"
    " FROM picked WHERE jobs.seq = picked.seq RETURNING jobs.seq, jobs.data, picked.i")
POSTGRES = {
    # The count is a row of its own, taken in the same statement as the
    # insert: the row lock makes concurrent intakes on every host count in
    # turn (a snapshot read of the count, as SQLite's statement has, would
    # let them all see room for one more).
    "insert": "WITH slot AS (UPDATE job_count SET n = n + 1 WHERE id = 1 AND n < :max_jobs RETURNING n)"
              f" INSERT INTO jobs ({', '.join(JOB_COLUMNS)})"
              f" SELECT {', '.join(':' + c for c in JOB_COLUMNS[:-1])}, CAST(:data AS jsonb)"
              " FROM slot RETURNING seq, job_id",
    # A batch: the slots for all, then every row from one JSON array.
    "idempotent": "SELECT key, body_hash, job_id, job_ids FROM idempotency WHERE key_id = :key_id"
                  " AND key IN (SELECT jsonb_array_elements_text(CAST(:keys AS jsonb))) AND expires > :now",
    "insert_many": "WITH slot AS (UPDATE job_count SET n = n + :count WHERE id = 1"
                   " AND n + :count <= :max_jobs RETURNING n)"
                   f" INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) SELECT {', '.join(JOB_COLUMNS)}"
                   " FROM slot, jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(job_id text, status text,"
                   " workflow text, priority text, key_id text, score double precision,"
                   " not_before double precision, lease_expires_at double precision,"
                   " finished_at double precision, callback_due double precision,"
                   " concurrency_key text, schedule text, created_at double precision, data jsonb)"
                   " RETURNING seq, job_id",
    # SQLite's BEGIN IMMEDIATE already holds the database; here a row lock.
    "get_to_change": "SELECT seq, data FROM jobs WHERE job_id = :job_id FOR UPDATE",
    **{f"claim{'_in' * only}": _PG_CLAIM.replace("{pick}", _pick(only)) for only in (False, True)},
    **{f"claim_many{'_in' * only}": _PG_CLAIM_MANY.replace("{pick}", _pick(only)) for only in (False, True)},
    # A limited claim counts what the limits hold back in the statement
    # itself (the statement before it took the limits lock, so its snapshot
    # sees every claim committed before), and notes its start in the
    # workflow's rate ring (a workflow without a rate has no rate_count: no row).
    **{f"claim{'_in' * only}_limited": "WITH claimed AS (" + _PG_CLAIM.replace("{pick}", _pick(only, True))
       .replace("{blocked}", _PG_BLOCKED).replace("{pairs}", _PG_PAIRS)
       + ", workflow), taken AS (UPDATE workflow_limits SET next_slot = (next_slot + 1) % rate_count"
       " WHERE workflow = (SELECT workflow FROM claimed) AND rate_count IS NOT NULL"
       " RETURNING workflow, (next_slot + rate_count - 1) % rate_count AS slot),"
       " noted AS (INSERT INTO workflow_starts (workflow, slot, started) SELECT workflow, slot, :now"
       " FROM taken ON CONFLICT (workflow, slot) DO UPDATE SET started = excluded.started)"
       " SELECT seq, data FROM claimed"
       for only in (False, True)},
    "pending_callbacks": "SELECT job_id, callback_due AS due, data ->> 'callback_id' AS callback_id"
                         " FROM jobs WHERE callback_due IS NOT NULL AND callback_due <= :due_by",
    "waiting": "SELECT seq, data FROM jobs WHERE status = 'waiting'"
               " AND data ->> 'waiting_for' IS NULL ORDER BY seq LIMIT :limit",
    "waiting_event": "SELECT seq, data FROM jobs WHERE status = 'waiting'"
                     " AND data -> 'waiting_for' ->> 'event' = :event ORDER BY seq LIMIT :limit",
    # jsonb holds valid JSON only: no row can be unreadable.
    "unreadable": "SELECT seq FROM jobs WHERE FALSE",
}


def statements(dialect):
    """Every statement of the job store in ``dialect``, lists spelt its way."""
    lists = {name: IN_LIST[dialect].format(name)
             for name in ("workflows", "blocked", "pairs", "limited", "statuses", "job_ids")}
    chosen = SQL | POSTGRES if dialect == "postgres" else SQL
    return {name: sql.format(**lists) for name, sql in chosen.items()}


# No NaN or Infinity: neither database's JSON takes them. PERF: one
# encoder, built once (json.dumps with arguments builds one per call, and a
# claim and a finish encode a dozen values).
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_row = operator.itemgetter(*JOB_COLUMNS)  # a job's columns, in order


def _caller(keys, batch_key):
    """The key_id of the caller whose idempotency keys these are, or None."""
    return batch_key[0] if batch_key else next((key[0] for key in keys if key), None)


def _memo(key, job_id, job_ids, now):
    """The idempotency row of ``key``: the job it made, or (a batch's key)
    the first of them and all their ids in order."""
    return {"key_id": key[0], "key": key[1], "body_hash": key[2], "job_id": job_id,
            "job_ids": None if job_ids is None else _dumps(job_ids), "expires": now + key[3]}


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

    Workflow limits are a table beside the jobs; which workflows have any
    is read at most once a second per process (a new limit applies
    everywhere within a second). A rate is checked in one row: the start
    ``count`` starts ago, kept in a ring of ``count`` slots, must have left
    the window. A claim that may take a limited workflow's job counts what
    runs and what started in the same transaction as it takes the job,
    under one lock for all such claims ("limits": SQLite's write
    transactions are one at a time anyway; PostgreSQL takes an advisory
    lock, and counts in the claim statement itself), so limits hold
    exactly across processes and hosts; claims of unlimited workflows take
    no lock.

    SQLite changes a job by compare-and-set on its whole record, outside
    any transaction (``_swap``): a claim or update is one read and one
    single-statement write, and a claimer that lost a race tries the next
    ready job, as PostgreSQL's SKIP LOCKED does.
    """

    PURGE_BATCH = 500
    LIMITS_FOR = 1.0  # seconds a process keeps the limits it read

    def __init__(self, db, max_jobs=100_000, ttl=86_400, aging=60.0, clock=time.time):
        self.db = db
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.aging = aging
        self.clock = clock
        self.postgres = db.dialect == "postgres"
        self.sql = statements(db.dialect)
        self._limits = (float("-inf"), {})  # (monotonic time read, limits)

    def _columns(self, job, data=True):
        ready_at = max(job["not_before"], job["queued_at"])
        return {"job_id": job["job_id"], "status": job["status"], "workflow": job["workflow"],
                "priority": job["priority"], "key_id": job["key_id"],
                "score": ready_at - PRIORITY_HEAD_START[job["priority"]] * self.aging,
                "not_before": job["not_before"], "lease_expires_at": job.get("lease_expires_at"),
                "finished_at": job.get("finished_at"), "callback_due": callback_due(job),
                "concurrency_key": job.get("concurrency_key"), "schedule": job.get("schedule"),
                "created_at": job["created_at"], "data": _dumps(job) if data else None}

    @staticmethod
    def _job(row):
        return dict(json.loads(row["data"]), seq=row["seq"])

    def _load(self, conn, job_id):
        row = conn.execute(self.sql["get_to_change"], {"job_id": job_id}).fetchone()
        return None if row is None else self._job(row)

    def _save(self, conn, job):
        conn.execute(self.sql["save"], self._columns(job))

    def add(self, job, idempotency=None):
        return self.add_many([job], [idempotency])[0]

    @property
    def carries_also(self):
        """SQLite: ``also`` goes in the jobs' own transaction (one commit, not
        two). PERF: not on PostgreSQL, where a job's insert takes the one
        job_count row: a transaction that also wrote the audit rows held that
        row across two round trips, and concurrent intakes queued behind it
        (wrk -c8 on 2 workers: 689 -> 569 intakes/s). There the recorder's
        group commit writes them, many requests' rows in one transaction."""
        return not self.postgres

    def add_many(self, jobs, idempotency=None, batch_key=None, also=None, take=None):
        also = also if self.carries_also else None
        now = self.clock()
        jobs = [dict(job, queued_at=job["created_at"]) for job in jobs]
        if take is not None:
            jobs = taken(jobs, take, self._limited([jobs[0]["workflow"]]))
        keys = idempotency or [None] * len(jobs)
        for attempt in range(2):  # full: purge what is past its time, then once more
            try:
                return self._add(jobs, keys, now, batch_key, also)
            except QueueFull:
                if attempt or not self.purge(now):
                    raise
        raise AssertionError("unreachable")

    def _add(self, jobs, keys, now, batch_key, also):
        if len(jobs) == 1 and keys[0] is None and batch_key is None and also is None:  # PERF: one statement
            rows = self.db.write_one(self.sql["insert"], dict(self._columns(jobs[0]),
                                                              max_jobs=self.max_jobs))
            if not rows:
                raise QueueFull("the job store is full")
            jobs[0]["seq"] = rows[0]["seq"]
            return [(jobs[0], True)]
        # The lock makes the checks and the records of a caller's keys one
        # step (SQLite's write transactions are one at a time anyway).
        key_id = _caller(keys, batch_key)
        with self.db.write(lock=key_id and f"idempotency:{key_id}") as conn:
            made = None if batch_key is None else self._remembered_batch(conn, batch_key, now)
            if made is not None:
                answer = [(job, False) for job in made]
            else:
                if batch_key is not None:
                    found = [None] * len(jobs)
                    memos = [_memo(batch_key, jobs[0]["job_id"], [job["job_id"] for job in jobs], now)]
                else:
                    found = self._remembered(conn, keys, now)
                    memos = [_memo(key, job["job_id"], None, now)
                             for job, key, existing in zip(jobs, keys, found) if key and not existing]
                self._insert(conn, [job for job, existing in zip(jobs, found) if not existing])
                conn.executemany(self.sql["remember"], memos)
                answer = [(existing, False) if existing else (job, True)
                          for job, existing in zip(jobs, found)]
            for sql, rows in also(answer) if also is not None else ():
                conn.executemany(sql, rows)
        return answer

    def replayed(self, idempotency=None, batch_key=None):
        keys = idempotency or []
        key_id = _caller(keys, batch_key)
        if key_id is None:
            return None
        now = self.clock()
        with self.db.write(lock=f"idempotency:{key_id}") as conn:  # rare: a replay past a budget
            if batch_key is not None:
                return self._remembered_batch(conn, batch_key, now)
            found = self._remembered(conn, keys, now)
        return found if all(found) else None

    def _remembered_batch(self, conn, key, now):
        """The jobs a batch's ``key`` made, in order, if it is still held
        and all of them are; IdempotencyMismatch (no index) for another body."""
        row = conn.execute(self.sql["idempotent"], {"key_id": key[0], "keys": _dumps([key[1]]),
                                                    "now": now}).fetchone()
        if row is None:
            return None
        job_ids = json.loads(row["job_ids"]) if row["job_ids"] else [row["job_id"]]
        rows = conn.execute(self.sql["get_many"], {"job_ids": _dumps(job_ids)}).fetchall()
        held = {job["job_id"]: job for job in map(self._job, rows)}
        if len(held) != len(job_ids):  # some have gone: the key is free again
            return None
        if row["body_hash"] != key[2]:
            raise IdempotencyMismatch(key[1], None)
        return [held[job_id] for job_id in job_ids]

    def _remembered(self, conn, keys, now):
        """For each of one caller's ``keys`` (or None), the job it made if
        it is still held, else None; IdempotencyMismatch names the first
        used with another body. PERF: one query for them all."""
        given = [key for key in keys if key]
        if not given:
            return [None] * len(keys)
        rows = {row["key"]: row for row in conn.execute(self.sql["idempotent"], {
            "key_id": given[0][0], "keys": _dumps([key[1] for key in given]), "now": now})}
        found = []
        for index, key in enumerate(keys):
            row = key and rows.get(key[1])
            existing = row and self._load(conn, row["job_id"])
            if existing and row["body_hash"] != key[2]:
                raise IdempotencyMismatch(key[1], index)
            found.append(existing or None)
        return found

    def _insert(self, conn, jobs):
        """Insert ``jobs``, setting their ``seq``: QueueFull if they do not all fit."""
        if not jobs:
            return
        if len(jobs) == 1:
            rows = conn.execute(self.sql["insert"], dict(self._columns(jobs[0]), max_jobs=self.max_jobs)
                                ).fetchall()
        elif self.postgres:  # PERF: one statement for the lot
            rows = conn.execute(self.sql["insert_many"], {
                "count": len(jobs), "max_jobs": self.max_jobs,
                "rows": _dumps([dict(self._columns(job, data=False), data=job) for job in jobs])
            }).fetchall()
        else:  # PERF: one call; executemany keeps no RETURNING rows (see "last_seq")
            if conn.execute(self.sql["held"]).fetchone()["n"] + len(jobs) > self.max_jobs:
                raise QueueFull("the job store is full")
            conn.executemany(self.sql["insert_each"], [_row(self._columns(job)) for job in jobs])
            last = conn.execute(self.sql["last_seq"]).fetchone()["seq"]
            for seq, job in enumerate(jobs, last - len(jobs) + 1):
                job["seq"] = seq
            return
        if len(rows) != len(jobs):
            raise QueueFull("the job store is full")
        seqs = {row["job_id"]: row["seq"] for row in rows}
        for job in jobs:
            job["seq"] = seqs[job["job_id"]]

    def get(self, job_id):
        rows = self.db.query(self.sql["get"], {"job_id": job_id})
        return self._job(rows[0]) if rows else None

    def get_many(self, job_ids):
        rows = self.db.query(self.sql["get_many"], {"job_ids": _dumps(list(job_ids))}) if job_ids else []
        found = {job["job_id"]: job for job in map(self._job, rows)}
        return [found.get(job_id) for job_id in job_ids]

    def update(self, job_id, expect=None, known=None, **changes):
        if not self.postgres:
            if known is not None and all(known.get(k) == v for k, v in (expect or {}).items()):
                # PERF: swapped over the caller's copy unread; if that is not
                # what is stored any more, the swap fails and we read below.
                changed = dict(known, **changes)
                if self._swap({"data": _dumps(known)}, known, changed):
                    return changed
            for _ in range(self.SWAP_TRIES):
                rows = self.db.query(self.sql["get"], {"job_id": job_id})
                job = rows and self._job(rows[0])
                if not job or any(job.get(k) != v for k, v in (expect or {}).items()):
                    return None
                changed = dict(job, **changes)
                if self._swap(rows[0], job, changed):
                    return changed
        with self.db.write() as conn:  # PostgreSQL; or SQLite after lost races
            job = self._load(conn, job_id)
            if job is None or any(job.get(k) != v for k, v in (expect or {}).items()):
                return None
            job.update(changes)
            self._save(conn, job)
        return job

    SWAP_TRIES = 8  # lost races before a change waits its turn in a transaction

    def update_many(self, updates):
        """PERF: one transaction. On SQLite each is swapped over its
        ``known`` copy, or read and written when that is not what is
        stored; on PostgreSQL each row is locked, read and written."""
        done = []
        with self.db.write() as conn:
            for job_id, expect, known, changes in updates:
                expect = expect or {}
                if not self.postgres and known is not None \
                        and all(known.get(k) == v for k, v in expect.items()):
                    changed = dict(known, **changes)
                    if self._swap({"data": _dumps(known)}, known, changed, conn):
                        done.append(changed)
                        continue
                job = self._load(conn, job_id)
                if job is None or any(job.get(k) != v for k, v in expect.items()):
                    done.append(None)
                    continue
                job.update(changes)
                self._save(conn, job)
                done.append(job)
        return done

    def _swap(self, row, old, new, conn=None):
        """SQLite: write ``new`` over ``row`` (as read, outside any
        transaction, holding ``old``) if the row is unchanged since; in
        ``conn``'s transaction if given, else in one of its own. PERF: the
        write lock is held for one statement, not a read and a write (a
        loser reads again), and it sets only the columns that change (and
        so touches only their indexes)."""
        before, after = self._columns(old, data=False), self._columns(new)
        changed = tuple(c for c in JOB_COLUMNS[1:-1] if after[c] != before[c])
        sql, params = _swap_sql(changed), dict(after, old=row["data"])
        return bool(conn.execute(sql, params).fetchall() if conn else self.db.write_one(sql, params))

    # -- claims and limits ---------------------------------------------------------

    def _current_limits(self):
        read_at, limits = self._limits
        if time.monotonic() - read_at > self.LIMITS_FOR:
            limits = self.limits()
            self._limits = (time.monotonic(), limits)
        return limits

    def _held_back(self, conn, limits, now):
        """(workflows that may start nothing now, "workflow|key" pairs at
        their per-key limit), counted inside the claim's transaction."""
        counted = conn.execute(self.sql["held_back"], {"limited": _dumps(list(limits)),
                                                       "now": now}).fetchall()
        blocked, pairs = [], []
        for workflow, lim in limits.items():
            running = [r for r in counted if r["workflow"] == workflow and not r["started"]]
            window_full = any(r["workflow"] == workflow and r["started"] for r in counted)
            most = lim.get("max_concurrency")
            if most is not None and sum(r["n"] for r in running) >= most or window_full:
                blocked.append(workflow)
                continue
            per_key = lim.get("max_concurrency_per_key")
            if per_key is not None:
                pairs += [f"{workflow}|{r['concurrency_key']}" for r in running
                          if r["concurrency_key"] is not None and r["n"] >= per_key]
        return blocked, pairs

    def _claim_params(self, workflows, changes, per_workflow, now):
        params = {"now": now, "workflows": _dumps(list(workflows or ())), "n": 1}
        if self.postgres:  # the claim statement applies the changes itself
            params.update(status=changes["status"], lease_expires_at=changes.get("lease_expires_at"),
                          changes=_dumps(changes), per_workflow=_dumps(per_workflow or {}))
        return params

    def _limited(self, workflows):
        limits = self._current_limits()
        return limits if workflows is None else {w: v for w, v in limits.items() if w in workflows}

    def claim(self, workflows, changes, per_workflow=None):
        if workflows is not None and not workflows:
            return None
        now = self.clock()
        limits = self._limited(workflows)
        which = ("_in" if workflows is not None else "") + ("_limited" if limits else "")
        params = self._claim_params(workflows, changes, per_workflow, now)
        if self.postgres and not limits:  # PERF: one statement, no lock
            rows = self.db.write_one(self.sql["claim" + which], params)
            return self._job(rows[0]) if rows else None
        if self.postgres:
            # PERF: one round trip: BEGIN, the lock, the claim (which counts
            # what is held back and notes its start itself) and COMMIT are
            # sent together before its answer is read.
            with self.db.write(lock="limits", pipeline=True) as conn:
                claimed = conn.execute(self.sql["claim" + which], params)
            row = claimed.fetchone()
            return self._job(row) if row else None
        if not limits:
            found = self._sqlite_claim(which, params, changes, per_workflow, [None])
            return found[0] if found else None
        return self._claim_locked(which, params, limits, changes, per_workflow, now)

    def _claim_locked(self, which, params, limits, changes, per_workflow, now):
        """SQLite: a claim in one write transaction, counting what the
        ``limits`` hold back (exact: write transactions run one at a time)."""
        with self.db.write(lock="limits" if limits else None) as conn:
            if limits:
                blocked, pairs = self._held_back(conn, limits, now)
                params = dict(params, blocked=_dumps(blocked), pairs=_dumps(pairs))
            row = conn.execute(self.sql["next_queued" + which], params).fetchone()
            job = row and self._job(row)
            if job:
                job.update(claim_changes(job, changes, per_workflow))
                self._save(conn, job)
                if (limits.get(job["workflow"]) or {}).get("rate"):
                    slot = conn.execute(self.sql["next_slot"], {"workflow": job["workflow"]}).fetchone()
                    conn.execute(self.sql["start"], {"workflow": job["workflow"], "now": now,
                                                     "slot": slot["slot"]})
        return job or None

    def claim_many(self, workflows, changes, per_workflow, tokens, also=None):
        if workflows is not None and not workflows:
            return []
        if (len(tokens) == 1 and self.postgres) or self._limited(workflows):
            # Limits are counted claim by claim (each under the limits lock);
            # PostgreSQL's one claim is its own statement.
            found = []
            for token in tokens:
                job = self.claim(workflows, dict(changes, lease_token=token), per_workflow)
                if job is None:
                    break
                found.append(job)
            return found
        which = "_in" if workflows is not None else ""
        params = self._claim_params(workflows, changes, per_workflow, self.clock())
        if self.postgres:  # PERF: one statement takes them all
            rows = self.db.write_one(self.sql["claim_many" + which],
                                     dict(params, n=len(tokens), tokens=_dumps(tokens)))
            return [self._job(r) for r in sorted(rows, key=lambda r: r["i"])]
        return self._sqlite_claim(which, params, changes, per_workflow, tokens, also)

    def _sqlite_claim(self, which, params, changes, per_workflow, tokens, also=None):
        """SQLite, no limits: a job per token (None: the lease token in
        ``changes``), each taken by one statement (_sqlite_claim_sql);
        several, or one with ``also``'s statements, in one transaction.
        PERF: an empty claim is one read, and writes nothing."""
        if not self.db.query(self.sql["any_queued" + which], params):
            return []
        changes = dict(changes, lease_token=changes.get("lease_token"))
        sql = _sqlite_claim_sql(bool(which), tuple(changes))
        params = dict(params, status=changes["status"], lease_expires_at=changes.get("lease_expires_at"),
                      per_workflow=_dumps(per_workflow or {}),
                      **{f"c_{k}": _dumps(v) for k, v in changes.items()})
        each = [params if token is None else dict(params, c_lease_token=_dumps(token)) for token in tokens]
        if len(each) == 1 and also is None:
            return [self._job(row) for row in self.db.write_one(sql, each[0])]
        found = []
        with self.db.write() as conn:
            for one in each:
                row = conn.execute(sql, one).fetchone()
                if row is None:
                    break
                found.append(self._job(row))
            for statement, rows in also(found) if also is not None and found else ():
                conn.executemany(statement, rows)
        return found

    def set_limits(self, workflow, limits):
        rate = (limits or {}).get("rate") or {}
        with self.db.write(lock="limits") as conn:
            conn.execute(self.sql["forget_starts"], {"workflow": workflow})
            if limits:
                conn.execute(self.sql["set_limits"], {
                    "workflow": workflow, "limits": _dumps(limits),
                    "rate_count": rate.get("count"), "rate_per": rate.get("per")})
            else:
                conn.execute(self.sql["clear_limits"], {"workflow": workflow})
        self._limits = (float("-inf"), {})  # this process sees its own change at once

    def limits(self):
        return {r["workflow"]: json.loads(r["limits"]) for r in self.db.query(self.sql["limits"])}

    # -- sweeps and listings ------------------------------------------------------------

    def expired(self, now):
        return [self._job(r) for r in self.db.query(self.sql["expired"], {"now": now})]

    def due(self, now):
        return [self._job(r) for r in self.db.query(self.sql["due"], {"now": now})]

    def waiting(self, limit=500, event=None):
        if event is None:
            return [self._job(r) for r in self.db.query(self.sql["waiting"], {"limit": limit})]
        return [self._job(r) for r in self.db.query(self.sql["waiting_event"],
                                                    {"limit": limit, "event": event})]

    def next_due(self):
        rows = self.db.query(self.sql["next_due"], {"now": self.clock()})
        return rows[0]["t"]

    def counts(self):
        rows = self.db.query(self.sql["counts"])
        by_status = dict.fromkeys(JOB_STATUSES, 0)
        queued = dict.fromkeys(PRIORITIES, 0)
        by_workflow = {}
        for r in rows:
            by_status[r["status"]] += r["n"]
            by_workflow.setdefault(r["workflow"], dict.fromkeys(JOB_STATUSES, 0))[r["status"]] += r["n"]
            if r["status"] == "queued":
                queued[r["priority"]] += r["n"]
        return {"by_status": by_status, "queued_by_priority": queued, "by_workflow": by_workflow}

    def page(self, key_id, filters=None, limit=20, before_seq=None):
        f = filters or {}
        rows = self.db.query(self.sql["page"], {
            "key_id": key_id, "limit": limit + 1,
            "before": NO_CURSOR if before_seq is None else before_seq,
            "statuses": _dumps(list(f.get("status") or ())), "any_status": 0 if f.get("status") else 1,
            **{k: f.get(k) for k in FILTERS if k != "status"}})
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
        """Have ``wake(workflow, ended=False)`` called when another process
        may have queued a job of ``workflow`` or (``ended``) ended one:
        with PostgreSQL, on its notification of a queued job (pg.Listener);
        with SQLite shared by several processes, on another's announce or
        commit (storage.Changes). One process alone needs no watch."""
        if self.postgres:
            self.db.listen(wake)
        elif self.db.shared:
            self.db.watch(wake)

    def announce(self, workflow, ended=False):
        """Tell the other processes watching now (SQLite: storage.Changes);
        PostgreSQL's queued jobs announce themselves (NOTIFY, by trigger)."""
        if not self.postgres:
            self.db.announce(workflow, ended)

    def __len__(self):
        return self.db.query(self.sql["count"])[0]["n"]
