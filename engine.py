"""Levqor's job engine: workflows, the worker pool, retries, timeouts,
cancellation and leases for external workers.

A workflow is a Python callable ``fn(payload, ctx) -> result`` registered
under a name. Jobs of a registered workflow run in this process's pool of
worker threads; jobs of any other workflow wait for an external worker to
claim them over HTTP. Both follow the same rules: an attempt holds a lease
(a token and an expiry); a result is accepted only with the current token;
a failure is retried with exponential backoff and jitter until the attempts
run out; a lease that runs out ends the attempt.

This module owns the rules, not the storage (the job stores in ``jobstore``)
and not HTTP (``wsgi_routes`` maps ``JobError`` codes to statuses). Its
clock and random source are injectable, and ``run_next()`` and ``tick()``
do one step each, so tests drive it without threads or sleeps.
"""

import collections
import dataclasses
import decimal
import importlib
import json
import os
import random
import re
import threading
import time
import traceback

import costs
from costs import BudgetExceeded
from jobstore import JOB_FINAL, WORKFLOW_NAME_PATTERN

# ---------------------------------------------------------------------------
# Workflows
# ---------------------------------------------------------------------------


class PermanentFailure(Exception):
    """Raised by a workflow (or ``ctx.fail``) for a failure no retry can mend."""

    error_type = "permanent_failure"


class BudgetFailure(PermanentFailure):
    """Spending the job may not start, or that took a daily budget past its limit."""

    error_type = "budget_exceeded"


class CostCapFailure(PermanentFailure):
    """Money spent (and recorded) past the job's cost cap."""

    error_type = "cost_cap_exceeded"


class RetryLater(Exception):
    """Raised by a workflow that must wait (a provider's rate limit): the job
    goes back to the queue for ``seconds`` without spending an attempt."""

    def __init__(self, seconds, message="rate limited"):
        super().__init__(message)
        self.seconds = max(0.0, float(seconds))


class EventTimeout(Exception):
    """Raised by ``ctx.wait_for_event`` when its timeout passed with no event."""


class Suspend(BaseException):
    """Ends an attempt that waits (a durable sleep, an event): the job is
    ``waiting`` until ``until`` (None: until an event), the attempt not
    counted. A BaseException, so a workflow's ``except Exception`` cannot
    swallow it."""

    def __init__(self, waiting_for, until):
        super().__init__("waiting")
        self.waiting_for = waiting_for
        self.until = until


class LeaseLost(BaseException):
    """The attempt no longer holds its job (canceled, timed out, taken
    over): what it does from here is discarded, so it stops."""


# A job waiting for the jobs it depends on has no time to wake: its
# not_before is one no clock reaches, so the sweep that wakes sleepers
# (status waiting, not_before reached) never picks it.
FOREVER = 1e18
MAX_STEPS = 1000              # steps (sleeps and events included) one job may record
MAX_STEP_BYTES = 1024 * 1024  # of recorded results, as JSON, per job
# A result must be JSON a database and a callback can hold: no NaN or
# Infinity. PERF: one encoder (json.dumps with arguments builds one per call).
_strict_json = json.JSONEncoder(allow_nan=False).encode


@dataclasses.dataclass(frozen=True)
class Workflow:
    name: str
    fn: object
    timeout: float = None        # seconds; None: the engine's default
    max_attempts: int = None     # None: the engine's default
    backoff: float = None        # first retry delay in seconds; doubles each time
    schema: dict = None          # JSON schema for the payload, checked at intake
    max_cost: int = None         # default cost cap in micro-dollars; None: MAX_COST_PER_JOB


class Registry:
    """Workflows by name. ``workflow`` is its decorator:

        @registry.workflow("report.build", timeout=120, max_attempts=5)
        def build(payload, ctx): ...
    """

    NAME = re.compile(WORKFLOW_NAME_PATTERN)

    def __init__(self):
        self._workflows = {}

    def register(self, name, fn, **options):
        if not self.NAME.match(name):
            raise ValueError(f"workflow name {name!r}: letters, digits and . _ : - only")
        self._workflows[name] = Workflow(name, fn, **options)
        return fn

    def workflow(self, name, **options):
        return lambda fn: self.register(name, fn, **options)

    def get(self, name):
        return self._workflows.get(name)

    def names(self):
        return list(self._workflows)

    def copy(self):
        other = Registry()
        other._workflows = dict(self._workflows)
        return other


# Operators' modules (LEVQOR_WORKFLOWS) register here, as do the built-ins.
registry = Registry()
workflow = registry.workflow


def import_workflows(modules):
    """Import each module named in LEVQOR_WORKFLOWS; they register as they load."""
    for name in modules:
        importlib.import_module(name)


# ---------------------------------------------------------------------------
# What a running workflow sees
# ---------------------------------------------------------------------------


class JobContext:
    """Handed to a workflow with its payload: the job's identity, a cancel
    flag to check in long work, progress reporting and permanent failure."""

    def __init__(self, engine, job):
        self.engine = engine
        self.job_id = job["job_id"]
        self.attempt = job["attempts"]
        self.workflow = job["workflow"]
        self.parents = job.get("parents") or {}  # {parent job id: its result}
        self.traceparent = job.get("traceparent")  # the submitter's W3C trace, or None
        self._token = job["lease_token"]
        self._cancel = threading.Event()
        self._progress = None  # the latest progress reported
        self._progress_written = float("-inf")  # when progress was last written (monotonic)
        self._steps = list(job.get("steps") or [])  # recorded, in order (this attempt adds to it)
        self._seen = set()       # step names reached in this run
        self._step = None        # the name of the step running now
        self._step_cost = 0      # micro-dollars charged in it
        self._waits = 0          # durable sleeps and events reached in this run

    @property
    def canceled(self):
        """True once the job was canceled or ran past its timeout: stop soon."""
        return self._cancel.is_set()

    def sleep(self, seconds):
        """Wait up to ``seconds``; returns early, True, if the job is canceled."""
        return self._cancel.wait(seconds)

    PROGRESS_EVERY = 0.5  # seconds: at most one progress write per attempt that often

    def progress(self, fraction, note=None):
        """Report how far the job is. PERF: written at most every
        PROGRESS_EVERY seconds; a report in between rides with the next
        write, or with the attempt's end."""
        fraction = min(1.0, max(0.0, float(fraction)))
        self._progress = {"fraction": round(fraction, 4), "note": None if note is None else str(note)[:200]}
        if time.monotonic() - self._progress_written >= self.PROGRESS_EVERY:
            self._write_progress()

    def _write_progress(self):
        if self._progress is not None:
            self._progress_written = time.monotonic()
            self.engine.store.update(self.job_id, expect={"lease_token": self._token},
                                     progress=self._progress, updated_at=self.engine.now())

    def fail(self, message):
        """Fail the job now, with no retry."""
        raise PermanentFailure(message)

    # -- durable steps ---------------------------------------------------------------
    #
    # A job's recorded steps are kept with it, and every attempt runs the
    # workflow from the top: a step already recorded returns its result at
    # once, so the code between steps must take the same path every time
    # (no clock, randomness or outside reads outside a step), or a replay
    # would reach different steps than the run that recorded them.

    def _recorded(self, name):
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise PermanentFailure("a step's name is a string of 1 to 200 characters")
        if name in self._seen:
            raise PermanentFailure(f"step {name!r} is used twice in one run: step names must be unique")
        self._seen.add(name)
        return next((s for s in self._steps if s["name"] == name), None)

    def _record(self, entry):
        """Store ``entry`` with the job while this attempt holds it."""
        if len(self._steps) >= MAX_STEPS:
            raise PermanentFailure(f"the job has recorded {MAX_STEPS} steps, the most it may")
        self._steps.append(entry)
        if sum(s.get("size", 0) for s in self._steps) > MAX_STEP_BYTES:
            raise PermanentFailure(f"the job's recorded step results passed {MAX_STEP_BYTES} bytes")
        self.engine.record_steps(self.job_id, self._token, self._steps)

    def step(self, name, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, run once for this job: its JSON result,
        and the cost charged while it runs, are recorded with the job
        before this returns; on every later attempt the recorded result is
        returned without running ``fn``. An exception fails the attempt
        (and records nothing)."""
        done = self._recorded(name)
        if done is not None:
            return done.get("result")
        started, self._step, self._step_cost = self.engine.now(), name, 0
        try:
            result = fn(*args, **kwargs)
        finally:
            self._step = None
        try:
            size = len(_strict_json(result))
        except (TypeError, ValueError) as exc:
            raise PermanentFailure(f"step {name!r} returned something that is not JSON: {exc}") from None
        self._record({"name": name, "kind": "step", "state": "done", "result": result, "size": size,
                      "cost": self._step_cost, "started_at": started, "finished_at": self.engine.now()})
        return result

    def sleep_for(self, seconds):
        """Wait ``seconds`` without holding a thread: the attempt ends, the
        job is ``waiting`` until then, and runs again from the top (the
        steps before replayed from their records). Not an attempt."""
        self._wait(lambda now: now + max(0.0, float(seconds)))

    def sleep_until(self, when):
        """``sleep_for`` until ``when`` (a timezone-aware datetime, or Unix seconds)."""
        at = when.timestamp() if hasattr(when, "timestamp") else float(when)
        self._wait(lambda now: at)

    def wait_for_event(self, name, match=None, timeout=None):
        """Wait, as ``sleep_for`` does, for POST /api/v1/events with this
        ``name`` and ``data`` holding every key and value of ``match``:
        its data, recorded like a step. ``EventTimeout`` after ``timeout``
        seconds (None: no limit) without one."""
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise PermanentFailure("an event's name is a string of 1 to 200 characters")
        if match is not None and not isinstance(match, dict):
            raise PermanentFailure("an event's match is a dict of the values its data must hold")
        entry = self._wait(lambda now: None if timeout is None else now + max(0.0, float(timeout)),
                           event=name, match=match or {})
        if entry.get("state") == "timed_out":
            raise EventTimeout(f"no event {name!r} came in time")
        return entry.get("result")

    def _wait(self, until, event=None, match=None):
        """The wait's record (made the first time it is reached; the n-th
        wait of a run is named "wait#n"); Suspend while it is not over."""
        self._waits += 1
        name = f"wait#{self._waits}"
        entry = self._recorded(name)
        now = self.engine.now()
        if entry is None:
            entry = {"name": name, "kind": "event" if event else "sleep", "state": "waiting",
                     "until": until(now), "started_at": now, "finished_at": None, "cost": 0}
            if event:
                entry.update(event=event, match=match)
            self._record(entry)
        if entry["state"] == "waiting" and entry["until"] is not None and entry["until"] <= now:
            entry = self.engine.end_wait(self, entry, "timed_out" if event else "done")
        if entry["state"] == "waiting":
            waiting_for = {"event": event, "match": match, "until": entry["until"]} if event \
                else {"until": entry["until"]}
            raise Suspend(waiting_for, entry["until"])
        return entry

    def charge(self, usd, note=None):
        """Record ``usd`` dollars this job has spent: always, in full, since
        the money is gone. Past the job's cost cap it then fails with
        ``cost_cap_exceeded``; past a daily budget, with ``budget_exceeded``.
        Inside a step, the charge is the step's (named in the ledger)."""
        micro = costs.to_micro(usd, decimal.ROUND_CEILING)
        if self._step is not None:
            self._step_cost += micro
        self.engine.charge(self.job_id, micro, note, step=self._step)

    def budget_left(self):
        """Micro-dollars this job may still spend."""
        return self.engine.budget_left(self.job_id)

    def reserve(self, micro):
        """Before spending up to ``micro`` micro-dollars: hold them against
        today's budgets (``budget_exceeded`` if that does not fit)."""
        self.engine.reserve(self.job_id, micro)


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


class JobError(Exception):
    """A request the job's state does not allow: code is not_found,
    conflict, lease_lost, budget_exceeded or cost_cap_exceeded."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


STATUS_VIEW = ("job_id", "status", "created_at", "updated_at", "workflow", "priority",
               "attempts", "max_attempts", "started_at", "finished_at", "progress",
               "result", "error", "callback")
# Fields of later versions: a job stored before them shows None.
FLOW_VIEW = ("run_at", "schedule", "concurrency_key", "depends_on", "waiting_for")


def step_view(entry):
    """What the status shows of a recorded step (not its result)."""
    finished = entry.get("finished_at")
    view = {"name": entry["name"], "kind": entry.get("kind", "step"), "state": entry["state"],
            "started_at": entry.get("started_at"), "finished_at": finished,
            "duration": None if finished is None else round(finished - entry["started_at"], 3),
            "cost": costs.to_usd(entry.get("cost") or 0)}
    if entry.get("kind") in ("sleep", "event"):
        view["until"] = entry.get("until")
    if entry.get("kind") == "event":
        view["event"] = entry.get("event")
    return view


def step_results(job):
    """The recorded results by step name, as an external worker gets them."""
    return {s["name"]: s.get("result") for s in job.get("steps") or ()
            if s.get("kind", "step") == "step" or s["state"] != "waiting"}


def status_view(job):
    """What a client may see of a job: not its payload, callback URL or lease."""
    view = {k: job[k] for k in STATUS_VIEW}
    view.update({k: job.get(k) for k in FLOW_VIEW})
    view["cost"] = {"max": costs.to_usd(job["max_cost"]), "spent": costs.to_usd(job["cost_spent"])}
    view["steps"] = [step_view(entry) for entry in job.get("steps") or ()]
    return view


MAX_ATTEMPTS_LOGGED = 50  # a job retried for ever keeps its newest attempts


def attempt_log(job, changes, now):
    """The job's attempt log with the attempt ending now added: when it
    started and ended, how (the status the job moves to: queued again,
    succeeded, failed or canceled), on which runner, and its error. The
    engine writes it in the same compare-and-set that ends the attempt, so
    every attempt is logged exactly once, on every job store; the job
    record itself keeps only its latest error."""
    error = changes.get("error")
    entry = {"attempt": job["attempts"], "runner": job.get("runner"), "started_at": job.get("started_at"),
             "ended_at": now, "outcome": changes.get("status"),
             "error": None if not error else {"type": error.get("type"),
                                              "message": str(error.get("message"))[:200]}}
    return ((job.get("attempt_log") or []) + [entry])[-MAX_ATTEMPTS_LOGGED:]


_UNSET = object()  # no result (yet)


def _matches(job, name, data):
    """Whether event ``name`` with ``data`` is what the job waits for."""
    waiting_for = job.get("waiting_for") or {}
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # 1 is not true
    return waiting_for.get("event") == name and all(
        k in data and same(data[k], v) for k, v in (waiting_for.get("match") or {}).items())


class _Tokens:
    """Random 128-bit tokens (leases, the tail of job ids), cut from os.urandom read
    4 KiB at a time. PERF: os.urandom gives up the GIL for its system call,
    and with the service's threads about, getting it back costs more than
    the read: 1,000-job batch intakes through the app in one process ran
    about 8% faster without a read per token. A forked child starts with
    none, so no two processes hand out the same bytes."""

    SIZE = 16
    READ = 4096

    def __init__(self):
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        self._lock = threading.Lock()
        self._bytes, self._at = b"", 0

    def __call__(self):
        with self._lock:
            if self._at == len(self._bytes):
                self._bytes, self._at = os.urandom(self.READ), 0
            at = self._at
            self._at += self.SIZE
            return self._bytes[at:at + self.SIZE].hex()


new_token = _Tokens()


class _Taker:
    """A claim waiting in this process for a job: what an intake needs to
    hand it one (see ``Engine._taker_for``)."""

    def __init__(self, workflows, lease_seconds, key_id, gone, also):
        self.workflows = frozenset(workflows)
        self.lease_seconds, self.key_id, self.gone, self.also = lease_seconds, key_id, gone, also
        self.picked = False  # an intake is storing a job claimed for it
        self.take = None  # the claim's changes that intake stores the job with
        self.jobs = None  # what it was handed: its answer

    def also_after(self, also):
        """The intake's ``also``, then, if the job was taken, the claim's own
        (its audit row, in the same transaction as its claim)."""
        if self.also is None:
            return also
        mine = self.also

        def both(answer):
            rows = list(also(answer)) if also is not None else []
            job, created = answer[0]
            if created and job["status"] == "running":
                rows += mine([job])
            return rows
        return both


def new_job_id():
    """A job's id: 32 hex digits, the first 12 the time in milliseconds and
    the other 20 random (80 bits: no id can be guessed from another).
    PERF: ids that grow with time go in at the end of the stores' job_id
    index, not at random places in it: a SQLite batch of 1,000 jobs was
    written in two thirds of the time (fewer pages touched, and fewer
    pages in the commit). A clock set back only costs that saving."""
    return f"{time.time_ns() // 1_000_000:012x}{new_token()[:20]}"


class Engine:
    def __init__(self, store, registry, log, *, threads=4, timeout=300.0, max_attempts=3,
                 backoff=2.0, backoff_cap=300.0, local_lease=30.0, clock=time.time, rng=None,
                 on_finish=(), guardrails=None, sweep_interval=0.25, purge_interval=5.0,
                 claim_waiters=2):
        self.store = store
        self.guardrails = guardrails  # costs.Guardrails; None: every charge is refused
        self.llm = None  # llm.Client for the llm.chat workflow, when configured
        self.llm_limits = None  # llm.ProviderLimits, when LLM_LIMITS is set
        self.local_lease = local_lease  # seconds an in-process attempt holds, renewed as it runs
        self.sweep_interval = sweep_interval  # seconds between lease sweeps (tick)
        self.purge_interval = purge_interval  # seconds between retention purges
        self.on_finish = list(on_finish)  # called with each job that reaches a final state
        self.registry = registry
        self.log = log
        self.threads = threads
        self.default_timeout = timeout
        self.default_attempts = max_attempts
        self.default_backoff = backoff
        self.backoff_cap = backoff_cap
        self.now = clock
        self.rng = rng or random.Random()
        self._contexts = {}  # job_id -> JobContext of in-process attempts
        self._contexts_lock = threading.Lock()
        self._wake = threading.Condition()
        self._claiming = threading.Lock()  # the pool's claims, one at a time
        self._wanting = 0  # pool threads in run_next that have no job yet
        self._claiming_lock = threading.Lock()  # guards _wanting
        # Jobs claimed but not started: (job, its context, when claimed,
        # monotonic). Their contexts are in _contexts from the claim on, so
        # the sweeper renews their leases and a cancel reaches them.
        self._handed = collections.deque()
        self._runner = None  # (thread, monotonic start) of a fast runner's job (see run_next)
        self._local = threading.local()  # .fast: this thread's last job ended within FAST
        self._unwritten = []  # ends of a fast runner's jobs, to store together (_write_ends)
        self._unwritten_lock = threading.Lock()
        self._claims = threading.Condition()  # waiting claims (claim's wait)
        self._queued = 0  # bumped whenever an external worker's job may have been queued
        self._takers = []  # _Takers of the claims waiting here, the longest waiting first
        # Requests that may wait at once (claims for a job, status reads for
        # a job's end), so that waiting never holds every serving thread.
        self._wait_slots = threading.BoundedSemaphore(claim_waiters)
        self._ended = threading.Condition()  # a job ended (here, or maybe in another process)
        self._ends = 0  # bumped with every notification of _ended
        self._stopping = threading.Event()
        self._threads = []

    # -- options -----------------------------------------------------------------

    def _options(self, name):
        wf = self.registry.get(name)
        timeout = wf.timeout if wf and wf.timeout is not None else self.default_timeout
        attempts = wf.max_attempts if wf and wf.max_attempts is not None else self.default_attempts
        backoff = wf.backoff if wf and wf.backoff is not None else self.default_backoff
        return timeout, attempts, backoff

    def backoff_delay(self, workflow_name, attempt):
        """Delay before the retry that follows ``attempt``: exponential, capped,
        with "equal jitter" (between half and all of it), so that jobs that
        failed together do not all come back together."""
        base = min(self.backoff_cap, self._options(workflow_name)[2] * 2 ** (attempt - 1))
        return base / 2 + self.rng.uniform(0, base / 2)

    # -- intake and the client's controls ----------------------------------------------

    def default_cap(self, workflow):
        wf = self.registry.get(workflow)
        return wf.max_cost if wf is not None else None

    def new_job(self, workflow, payload, priority, callback_url, key_id, max_cost=0, declared=True,
                run_at=None, concurrency_key=None, schedule=None, depends_on=()):
        """A new job, to ``submit``: queued; "scheduled" until ``run_at`` if
        that is later than now; "waiting" while it ``depends_on`` others."""
        now = self.now()
        status = "waiting" if depends_on else "scheduled" if run_at and run_at > now else "queued"
        not_before = FOREVER if depends_on else max(now, run_at or now)
        return {
            "job_id": new_job_id(), "status": status, "workflow": workflow, "payload": payload,
            "priority": priority, "callback_url": callback_url, "key_id": key_id,
            "created_at": now, "updated_at": now, "started_at": None, "finished_at": None,
            "attempts": 0, "max_attempts": self._options(workflow)[1],
            "not_before": not_before, "run_at": run_at,
            "runner": None, "lease_token": None, "lease_expires_at": None, "lease_seconds": None,
            "deadline_at": None,
            "cancel_requested": False, "progress": None, "result": None, "error": None,
            "callback": None, "callback_id": None, "callback_body": None,
            "callback_sending_until": None, "max_cost": max_cost, "cost_spent": 0,
            "cost_declared": declared,  # False: reserves nothing, charged as it spends
            "concurrency_key": concurrency_key, "schedule": schedule,
            "depends_on": list(depends_on), "parents": None, "children": [],
            "steps": [], "waiting_for": None,
        }

    def submit(self, job, idempotency=None):
        return self.submit_many([job], [idempotency])[0]

    def submit_many(self, jobs, idempotency=None, batch_key=None, also=None):
        """Store new jobs (see the store's ``add_many``, and its ``also``) and
        wake workers; a job that depends on others is linked to them and may
        then start at once. [(job, created)] in order.

        Once stored, the jobs are accepted: a link that fails then (the
        database busy) is logged, and housekeeping resolves that job when
        its parents end; raising would answer the client with an error for
        jobs that exist, and release their reservations."""
        added = []
        queued = set()
        taker = self._taker_for(jobs)
        if taker is not None:
            try:
                stored = self.store.add_many(jobs, idempotency, batch_key, taker.also_after(also),
                                             taker.take)
            except BaseException:
                self._handed_to(taker, self._taken_anyway(jobs[0], taker))
                raise
            job, created = stored[0]
            self._handed_to(taker, job if created and job["status"] == "running" else None)
        else:
            stored = self.store.add_many(jobs, idempotency, batch_key, also)
        for job, created in stored:
            if created and job["status"] == "waiting":
                try:
                    for parent_id in job["depends_on"]:
                        self._link(parent_id, job["job_id"])
                    job = self._resolve(job) or job
                except Exception as exc:
                    self.log.error("job stored, its dependencies not linked: housekeeping resolves it",
                                   job_id=job["job_id"], error=f"{type(exc).__name__}: {exc}")
            elif created and job["status"] == "queued":
                queued.add(job["workflow"])
            added.append((job, created))
        for workflow in queued:
            self._notify_for(workflow, every=len(jobs) > 1)
        return added

    def accept(self, job, key=None, idempotency=None):
        """Reserve the job's cap against today's budgets (for ``key``, a
        managed key's record, or None), then submit it; (job, created).
        Nothing stays reserved if it is not stored or is a replay. Raises
        costs.BudgetExceeded, and the store's QueueFull and IdempotencyMismatch."""
        return self.accept_many([job], key, [idempotency])[0]

    def accept_many(self, jobs, key=None, idempotency=None, batch_key=None, also=None):
        """``accept`` for a batch of one caller's jobs: all reserved and
        stored, or none (the exceptions' ``index`` names the job refused).
        ``batch_key``: one idempotency key for them all, and ``also``: what
        else to write with them (see the store's ``add_many``)."""
        try:
            self.guardrails.reserve_many(jobs, key)
        except BudgetExceeded:
            # A replay reserves nothing and makes nothing: it is answered even
            # when the budget could not hold its jobs again.
            made = (idempotency or batch_key) and self.store.replayed(idempotency, batch_key)
            if made:
                return [(job, False) for job in made]
            raise
        try:
            added = self.submit_many(jobs, idempotency, batch_key, also)
        except BaseException as exc:  # no job was stored: nothing may stay reserved for them
            for job in jobs:
                self.guardrails.settle(job, f"intake refused: {type(exc).__name__}")
            raise
        for job, (_, created) in zip(jobs, added):
            if not created:
                self.guardrails.settle(job, "idempotent replay")
        return added

    # -- a new job handed to a waiting claim ----------------------------------------

    def _taker_for(self, jobs):
        """The waiting claim a lone new job goes to, if any (``_Taker``), now
        marked as picked; None when the job is not one an external worker
        may take at once, or no claim here waits for its workflow.

        PERF: a job queued where a claim waits for it is stored already
        claimed for that claim, in its intake's transaction: no claim
        transaction after it, and the claim's thread, when it gets to run,
        has its answer ready. The job would have been that claim's anyway
        (it waits because nothing was ready for it)."""
        if len(jobs) != 1 or not self._takers or self._stopping.is_set():
            return None
        job = jobs[0]
        if job["status"] != "queued" or self.registry.get(job["workflow"]) is not None:
            return None
        with self._claims:
            for taker in self._takers:
                if job["workflow"] in taker.workflows and not taker.gone():
                    changes, _ = self._start_attempt("external", taker.lease_seconds)
                    taker.take = dict(changes, claimed_by=taker.key_id)
                    # Picked: from here on _handed_to must run (the claim waits for it).
                    self._takers.remove(taker)
                    taker.picked = True
                    return taker
        return None

    def _taken_anyway(self, job, taker):
        """After ``add_many`` raised: the job, if it was stored claimed for
        ``taker`` all the same (a commit whose answer was lost: a dropped
        PostgreSQL connection). The claim answers with it; put back to
        waiting, it would leave the job running under a lease nobody holds."""
        try:
            stored = self.store.get(job["job_id"])
        except Exception:  # the store is away: its lease runs out instead
            return None
        return stored if stored and stored.get("lease_token") == taker.take["lease_token"] else None

    def _handed_to(self, taker, job):
        """The end of a pick: ``job`` (claimed for it) is the claim's
        answer; with None (a replay, a job its limits queued, a refusal) the
        claim goes back to waiting, to look again when woken."""
        with self._claims:
            taker.picked = False
            if job is not None:
                taker.jobs = [job]
            else:
                self._takers.insert(0, taker)
            self._claims.notify_all()

    # -- dependencies -------------------------------------------------------------

    MAX_CHILDREN = 1000  # jobs that may depend on one job

    def _link(self, parent_id, child_id):
        """Note the child on its parent, so the parent's end resolves it. A
        compare-and-set on the parent's status and children: if the parent
        ends meanwhile, the child is resolved by ``submit`` instead."""
        for _ in range(50):  # each lost race is another writer's progress
            parent = self.store.get(parent_id)
            if parent is None or parent["status"] in JOB_FINAL:
                return
            children = parent.get("children") or []
            if self.store.update(parent_id, expect={"status": parent["status"], "children":
                                                    parent.get("children")},
                                 children=children + [child_id]) is not None:
                return

    def _resolve(self, job):
        """A waiting job whose parents have all ended: queued (or scheduled)
        with their results if all succeeded, else canceled with
        ``dependency_failed``. None while any parent is still going."""
        results = {}
        for parent_id in job["depends_on"]:
            parent = self.store.get(parent_id)
            if parent is not None and parent["status"] not in JOB_FINAL:
                return None
            if parent is None or parent["status"] != "succeeded":
                now = self.now()
                state = "gone" if parent is None else parent["status"]
                done = self.store.update(job["job_id"], expect={"status": "waiting"}, status="canceled",
                                         updated_at=now, finished_at=now, error={
                                             "type": "dependency_failed", "code": "dependency_failed",
                                             "message": f"job {parent_id} it depends on is {state}"})
                if done is not None:
                    self.finished(done)
                return done
            results[parent_id] = parent["result"]
        now = self.now()
        status = "scheduled" if job.get("run_at") and job["run_at"] > now else "queued"
        done = self.store.update(job["job_id"], expect={"status": "waiting"}, status=status,
                                 parents=results, queued_at=now, updated_at=now,
                                 not_before=max(now, job.get("run_at") or now))
        if done is not None and status == "queued":
            self._notify_for(job["workflow"])
        return done

    def _release_children(self, job):
        for child_id in job.get("children") or ():
            child = self.store.get(child_id)
            if child is not None and child["status"] == "waiting":
                self._resolve(child)

    def _promote_due(self, now):
        """Scheduled jobs whose time has come join the queue, as do waiting
        ones whose durable sleep, or wait for an event, has run out (their
        next attempt ends the wait)."""
        for job in self.store.due(now):
            changes = {"status": "queued", "updated_at": now}
            if job["status"] == "waiting":
                changes.update(waiting_for=None, not_before=now, queued_at=now)
            if self.store.update(job["job_id"], expect={"status": job["status"],
                                                        "not_before": job["not_before"]},
                                 **changes) is not None:
                self._notify_for(job["workflow"])

    def get(self, job_id):
        job = self.store.get(job_id)
        if job is None:
            raise JobError("not_found", "job not found")
        return job

    END_POLL = 0.25  # seconds a status read waiting for a job's end sleeps at most between looks

    def wait_for_end(self, job_id, wait, gone=lambda: False):
        """The job once it has ended, or as it is when ``wait`` seconds
        have passed. Woken the moment a job ends in this process, or (the
        store's watch) when another may have changed one; and it looks at
        least every END_POLL (PostgreSQL notifies queued jobs only). Waits
        count against the same bound as waiting claims: past it, and when
        the caller has hung up, the job is answered as it is now."""
        deadline = time.monotonic() + wait
        with self._ended:
            seen = self._ends  # before the read: an end after it is never missed
        job = self.get(job_id)
        if job["status"] in JOB_FINAL or wait <= 0 or not self._wait_slots.acquire(blocking=False):
            return job
        try:
            while True:
                left = deadline - time.monotonic()
                if job["status"] in JOB_FINAL or left <= 0 or self._stopping.is_set() or gone():
                    return job
                with self._ended:
                    if self._ends == seen:
                        self._ended.wait(min(left, self.END_POLL))
                    seen = self._ends
                job = self.get(job_id)
        finally:
            self._wait_slots.release()

    def _signal_ended(self):
        with self._ended:
            self._ends += 1
            self._ended.notify_all()

    def cancel(self, job_id):
        """Not started yet (queued, scheduled, waiting): canceled at once.
        Running: flagged; it ends canceled when
        its handler notices, its worker reports, or its lease runs out."""
        for _ in range(3):  # a race with a worker changes the status: look again
            job = self.get(job_id)
            now = self.now()
            if job["status"] in JOB_FINAL:
                raise JobError("conflict", f"the job is already {job['status']}")
            if job["status"] in ("queued", "scheduled", "waiting"):  # not started: ends now
                done = self.store.update(job_id, expect={"status": job["status"]}, status="canceled",
                                         updated_at=now, finished_at=now)
                if done is not None:
                    self.finished(done)
            else:
                done = self.store.update(job_id, expect={"status": "running",
                                                         "lease_token": job["lease_token"]},
                                         cancel_requested=True, updated_at=now)
                if done is not None:
                    self._signal(job_id)
            if done is not None:
                return done
        raise JobError("conflict", "the job is changing state; try again")

    def retry(self, job_id, key=None):
        """A failed or canceled job goes back to the queue with fresh attempts,
        having reserved what is left of its cap against today's budgets (for
        ``key``, the managed key it belongs to): costs.BudgetExceeded if that
        does not fit. Only one retry can take the reservation: while the job
        holds one no other may reserve, so a losing retry is refused having
        touched no money."""
        job = self.get(job_id)
        if job["status"] not in ("failed", "canceled"):
            raise JobError("conflict", f"only failed or canceled jobs can be retried, not {job['status']}")
        if job.get("cost_declared", True) and job["max_cost"] and job["cost_spent"] >= job["max_cost"]:
            raise JobError("cost_cap_exceeded", "the job has spent its whole cost cap: a retry "
                                                "could spend nothing (submit a new job)")
        reserved = self.guardrails.reserve_retry(job, key) if self.guardrails else 0
        if reserved is None:
            raise JobError("conflict", "the job is changing state; try again")
        now = self.now()
        # A job that depends on others waits for them again (they may have
        # been retried too); one whose parents all succeeded runs at once.
        done = self.store.update(
            job_id, expect={"status": job["status"], "finished_at": job["finished_at"]},
            status="waiting" if job.get("depends_on") else "queued", attempts=0, error=None,
            result=None, progress=None, waiting_for=None,
            cancel_requested=False, started_at=None, finished_at=None, runner=None,
            lease_token=None, lease_expires_at=None, deadline_at=None, queued_at=now, updated_at=now,
            not_before=FOREVER if job.get("depends_on") else now)
        if done is None:
            if reserved:  # the job changed under us: the reservation it took goes back
                self.guardrails.settle(job, "retry refused")
            raise JobError("conflict", "the job is changing state; try again")
        if done["status"] == "waiting":
            for parent_id in done["depends_on"]:
                self._link(parent_id, job_id)
            return self._resolve(done) or done
        self._notify_for(job["workflow"])
        return done

    def complete_for_dev(self, job_id, result):
        """Development only (the seed's ``_dev/complete``): the job succeeds
        with ``result`` whatever its state, as one compare-and-set; a running
        in-process attempt is told to stop and its late result is discarded."""
        for _ in range(3):  # a race with a worker changes the job: look again
            job = self.get(job_id)
            now = self.now()
            done = self.store.update(
                job_id, expect={"status": job["status"], "lease_token": job["lease_token"]},
                status="succeeded", result=result, error=None, updated_at=now, finished_at=now,
                lease_token=None, lease_expires_at=None, deadline_at=None)
            if done is not None:
                if job["status"] not in JOB_FINAL:
                    self._signal(job_id)
                    self.finished(done)
                return done
        raise JobError("conflict", "the job is changing state; try again")

    def page(self, key_id, filters=None, limit=20, before_seq=None):
        """A page of the jobs made with ``key_id``, newest first (see the store's ``page``)."""
        return self.store.page(key_id, filters, limit, before_seq)

    BULK_BATCH = 200
    BULK_MOST = 10_000  # jobs one bulk call may look at

    def bulk(self, key_id, filters, action, key=None):
        """Cancel (``action`` "cancel") or retry ("retry": failed and canceled
        only) every job of ``key_id`` that passes ``filters``, a page at a
        time; (matched, changed). A job that changes state meanwhile is
        counted as matched, not changed."""
        if action == "retry":
            wanted = [s for s in (filters.get("status") or ("failed", "canceled"))
                      if s in ("failed", "canceled")]
            filters = dict(filters, status=wanted)
            if not wanted:
                return 0, 0
        do = self.cancel if action == "cancel" else self.retry
        matched = changed = 0
        before = None
        while matched < self.BULK_MOST:
            jobs, more = self.page(key_id, filters, min(self.BULK_BATCH, self.BULK_MOST - matched),
                                   before)
            for job in jobs:
                matched += 1
                if action == "cancel" and job["status"] in JOB_FINAL:
                    continue
                try:
                    do(job["job_id"], key) if action == "retry" else do(job["job_id"])
                    changed += 1
                except (JobError, BudgetExceeded):  # it changed meanwhile, or no money is left
                    pass
            if not more:
                break
            before = jobs[-1]["seq"]
        return matched, changed

    def set_limits(self, workflow, limits):
        self.store.set_limits(workflow, limits)
        self._notify_all()  # a raised limit may let waiting jobs start

    def limits(self):
        return self.store.limits()

    def counts(self):
        return self.store.counts()

    # -- attempts: shared by in-process and external workers ----------------------------------

    def _start_attempt(self, runner, lease_seconds, workflows=()):
        """What makes a claimed job running: (changes, per workflow), as the
        store's ``claim`` takes them (it adds one to ``attempts``).

        An external worker's lease is what it asked for. An in-process
        attempt has a deadline (its workflow's timeout, so the changes for
        each of ``workflows``) and a short lease that this process's
        sweeper renews while the attempt runs: if the process dies, the
        lease runs out long before the timeout would, and the job comes back
        by the usual lease rules (with a durable store, in any process).
        """
        now = self.now()
        changes = {"status": "running", "runner": runner, "lease_token": new_token(),
                   "started_at": now, "updated_at": now, "progress": None}
        if runner != "local":
            changes.update(lease_seconds=lease_seconds, lease_expires_at=now + lease_seconds,
                           deadline_at=None)
            return changes, None
        per_workflow = {}
        for name in workflows:
            deadline = now + self._options(name)[0]
            seconds = min(self.local_lease, deadline - now)
            per_workflow[name] = {"deadline_at": deadline, "lease_seconds": seconds,
                                  "lease_expires_at": now + seconds}
        return changes, per_workflow

    def _renew_local_leases(self, now):
        """Renew the leases of this process's running attempts, and pass on
        what other processes did to them."""
        with self._contexts_lock:
            running = list(self._contexts.values())
        for ctx in running:
            job = self.store.get(ctx.job_id)
            # Canceled, timed out or ended through another process (whose
            # cancel cannot reach this thread): tell the workflow to stop.
            if job is None or job["lease_token"] != ctx._token or job["cancel_requested"]:
                ctx._cancel.set()
            if job is None or job["lease_token"] != ctx._token or job["deadline_at"] is None:
                continue
            if job["lease_expires_at"] - now < self.local_lease / 2:
                self.store.update(ctx.job_id, expect={"lease_token": ctx._token},
                                  lease_expires_at=min(job["deadline_at"], now + self.local_lease))

    def _finish(self, job, token, _expect=(), _known=None, **changes):
        """End the attempt holding ``token`` (and, if given, the values of
        ``_expect``); None if it no longer holds the job. ``_known``: the
        store's ``known`` hint."""
        job_id, expect, known, changes = self._ending(job, token, _expect, _known, changes)
        done = self.store.update(job_id, expect=expect, known=known, **changes)
        if done is not None:
            self._after_end(job, done)
        return done

    def _ending(self, job, token, expect, known, changes):
        """The store's update that ends the attempt holding ``token``:
        (job_id, expect, known, changes), as ``update_many`` takes them."""
        now = self.now()
        if changes.get("status") in JOB_FINAL:
            changes["finished_at"] = now
        changes.update(updated_at=now, lease_token=None, lease_expires_at=None, deadline_at=None)
        changes["attempt_log"] = attempt_log(job, changes, now)  # kept with the job, for the dashboard
        return job["job_id"], {"status": "running", "lease_token": token, **dict(expect)}, known, changes

    def _after_end(self, job, done):
        """What follows an attempt's end, once it is stored (``done``)."""
        with self._contexts_lock:
            self._contexts.pop(job["job_id"], None)
        if done["status"] == "queued":
            self._notify_for(job["workflow"])
        elif done["status"] in JOB_FINAL:
            self.finished(done)

    def finished(self, job):
        self._signal_ended()
        self._release_children(job)
        # Told as an end: what waits for it elsewhere looks, and a slot
        # under a concurrency limit may be free.
        self._notify_for(job["workflow"], ended=True)
        for hook in self.on_finish:
            try:
                hook(job)
            except Exception:  # a hook's fault must not undo the job's outcome
                self.log.error("on_finish hook failed", job_id=job["job_id"],
                               traceback=traceback.format_exc())

    def succeed(self, job, token, result, claimed=None):
        """The attempt's result. ``claimed``: the job as its claim returned
        it (``job`` is that, with this attempt's progress), so the change
        also expects no cancel requested since, and the store may apply it
        over that copy unread (``known``)."""
        if job["cancel_requested"]:
            return self._finish(job, token, status="canceled")
        return self._finish(job, token, **self._success(job, result, claimed))

    @staticmethod
    def _success(job, result, claimed):
        """``succeed``'s changes, the job not canceled."""
        return dict(status="succeeded", result=result, error=None,
                    progress={"fraction": 1.0, "note": (job.get("progress") or {}).get("note")},
                    _expect={"cancel_requested": False} if claimed else {}, _known=claimed)

    def fail(self, job, token, error_type, message, retryable=True):
        """A failed attempt: retried after backoff while attempts remain, else final."""
        if job["cancel_requested"]:
            return self._finish(job, token, status="canceled")
        message = str(message)[:500]
        if retryable and job["attempts"] < job["max_attempts"]:
            now = self.now()
            delay = self.backoff_delay(job["workflow"], job["attempts"])
            return self._finish(job, token, status="queued", not_before=now + delay, queued_at=now,
                                error={"type": error_type, "message": message,
                                       "attempts": job["attempts"], "retry_in": round(delay, 3)})
        return self._finish(job, token, status="failed",
                            error={"type": error_type, "message": message, "attempts": job["attempts"]})

    def later(self, job, token, seconds, message):
        """Put a running job back in the queue for ``seconds``, the attempt not
        counted (a provider's rate limit is no fault of the job's)."""
        if job["cancel_requested"]:
            return self._finish(job, token, status="canceled")
        now = self.now()
        return self._finish(job, token, status="queued", not_before=now + seconds, queued_at=now,
                            attempts=job["attempts"] - 1,
                            error={"type": "rate_limited", "message": str(message)[:500],
                                   "attempts": job["attempts"] - 1, "retry_in": round(seconds, 3)})

    def tick(self):
        """End every attempt whose lease or timeout has run out. In-process
        jobs past their timeout fail with ``timeout`` (their thread is told
        to stop; a late result is discarded). External jobs whose lease ran
        out without a heartbeat go back to the queue, the attempt counted,
        or fail with ``lease_expired`` after the last one."""
        now = self.now()
        self._write_ends()
        self._hand_back(self.HAND_BACK)
        self._renew_local_leases(now)
        self._promote_due(now)
        for job in self.store.expired(now):
            try:  # one job's fault must not stop the sweep of the others
                self._end_expired(job, now)
            except Exception:
                self.log.error("lease sweep failed for a job", job_id=job.get("job_id"),
                               traceback=traceback.format_exc())

    def _end_expired(self, job, now):
        token = job["lease_token"]
        self._signal(job["job_id"])  # first: finishing forgets the attempt's context
        if job["cancel_requested"]:
            self._finish(job, token, status="canceled")
        elif job["deadline_at"] is not None and job["deadline_at"] <= now:
            timeout = self._options(job["workflow"])[0]
            done = self._finish(job, token, status="failed", error={
                "type": "timeout", "message": f"the job ran past its {timeout:g} s timeout",
                "attempts": job["attempts"]})
            if done is not None:
                self.log.warning("job timed out", job_id=job["job_id"], workflow=job["workflow"])
        elif job["attempts"] < job["max_attempts"]:
            self._finish(job, token, status="queued", not_before=now, queued_at=now,
                         error={"type": "lease_expired", "message": "the worker stopped reporting",
                                "attempts": job["attempts"]})
            self.log.warning("lease expired; job queued again", job_id=job["job_id"])
        else:
            self._finish(job, token, status="failed", error={
                "type": "lease_expired", "message": "the worker stopped reporting",
                "attempts": job["attempts"]})

    # -- money -----------------------------------------------------------------------------

    def charge(self, job_id, micro, note=None, total=False, step=None):
        """Record micro-dollars a job spent, in full (with ``total``, its
        running total across all attempts; with ``step``, in that step's
        name): CostCapFailure past its cap, BudgetFailure past a daily budget."""
        if self.guardrails is None:
            raise BudgetFailure("this service records no costs")
        job = self.get(job_id)
        spent, passed = self.guardrails.charge(job, micro, note, total, step)
        self._note_spent(job_id, spent)
        if spent > job["max_cost"]:
            raise CostCapFailure(f"the job has spent {costs.to_usd(spent)} dollars, past its "
                                 f"cost cap of {costs.to_usd(job['max_cost'])}")
        if passed is not None:
            raise BudgetFailure(f"the {passed['scope']} daily budget is spent")
        return spent

    def _note_spent(self, job_id, spent):
        """The job's ``cost_spent`` follows the ledger and never goes back,
        however concurrent reports finish: each lost compare-and-set means
        another report raised it, so a few tries suffice."""
        for _ in range(32):
            job = self.store.get(job_id)
            if job is None or job["cost_spent"] >= spent:
                return
            if self.store.update(job_id, expect={"cost_spent": job["cost_spent"]},
                                 cost_spent=spent) is not None:
                return

    def reserve(self, job_id, micro):
        """Hold ``micro`` of today's budgets for a running job (its
        reservation raised to at least that): BudgetFailure if it does not fit."""
        if self.guardrails is None:
            raise BudgetFailure("this service records no costs")
        try:
            self.guardrails.top_up(self.get(job_id), micro)
        except BudgetExceeded as exc:
            raise BudgetFailure(f"the {exc.state['scope']} daily budget cannot hold "
                                f"{costs.to_usd(micro)} dollars more") from None

    def budget_left(self, job_id):
        job = self.get(job_id)
        return max(0, job["max_cost"] - (self.guardrails.ledger.spent(job_id) if self.guardrails else 0))

    def _report_cost(self, job, token, cost):
        """An external worker's running total for the job, across all its
        attempts: the ledger raises the job's spend to it in one step."""
        if cost is None:
            return
        try:
            self.charge(job["job_id"], costs.to_micro(cost, decimal.ROUND_CEILING), total=True)
        except (BudgetFailure, CostCapFailure) as exc:
            self.fail(job, token, exc.error_type, exc, retryable=False)
            raise JobError(exc.error_type, str(exc)) from None

    # -- external workers ----------------------------------------------------------------

    CLAIM_POLL = 1.0  # seconds a waiting claim sleeps at most between looks
    HANGUP_POLL = 0.1  # seconds between its looks whether its caller hung up

    def claim(self, workflows, lease_seconds, key_id=None):
        """The next job for an external worker, or None (see ``claim_many``)."""
        jobs = self.claim_many(workflows, lease_seconds, key_id)
        return jobs[0] if jobs else None

    def claim_many(self, workflows, lease_seconds, key_id=None, max_jobs=1, wait=0.0,
                   gone=lambda: False, also=None):
        """Up to ``max_jobs`` jobs for an external worker calling with
        ``key_id``, whose leases only that key can use. Workflows this
        service runs in-process are never handed out: their payloads are
        not for workers.

        With ``wait`` seconds and nothing ready, the call waits for a job:
        woken the moment one is queued here, or by the store's watch when
        another process queues one, and at least every CLAIM_POLL. At most
        ``claim_waiters`` calls wait at once, so waiting claims never hold
        every thread that serves requests; past that, the call answers at
        once with nothing. ``gone()`` says whether the caller has hung up
        meanwhile: then it takes nothing (its job would be stranded until
        its lease ran out). ``also``: the store's, for the claim that takes
        jobs (``contracts.JobStore.claim_many``)."""
        external = [name for name in workflows if self.registry.get(name) is None]
        if not external:
            return []
        deadline = time.monotonic() + wait
        waiting, taker = False, None
        try:
            while True:
                with self._claims:
                    seen = self._queued
                # Woken by a stop: the database may be closing under it.
                if waiting and (gone() or self._stopping.is_set()):
                    return []
                changes, _ = self._start_attempt("external", lease_seconds)
                jobs = self.store.claim_many(external, dict(changes, claimed_by=key_id), None,
                                             [new_token() for _ in range(max_jobs)], also)
                left = deadline - time.monotonic()
                if jobs or left <= 0 or self._stopping.is_set():
                    return jobs
                if not waiting:
                    if not self._wait_slots.acquire(blocking=False):
                        return []  # as many claims wait as may: this one answers now
                    waiting = True
                    taker = _Taker(external, lease_seconds, key_id, gone, also)
                due = self.store.next_due()  # a job whose retry backoff ends
                pause = min(left, self.CLAIM_POLL,
                            self.CLAIM_POLL if due is None else max(0.0, due - self.now()))
                end = time.monotonic() + pause
                with self._claims:
                    # An intake may hand this claim its job only while it waits
                    # here: it leaves the takers before the lock is let go, and
                    # a pick in progress is waited for (its job is stored
                    # claimed for this claim, which must answer with it).
                    self._takers.append(taker)
                    try:
                        # A caller that hangs up (a worker stopping) is heard within
                        # HANGUP_POLL, not at the next look: it waits for this answer.
                        while taker.picked or (self._queued == seen and not taker.jobs
                                               and not gone() and (now := time.monotonic()) < end):
                            self._claims.wait(self.HANGUP_POLL if taker.picked
                                              else min(self.HANGUP_POLL, end - now))
                    finally:
                        if taker in self._takers:
                            self._takers.remove(taker)
                    if taker.jobs:
                        return taker.jobs
        finally:
            if waiting:
                self._wait_slots.release()

    def _leased(self, job_id, token, key_id=None, job=None):
        """The job, if ``token`` holds its lease (``job``: as just read, if it was)."""
        job = job or self.get(job_id)
        # Another key's token is refused as a wrong one is: the answer says
        # nothing of whether the token was right.
        # A lease claimed before leases named their key has no claimed_by.
        if job["status"] != "running" or job["lease_token"] != token \
                or job.get("claimed_by", key_id) != key_id:
            raise JobError("lease_lost", "this lease is no longer valid: the job was re-leased, "
                                         "finished or canceled")
        return job

    def heartbeat(self, job_id, token, lease_seconds=None, progress=None, cost=None, key_id=None):
        """Extend the lease by ``lease_seconds`` (default: as long as claimed)."""
        job = self._leased(job_id, token, key_id)
        self._report_cost(job, token, cost)
        seconds = lease_seconds or job["lease_seconds"]
        changes = {"lease_expires_at": self.now() + seconds, "lease_seconds": seconds,
                   "updated_at": self.now()}
        if progress is not None:
            changes["progress"] = progress
        done = self.store.update(job_id, expect={"status": "running", "lease_token": token}, **changes)
        if done is None:
            raise JobError("lease_lost", "this lease is no longer valid")
        return done

    def report(self, job_id, token, result=None, error=None, retryable=True, cost=None, key_id=None):
        """An external worker's outcome: a result, or an error message; with
        ``cost``, the job's total spend so far in dollars."""
        job = self._leased(job_id, token, key_id)
        if cost is not None:  # the charge changed the job: read it again
            self._report_cost(job, token, cost)
            job = self._leased(job_id, token, key_id)
        if error is None:
            done = self.succeed(job, token, result)
        else:
            done = self.fail(job, token, "worker_error", error, retryable)
        if done is None:
            raise JobError("lease_lost", "this lease is no longer valid")
        return done

    def report_many(self, reports, key_id=None):
        """``report`` for each of ``reports`` ((job_id, token, outcome, cost),
        the outcome ``{"result": ...}`` or ``{"error": ..., "retryable": ...}``),
        each applied on its own: a list, in order, of the job or the
        JobError that refused it. PERF: the results of jobs leased as said,
        with no cost to record, are stored in one call (update_many: one
        transaction on SQLite), after one read of them all (get_many); a
        job changed since it was read (a cancel) is ended as ``report``
        would end it."""
        answers, together = [None] * len(reports), []
        read = self.store.get_many([job_id for job_id, *_ in reports])
        for i, ((job_id, token, outcome, cost), job) in enumerate(zip(reports, read)):
            try:
                if cost is None and "result" in outcome:
                    job = self._leased(job_id, token, key_id, job)
                    if not job["cancel_requested"]:
                        changes = self._success(job, outcome["result"], job)
                        together.append((i, job, outcome["result"], self._ending(
                            job, token, changes.pop("_expect"), changes.pop("_known"), changes)))
                        continue
                answers[i] = self.report(job_id, token, cost=cost, key_id=key_id, **outcome)
            except JobError as exc:
                answers[i] = exc
        stored = self.store.update_many([end for *_, end in together]) if together else []
        for (i, job, result, end), done in zip(together, stored):
            if done is not None:
                self._after_end(job, done)
            else:
                done = self.succeed(self.store.get(job["job_id"]) or job, end[1]["lease_token"], result)
            answers[i] = done if done is not None else JobError(
                "lease_lost", "this lease is no longer valid")
        return answers

    # -- the in-process pool -----------------------------------------------------------------

    # PERF: the pool's fast runner. Short jobs on several threads cost a
    # third more CPU than on one (the GIL passed at every SQLite call, each
    # thread's connection reading again what another wrote), so while a
    # thread's jobs return within FAST it claims BATCH at once, runs them and
    # stores their ends together (_write_ends), and the other threads stand
    # aside (_stand_aside). Once one of its jobs has run STEAL seconds, they
    # store the ends before it and take the rest of its batch; a job claimed
    # but left waiting HAND_BACK seconds anyway (every thread busy) goes back
    # to the queue (_hand_back). With one thread there is no one to take
    # over: it claims one job at a time.
    BATCH = 16
    FAST = 0.001
    STEAL = 0.002
    HAND_BACK = 0.5

    def run_next(self):
        """Claim one job of a registered workflow and run it here; False if
        none waits. (A thread whose last job was fast claims a batch: the
        next calls, from any thread, run the rest of it first.)"""
        names = self.registry.names()
        fast = self.threads > 1 and getattr(self._local, "fast", False) and not self._stopping.is_set()
        # The pool's threads claim one at a time: racing each other for the
        # same first job, most of their writes would be lost. The one
        # claiming takes a job for each thread waiting for its turn (counted
        # in _wanting, each about to take its turn), or a batch if it runs
        # fast: they find theirs in _handed.
        with self._claiming_lock:
            self._wanting += 1
        with self._claiming:
            with self._claiming_lock:
                self._wanting -= 1
                others = self._wanting
            if self._handed:
                job, ctx, _ = self._handed.popleft()
            else:
                self._write_ends()  # the last batch's, before the next is taken
                changes, per_workflow = self._start_attempt("local", None, names)
                count = max(1 + others, self.BATCH if fast else 1)
                jobs = self.store.claim_many(names, changes, per_workflow,
                                             [new_token() for _ in range(count)])
                if not jobs:
                    self._step_down()
                    return False
                contexts = [JobContext(self, j) for j in jobs]
                with self._contexts_lock:
                    self._contexts.update((c.job_id, c) for c in contexts)
                claimed = time.monotonic()
                self._handed.extend((j, c, claimed) for j, c in zip(jobs[1:], contexts[1:]))
                job, ctx = jobs[0], contexts[0]
        if fast:
            self._runner = (threading.get_ident(), time.monotonic())
        self._local.fast = False  # until this one ends within FAST
        try:
            self._run(job, ctx, defer=fast)
        finally:
            if not self._local.fast:
                self._step_down()
        if not self._handed or len(self._unwritten) >= self.BATCH:
            self._write_ends()
        return True

    def _run(self, job, ctx, defer=False):
        """Run a claimed job here, and end its attempt (with ``defer``, if
        it succeeds within FAST, the end is stored with the batch's)."""
        token = job["lease_token"]
        if ctx.canceled:  # before it started: canceled, or ended by another (timed out)
            job = self.store.get(job["job_id"])
            if job is not None and job["lease_token"] == token and job["cancel_requested"]:
                self._finish(job, token, status="canceled")
            if job is None or job["lease_token"] != token or job["cancel_requested"]:
                return self._forget(ctx)
        if job["cancel_requested"]:
            ctx._cancel.set()
        result, began = _UNSET, time.monotonic()
        try:
            result = self.registry.get(job["workflow"]).fn(job["payload"], ctx)
            self._local.fast = time.monotonic() - began < self.FAST
            _strict_json(result)  # it must be storable and sendable
        except Exception as exc:
            ctx._write_progress()  # what it reported before it ended so
            done = self._attempt_failed(job, token, exc, returned=result is not _UNSET)
        except Suspend as wait:
            ctx._write_progress()
            done = self._suspend(job, token, wait)
        except LeaseLost:
            done = None
        else:
            # PERF: finished from the job as claimed, with the progress this
            # attempt reported, not read again: the compare-and-set expects
            # no cancel requested meanwhile; if one was, read it and end so.
            ran = dict(job, progress=ctx._progress)
            if defer and self._local.fast and not job["cancel_requested"]:
                changes = self._success(ran, result, job)
                end = self._ending(ran, token, changes.pop("_expect"), changes.pop("_known"), changes)
                with self._unwritten_lock:
                    self._unwritten.append((ran, result, ctx, end))
                return
            done = self.succeed(ran, token, result, claimed=job)
            if done is None:
                done = self.succeed(self.store.get(job["job_id"]) or job, token, result)
        self._discard_if_late(job, done)
        self._forget(ctx)

    def _discard_if_late(self, job, done):
        if done is None:
            self.log.info("late result discarded", job_id=job["job_id"], workflow=job["workflow"])

    def _write_ends(self):
        """PERF: store the ends of the jobs a fast runner ran, not yet
        stored, in one call (one transaction, on SQLite: a batch's jobs
        ended one by one cost a commit each); then what follows each. An
        end that did not apply (a cancel came meanwhile) is read again and
        ended as run_next would. If the store fails, they are kept for the
        next try (the sweeper's, at the latest), their leases still renewed."""
        with self._unwritten_lock:
            unwritten, self._unwritten = self._unwritten, []
        if not unwritten:
            return
        try:
            stored = self.store.update_many([end for _, _, _, end in unwritten])
        except Exception:
            with self._unwritten_lock:
                self._unwritten[:0] = unwritten
            raise
        for (ran, result, ctx, end), done in zip(unwritten, stored):
            if done is not None:
                self._after_end(ran, done)
            else:
                done = self.succeed(self.store.get(ran["job_id"]) or ran, end[1]["lease_token"], result)
                self._discard_if_late(ran, done)
            self._forget(ctx)

    def _forget(self, ctx):
        with self._contexts_lock:
            if self._contexts.get(ctx.job_id) is ctx:
                del self._contexts[ctx.job_id]

    def _running_fast(self):
        """Whether this thread is the pool's fast runner."""
        runner = self._runner
        return runner is not None and runner[0] == threading.get_ident()

    def _step_down(self):
        """This thread is the fast runner no more (if it was)."""
        if self._running_fast():
            self._runner = None

    def _stand_aside(self):
        """Seconds this pool thread should wait before claiming: while
        another runs fast jobs, and its current one began under STEAL ago.
        None: go on."""
        runner = self._runner
        if runner is None or self._running_fast():
            return None
        age = time.monotonic() - runner[1]
        return None if age >= self.STEAL else self.STEAL - age

    def _hand_back(self, older_than):
        """Put the jobs claimed for this pool more than ``older_than`` seconds
        ago, and not started, back in the queue (as they were: the claim's
        attempt is not counted); how many."""
        now, cutoff, back = self.now(), time.monotonic() - older_than, []
        with self._claiming:
            while self._handed and self._handed[0][2] <= cutoff:
                back.append(self._handed.popleft())
        for job, ctx, _ in back:
            self._forget(ctx)
            done = self.store.update(
                job["job_id"], expect={"status": "running", "lease_token": job["lease_token"]},
                status="queued", attempts=job["attempts"] - 1, runner=None, lease_token=None,
                lease_seconds=None, lease_expires_at=None, deadline_at=None, updated_at=now)
            if done is not None:
                self._notify_for(job["workflow"])
        return len(back)

    def _attempt_failed(self, job, token, exc, returned):
        """End an in-process attempt that raised ``exc`` (or, ``returned``,
        whose result is not JSON)."""
        job = self.store.get(job["job_id"]) or job
        if returned:
            return self.fail(job, token, "invalid_result", f"the result is not JSON: {exc}", retryable=False)
        if isinstance(exc, RetryLater):
            return self.later(job, token, exc.seconds, str(exc))
        if isinstance(exc, PermanentFailure):
            return self.fail(job, token, exc.error_type, exc, retryable=False)
        self.log.warning("job attempt failed", job_id=job["job_id"], workflow=job["workflow"],
                         attempt=job["attempts"], traceback=traceback.format_exc())
        return self.fail(job, token, type(exc).__name__, exc)

    # -- durable steps ---------------------------------------------------------------

    def record_steps(self, job_id, token, steps):
        """Store an in-process attempt's steps with its job; LeaseLost if
        the attempt no longer holds it."""
        if self.store.update(job_id, expect={"status": "running", "lease_token": token},
                             steps=list(steps), updated_at=self.now()) is None:
            raise LeaseLost()

    def end_wait(self, ctx, entry, state):
        """A wait whose time has come: recorded as ``state`` (done, or
        timed_out for an event that never came)."""
        ended = dict(entry, state=state, finished_at=self.now())
        ctx._steps[ctx._steps.index(entry)] = ended
        self.record_steps(ctx.job_id, ctx._token, ctx._steps)
        return ended

    def _suspend(self, job, token, wait):
        """End an attempt that waits: the job is ``waiting`` until its wait
        ends, and the attempt is given back."""
        job = self.store.get(job["job_id"]) or job
        if job["cancel_requested"]:
            return self._finish(job, token, status="canceled")
        now = self.now()
        return self._finish(job, token, status="waiting", waiting_for=wait.waiting_for,
                            not_before=FOREVER if wait.until is None else wait.until, queued_at=now,
                            attempts=job["attempts"] - 1)

    MAX_EVENT_JOBS = 10_000  # waiting jobs one event may look at

    def deliver_event(self, name, data, key_id=None):
        """Resume every job waiting for event ``name`` whose match ``data``
        holds (of ``key_id``'s jobs; None: anyone's): its wait records
        ``data`` and it queues again. How many it resumed."""
        resumed = 0
        for job in self.store.waiting(self.MAX_EVENT_JOBS, event=name):
            if key_id is not None and job["key_id"] != key_id:
                continue
            for _ in range(5):  # a lost race is another change to the job: look again
                if job is None or job["status"] != "waiting" or not _matches(job, name, data):
                    break
                steps = [dict(s, state="done", result=data, size=len(json.dumps(data)),
                              finished_at=self.now())
                         if s.get("kind") == "event" and s["state"] == "waiting" else s
                         for s in job["steps"]]
                now = self.now()
                done = self.store.update(job["job_id"], expect={"status": "waiting", "steps": job["steps"]},
                                         status="queued", waiting_for=None, steps=steps, not_before=now,
                                         queued_at=now, updated_at=now)
                if done is not None:
                    resumed += 1
                    self._notify_for(job["workflow"])
                    break
                job = self.store.get(job["job_id"])
        return resumed

    def record_step(self, job_id, token, name, result, cost=None, key_id=None):
        """An external worker's finished step, recorded while its lease
        holds (``cost`` in dollars, charged in the step's name). A step
        already recorded is left as it was, and charged nothing again:
        (job, whether this call recorded it)."""
        for _ in range(5):  # a lost race is another step recorded meanwhile: look again
            job = self._leased(job_id, token, key_id)
            steps = job.get("steps") or []
            if any(s["name"] == name for s in steps):
                return job, False
            size = len(json.dumps(result))
            if len(steps) >= MAX_STEPS:
                raise JobError("step_limit", f"the job has recorded {MAX_STEPS} steps, the most it may")
            if sum(s.get("size", 0) for s in steps) + size > MAX_STEP_BYTES:
                raise JobError("step_limit", f"the job's recorded step results would pass "
                                             f"{MAX_STEP_BYTES} bytes")
            micro = costs.to_micro(cost, decimal.ROUND_CEILING) if cost else 0
            if micro:
                try:
                    self.charge(job_id, micro, f"step {name}", step=name)
                except (BudgetFailure, CostCapFailure) as exc:
                    self.fail(job, token, exc.error_type, exc, retryable=False)
                    raise JobError(exc.error_type, str(exc)) from None
            now = self.now()
            entry = {"name": name, "kind": "step", "state": "done", "result": result, "size": size,
                     "cost": micro, "started_at": now, "finished_at": now}
            done = self.store.update(job_id, expect={"status": "running", "lease_token": token,
                                                     "steps": job.get("steps")},
                                     steps=steps + [entry], updated_at=now)
            if done is not None:
                return done, True
        raise JobError("conflict", "the job is changing state; try again")

    def _signal(self, job_id):
        with self._contexts_lock:
            ctx = self._contexts.get(job_id)
        if ctx is not None:
            ctx._cancel.set()

    def _notify_for(self, workflow, every=False, ended=False):
        """A job of ``workflow`` was queued here, or (``ended``) one ended
        here: the other processes are told (the store's announce), and what
        waits here for the workflow's jobs is woken (``_wake_for``)."""
        self.store.announce(workflow, ended)
        self._wake_for(workflow, every)

    def _heard(self, workflow, ended=False):
        """The store's watch: another process queued a job of ``workflow``,
        or (``ended``) ended one; None: anything may have changed."""
        if ended or workflow is None:
            self._signal_ended()
        self._wake_for(workflow)

    def _wake_for(self, workflow, every=False):
        """Wake a pool thread (with ``every``, all of them) if this process
        runs ``workflow`` (None: any), else the claims waiting for an
        external worker's job."""
        if workflow is None or self.registry.get(workflow) is not None:
            with self._wake:
                self._wake.notify_all() if every else self._wake.notify()
        if workflow is None or self.registry.get(workflow) is None:
            with self._claims:
                self._queued += 1
                self._claims.notify_all()

    def _notify_all(self):
        self._signal_ended()
        self._wake_for(None, every=True)

    def _worker(self):
        while not self._stopping.is_set():
            pause = self._stand_aside()
            if pause is not None:
                time.sleep(pause)
                continue
            try:
                if not self._running_fast():  # a runner's, held up by a job slower than the rest
                    self._write_ends()
                if self.run_next():
                    continue
            except Exception:  # the pool outlives any one job's surprise
                self.log.error("worker loop error", traceback=traceback.format_exc())
            with self._wake:
                if self._stopping.is_set():  # checked under the lock: no lost wake-up
                    return
                try:
                    due = self.store.next_due()
                except Exception:  # the database is away: poll again in a second
                    due = None
                wait = 1.0 if due is None else min(1.0, max(0.0, due - self.now()))
                self._wake.wait(wait)

    def housekeeping(self, batches=20):
        """Retention, dependencies and money that outlived its job: purge finished jobs past
        their time (batch after batch while whole ones come back, at most
        ``batches``), and release reservations still held for jobs that
        have ended or are gone (a release that failed when the job ended,
        or a job lost with its process), so no budget stays taken by them."""
        for _ in range(batches):
            if self.store.purge(self.now()) < getattr(self.store, "PURGE_BATCH", 1):
                break
        # A waiting job is resolved when its last parent ends; this finds one
        # whose parent's process died before it could say so.
        for job in self.store.waiting(500):
            self._resolve(job)
        if self.guardrails is None:
            return
        # A minute's grace: an intake reserves before its job is stored, and
        # a retry before its job leaves its final status.
        for job_id in self.guardrails.ledger.held(self.now() - 60):
            job = self.store.get(job_id)
            if job is None or job["status"] in JOB_FINAL:
                self.guardrails.ledger.settle(job_id, "released after the job ended")

    def _sweeper(self):
        next_purge = time.monotonic() + self.purge_interval
        while not self._stopping.wait(self.sweep_interval):
            try:
                self.tick()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.purge_interval
                    self.housekeeping()
            except Exception:
                self.log.error("sweeper error", traceback=traceback.format_exc())

    @property
    def running(self):
        """Whether the sweeper (and the pool, if any) is alive."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def start(self):
        if self._threads:
            return
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._worker, name=f"levqor-job-{i}", daemon=True)
                         for i in range(self.threads)]
        self._threads.append(threading.Thread(target=self._sweeper, name="levqor-sweeper", daemon=True))
        for t in self._threads:
            t.start()
        # Jobs queued by other processes wake the pool and waiting claims.
        self.store.watch(self._heard)

    def stopping(self):
        """Take no more jobs (those claimed but not started go back to the
        queue), and answer the claims that wait for one now."""
        self._stopping.set()
        try:
            self._write_ends()
            self._hand_back(0)
        except Exception:  # the database is away: their leases run out instead
            self.log.error("jobs claimed could not be put back", traceback=traceback.format_exc())
        self._notify_all()

    def stop(self, grace=25.0):
        """Stop taking jobs; give running ones ``grace`` seconds; log what is left."""
        self.stopping()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []
        self._write_ends()
        self._hand_back(0)  # claimed by a thread as it stopped
        with self._contexts_lock:
            unfinished = list(self._contexts)
        counts = self.store.counts()["by_status"]
        self.log.warning("job engine stopped", running_abandoned=unfinished,
                         queued_left=counts["queued"])


# ---------------------------------------------------------------------------
# Built-in workflows
# ---------------------------------------------------------------------------


# The built-ins spend nothing, so they reserve nothing (max_cost=0).
@workflow("echo", timeout=10, max_cost=0)
def echo(payload, ctx):
    """Returns its payload."""
    return payload


@workflow("sleep", timeout=90, max_cost=0, schema={
    "type": "object",
    "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 60}},
    "required": ["seconds"]})
def sleep(payload, ctx):
    """Waits ``seconds`` (at most 60), stopping early if canceled."""
    if ctx.sleep(payload["seconds"]):
        return {"slept": False}
    return {"slept": payload["seconds"]}


_WORD = re.compile(r"\w+")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


@workflow("demo.flow", timeout=30, max_cost=0)
def demo_flow(payload, ctx):
    """A deterministic summary of the payload: its keys, the size of each
    value as JSON, and word and character counts of its string fields."""
    fields = {}
    for key in sorted(payload):
        value = payload[key]
        entry = {"type": _JSON_TYPES.get(type(value), "number"),
                 "json_bytes": len(json.dumps(value, separators=(",", ":")).encode())}
        if isinstance(value, str):
            entry["words"] = len(_WORD.findall(value))
            entry["chars"] = len(value)
        fields[key] = entry
    ctx.progress(1.0, "summarised")
    return {"keys": sorted(payload), "field_count": len(payload), "fields": fields,
            "total_words": sum(f.get("words", 0) for f in fields.values())}
