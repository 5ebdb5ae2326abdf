"""The stores' contracts: what each kind of store promises its callers.

Levqor keeps its state in five kinds of store. Each is a ``Protocol`` below:
every method its callers use, with its types and the promise it keeps
(what is atomic, what a lost race returns, what is never written). The
engine, callbacks, guardrails and handlers rely on these promises and on
nothing else, so any backend that keeps them can replace another.

    JobStore   jobs, the queue, and the callback outbox   jobstore.MemoryJobStore,
                                                          jobstore.SqlJobStore
    UserStore  user profiles                              storage.UserStore
    KeyStore   managed API keys                           storage.KeyStore
    Ledger     money: reservations, charges, budgets      ledger.Ledger
    AuditLog   audit rows and per-minute statistics       recorder.Recorder

The callback outbox is part of JobStore, not a protocol of its own: a
job's delivery state is fields of the job (``callback``, ``callback_id``,
``callback_body``, ``callback_sending_until``), changed only through
``JobStore.update``'s compare-and-set, and ``pending_callbacks`` is a query
over jobs. A separate outbox would need its own atomicity with the job it
belongs to, which one store gives for free.

The SQL stores (``jobstore.SqlJobStore``, ``storage.UserStore`` and
``KeyStore``, ``ledger.Ledger``, ``recorder.Recorder``) each run on SQLite
(``storage.Database``) and on PostgreSQL (``pg.PgDatabase``): their
statements are written once, with a table of PostgreSQL overrides for the
few that must differ.

Adding a backend:

1. Implement the protocols it will hold, one class each, with these method
   names, parameters and return types (or, for another SQL database, a
   database object like those two and its overrides). A job store is built as
   ``Store(<connection>, max_jobs, ttl, aging, clock)``; a store that
   reads the time takes a ``clock`` (a function returning Unix seconds),
   so tests can drive it.
2. Add the backend to ``tests/test_store_contract.py``: one class that
   opens its stores, and its name in the ``params`` of each contract's
   fixture. The whole suite then runs against it; it conforms when the
   suite passes.
3. Choose it in ``levqor.Services``.

Where SQL must differ between backends, say why in a comment beside it.
This module imports nothing of Levqor's, so anything may import it. Errors
are named by module: ``jobstore.QueueFull`` and
``jobstore.IdempotencyMismatch`` (the job vocabulary), and
``costs.BudgetExceeded``.
"""

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

Job = dict[str, Any]
"""A job: a plain dict of JSON values, as ``engine.Engine.new_job`` makes it,
plus ``seq`` and ``queued_at``, which the store sets."""

Record = dict[str, Any]
"""A user or key row: a plain dict of column names to values."""


@runtime_checkable
class JobStore(Protocol):
    """Jobs, the queue they wait in, and the callback outbox.

    Every job handed out is a copy: changing it changes nothing stored. Every
    change is atomic and, with ``expect``, a compare-and-set; that is how a
    late worker, a second claimer or a second process loses a race cleanly.
    A job store holds at most ``max_jobs`` jobs, keeps finished ones ``ttl``
    seconds, and ranks waiting jobs with ``aging`` (below, ``claim``).
    """

    def add(self, job: Job, idempotency: tuple[str, str, str, float] | None = None
            ) -> tuple[Job, bool]:
        """Store a new job; returns (the stored copy, True).

        ``job`` has status "queued". The copy carries ``seq``, a number that
        grows with every add (the cursor of ``page``), and ``queued_at``, when
        it entered the queue (its ``created_at``). A durable store has
        committed the job before it returns.

        ``idempotency`` is (key_id, key, body_hash, ttl seconds). If that key
        of that key_id made a job within ttl and the job is still held, that
        job is returned with False and nothing is stored, even when the store
        is full; for another body_hash, ``IdempotencyMismatch``. The check and
        the record are one atomic step: concurrent duplicates make one job.

        ``QueueFull`` when ``max_jobs`` jobs are held; nothing is stored.
        """

    @property
    def carries_also(self) -> bool:
        """Whether ``add_many`` (and ``claim_many``, where it can) writes its
        ``also`` statements, or ignores them (in memory; and where carrying
        them would cost more than it saves)."""

    def add_many(self, jobs: Sequence[Job],
                 idempotency: Sequence[tuple[str, str, str, float] | None] | None = None,
                 batch_key: tuple[str, str, str, float] | None = None,
                 also: Callable[[list[tuple[Job, bool]]], list[tuple[str, list[dict]]]] | None = None,
                 take: dict[str, Any] | None = None) -> list[tuple[Job, bool]]:
        """Store new jobs all together, as ``add`` stores one: all of them or,
        on any refusal, none. Returns [(the stored copy, created)] in their
        order; ``idempotency`` has an entry (or None) for each job, and a
        replay's entry is the job its key made (created False).
        ``IdempotencyMismatch.index`` names the first job refused so; one
        transaction on a durable store, so nothing half-written remains.
        ``QueueFull`` when the new ones do not all fit.

        ``batch_key`` (instead of ``idempotency``) is one key for the whole
        batch, as ``add``'s is for one job: while it is held and every job
        it made still is, the same body is answered with those jobs, in
        their order (all created False), and another body is refused with
        ``IdempotencyMismatch`` (``index`` None). One record for the batch,
        not one a job. Jobs' keys and batches' share one namespace: a job's
        key used again for a batch (or the other way round) is refused as
        one used for another body would be.

        ``also``, given the answer, names statements [(sql, [params, ...])]
        that a store with ``carries_also`` runs, once for each set of
        params, in the same transaction: committed with the jobs or, on any
        refusal, not at all (the request's audit rows). A store without
        ``carries_also`` ignores it.

        ``take`` (with one job only) is a claim's ``changes`` (its lease
        token among them): the job, if it is made (not a replay), is stored
        already claimed, as ``claim_many`` would have claimed it at once,
        one more attempt and all; but as any job, queued, when its
        workflow has limits (those are counted claim by claim). The engine
        hands a new job so to a claim that waits for one."""

    def replayed(self, idempotency: Sequence[tuple[str, str, str, float] | None] | None = None,
                 batch_key: tuple[str, str, str, float] | None = None) -> list[Job] | None:
        """The jobs ``add_many`` with these keys would answer, if every one
        of them would be a replay; otherwise None. Stores nothing (the
        engine asks when the budget could not hold the jobs again).
        ``IdempotencyMismatch`` as ``add_many`` raises it."""

    def get(self, job_id: str) -> Job | None:
        """A copy of the job, or None."""

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """``get`` for each of ``job_ids``, in order (one read on a database)."""

    def update(self, job_id: str, expect: dict[str, Any] | None = None, known: Job | None = None,
               **changes: Any) -> Job | None:
        """Compare-and-set: if the job exists and has every value in
        ``expect``, apply ``changes`` and return the new copy; otherwise
        return None and change nothing. One atomic step: of racing updates
        expecting the same values, exactly one applies.

        ``known`` is a hint: the job as the caller last had it from this
        store. A store may apply the change over it without reading the
        job, only if the job is still exactly that; the outcome is the same
        as without it.

        Setting status "queued" (or a new ``not_before`` on a queued job)
        puts the job back in the queue, ranked as ``claim`` says. A job that
        leaves a final status has ``finished_at`` set back to None in the
        same update, so ``purge`` judges it by its next finish, not its last.
        """

    def update_many(self, updates: Sequence[tuple[str, dict[str, Any] | None, Job | None,
                                                 dict[str, Any]]]) -> list[Job | None]:
        """``update`` for each of ``updates`` (job_id, expect, known,
        changes), in order, each as if alone: a list of what each returned.
        A store may write them in one transaction (or in one per update,
        as ``update`` does): either way an update that was not applied
        leaves the others alone, and a durable store has committed them
        all before it returns.
        """

    def claim(self, workflows: Sequence[str] | None, changes: dict[str, Any],
              per_workflow: dict[str, dict[str, Any]] | None = None) -> Job | None:
        """Take the best ready job of ``workflows`` (None: any workflow; empty:
        none) that its workflow's limits let start now, make it running, and
        return the new copy; None when no such job is ready.

        Ready: status "queued" and ``not_before`` reached by the store's
        clock. Best: the lowest ``max(not_before, queued_at) - head start``,
        where the head start is 2, 1 or 0 times ``aging`` seconds for high,
        normal and low; then the lowest ``seq`` (first in, first out). So a
        job that has waited ``aging`` seconds longer than one of the next
        priority up goes first: low never starves.

        Limits (``set_limits``): a workflow with ``max_concurrency`` jobs
        running, or ``rate["count"]`` jobs started in the last
        ``rate["per"]`` seconds, starts none; a job whose
        ``concurrency_key`` has ``max_concurrency_per_key`` jobs of its
        workflow running waits (a job with no key is not limited per key).
        A held-back job is passed over, never refused: the best job that
        may start is taken, whatever waits before it. Exact however many
        claimers race, in however many processes.

        The job gets ``changes`` (status "running", a lease token and
        expiry), then the entry of ``per_workflow`` for its workflow if there
        is one (what depends on the workflow: an in-process deadline), and
        one more ``attempts``: values, not code, so that a database can
        apply them in the statement that takes the job. Two claimers, in one
        process or in several, never get the same job: each time a job is
        queued, exactly one claim takes it.
        """

    def claim_many(self, workflows: Sequence[str] | None, changes: dict[str, Any],
                   per_workflow: dict[str, dict[str, Any]] | None,
                   tokens: Sequence[str],
                   also: Callable[[list[Job]], list[tuple[str, list[dict]]]] | None = None
                   ) -> list[Job]:
        """Claim as ``claim`` does, up to once per token, in the queue's
        order, while jobs are ready: the claimed copies, each with its own
        token of ``tokens`` as ``lease_token`` (in place of the one in
        ``changes``). Limits hold job by job.

        ``also`` is as for ``add_many``, given the jobs claimed: a store
        with ``carries_also`` runs its statements in the claim's own
        transaction when it claims any, where the claim has one (SQLite's
        claims without limits), and only then calls it. A caller that
        finds it uncalled writes those rows itself."""

    def set_limits(self, workflow: str, limits: dict[str, Any] | None) -> None:
        """Replace the workflow's limits (``jobstore.LIMIT_NAMES``; a
        missing one is no limit; None or empty: none at all). Every claim,
        in every process, obeys them within a second."""

    def limits(self) -> dict[str, dict[str, Any]]:
        """Every workflow's limits, by workflow name."""

    def due(self, now: float) -> list[Job]:
        """Copies of the "scheduled" jobs whose ``not_before`` is at or
        before ``now`` (up to a batch of them), and of the "waiting" ones
        (a durable sleep's end, an event's timeout): time to queue them. A
        job waiting for its parents has ``not_before`` FOREVER, never due."""

    def waiting(self, limit: int = 500, event: str | None = None) -> list[Job]:
        """Copies of up to ``limit`` jobs of status "waiting", oldest first:
        those waiting for their parents (no ``waiting_for``); with
        ``event``, those whose ``waiting_for`` names that event."""

    def expired(self, now: float) -> list[Job]:
        """Copies of the running jobs whose ``lease_expires_at`` is at or
        before ``now``: attempts whose worker stopped reporting."""

    def next_due(self) -> float | None:
        """The earliest ``not_before`` of the queued jobs not ready yet (later
        than the store's clock), or None: how long an idle worker may sleep."""

    def counts(self) -> dict[str, dict[str, Any]]:
        """``{"by_status": {status: n}, "queued_by_priority": {priority: n},
        "by_workflow": {workflow: {status: n}}}``, with every status of
        ``jobstore.JOB_STATUSES`` and every priority of
        ``jobstore.PRIORITIES`` present, zero included (in ``by_workflow``,
        for every workflow that has a job held)."""

    def page(self, key_id: str, filters: dict[str, Any] | None = None, limit: int = 20,
             before_seq: int | None = None) -> tuple[list[Job], bool]:
        """Up to ``limit`` copies of the jobs made with ``key_id`` (never
        another key's), newest first (by ``seq``), with ``seq`` below
        ``before_seq`` and passing ``filters`` (``jobstore.FILTERS``: a list
        of statuses, a workflow, schedule and concurrency key, and bounds on
        ``created_at``, each optional); and whether more such jobs follow."""

    def purge(self, now: float) -> int:
        """Delete jobs in a final status whose ``finished_at`` is at or before
        ``now - ttl``, and idempotency keys expired by ``now``; returns how
        many jobs this call deleted.

        Deletes at most one batch per call, so no purge holds the store for
        long (the in-memory store's batch is all that is due: its deletes
        cost next to nothing). Call again while it returns more than 0 to
        drain. A job still queued or running is never deleted.
        """

    def pending_callbacks(self, due_by: float | None = None) -> list[tuple[str, str, float]]:
        """The callback outbox: (job_id, callback_id, due) of each pending
        delivery, in no particular order; ``due`` is its next attempt, or
        the end of the hold of the process sending it now. All of them for a
        process that starts after another stopped mid-schedule; with
        ``due_by``, those due by then (the periodic scan that finds a
        delivery whose sender died). Sending is taken and recorded by
        ``update`` with ``expect``, so two processes never both make one
        attempt."""

    def quarantine(self) -> list[str]:
        """Set aside every stored job that can no longer be read (a row
        whose JSON is not valid), so that no scan meets it again; the job
        ids set aside, each kept whole for the operator. A store that never
        reads jobs back from text has none."""

    def watch(self, wake: Callable[..., None]) -> None:
        """Call ``wake(workflow, ended=False)`` (from a thread of the
        store's) whenever another process may have queued a job of
        ``workflow`` or (``ended``) ended one; ``wake(None)``: anything
        may have changed, a job's end too. Idle workers need not wait for
        their next poll, and what waits for another workflow's jobs is not
        woken for nothing. A store no other process writes does nothing."""

    def announce(self, workflow: str, ended: bool = False) -> None:
        """This process queued a job of ``workflow``, or (``ended``) ended
        one: have the other processes' ``watch`` see it now rather than at
        their next look (where the store's own writes do not already tell
        them). Best effort: a watch must still see every change by its own
        means, only later."""

    def __len__(self) -> int:
        """How many jobs are held, of any status."""


@runtime_checkable
class UserStore(Protocol):
    """User profiles: ``id``, ``email`` (normalised by the caller), ``name``,
    ``locale``, ``currency``, ``meta`` (a JSON object), ``created_at``,
    ``updated_at``. Each belongs to an ``owner`` (the key that made it) and is
    unique by (owner, email). Every write is one atomic step, and ``meta``'s
    limits (keys, bytes as compact JSON) hold for the merged result: past
    them, ``storage.MetaTooLarge`` and nothing written."""

    def upsert(self, owner: str, email: str, fields: dict[str, Any]) -> tuple[bool, Record]:
        """Create ``owner``'s user with this email, or update the one there
        is; returns (created, the user as stored).

        Fields not given are left as they are; ``meta`` is merged into the
        stored one (RFC 7396: a null removes a key). Concurrent upserts of
        one new email make one user: exactly one of them is told created.
        """

    def patch(self, user_id: str, fields: dict[str, Any], owner: str | None = None) -> Record | None:
        """Update the given fields (``meta`` merged, as in ``upsert``) of an
        existing user of ``owner``'s (None: anyone's); the user as stored,
        or None if there is no such user."""

    def get(self, user_id: str, owner: str | None = None) -> Record | None:
        """The user with this id (of ``owner``'s, unless None), or None."""

    def get_by_email(self, email: str, owner: str) -> Record | None:
        """``owner``'s user with this (normalised) email, or None."""


@runtime_checkable
class KeyStore(Protocol):
    """Managed API keys (``lq_...``). Only a digest of each secret is kept: a
    record (``id``, ``name``, ``role``, ``prefix``, ``daily_budget``,
    ``rate_per_minute``, ``created_at``, ``last_used_at``, ``revoked_at``)
    never holds the secret."""

    def create(self, name: str, role: str, daily_budget: int | None = None,
               rate_per_minute: int | None = None,
               workflows: list[str] | None = None) -> tuple[Record, str]:
        """A new key: (its record, its secret). The secret is shown this once;
        it cannot be read back. ``workflows``: the name patterns a worker key
        may claim (None: any), kept and returned as a list."""

    def lookup(self, secret: str) -> Record | None:
        """The key with this secret, or None if there is none or it is
        revoked. Notes ``last_used_at`` (a backend may write it at most once
        a minute per key)."""

    def get(self, key_id: str) -> Record | None:
        """The key with this id, revoked or not, or None (for the budget
        that applies to a job's key when it spends)."""

    def list(self) -> list[Record]:
        """Every key, revoked ones included, oldest first."""

    def revoke(self, key_id: str) -> Record | None:
        """Revoke the key from now on; its record, or None if there is no
        such key. Revoking again keeps the first ``revoked_at``."""


@runtime_checkable
class Ledger(Protocol):
    """Money in integer micro-dollars: reservations, charges and releases.

    A job's cap is reserved against its UTC day at intake; each charge turns
    part of the reservation into spend; ``settle`` releases the rest. Money
    spent is recorded in full, even past the reservation: that part counts
    against the day at once. What a day has used is what is reserved plus
    what is spent. Every check of a budget and what it allows are one atomic
    step, so no number of concurrent requests takes a reservation past a
    budget's limit. ``limits`` are (scope, key_id or None for the whole
    service, limit); a refusal's ``BudgetExceeded.state`` holds scope,
    limit, used, requested, day and the reservations outstanding in its
    scope.
    """

    def reserve(self, job: Job, amount: int, limits: list[tuple[str, str | None, int]]) -> str:
        """Reserve ``amount`` for ``job`` (its ``job_id``, ``key_id``,
        ``workflow``) against today; returns the day ("YYYY-MM-DD").

        If today's use of any of ``limits`` plus ``amount`` would pass its
        limit, ``BudgetExceeded`` names the first and nothing is written.
        Reaching a limit exactly is allowed; an amount of 0 only checks that
        something is left.
        """

    def reserve_many(self, items: Sequence[tuple[Job, int]],
                     limits: list[tuple[str, str | None, int]]) -> str:
        """``reserve`` for each (job, amount) in turn, as one atomic step: on
        the first that does not fit, ``BudgetExceeded`` with ``index`` its
        place, and nothing is written for any of them."""

    def reserve_rest(self, job: Job, cap: int, limits: list[tuple[str, str | None, int]]) -> int | None:
        """For a retry: reserve what is left of ``cap`` after what the job
        spent in earlier attempts; returns that amount. None, and nothing
        written, while the job still holds a reservation (another retry took
        it first: of concurrent retries exactly one reserves).
        ``BudgetExceeded`` as in ``reserve``."""

    def top_up(self, job: Job, amount: int, limits: list[tuple[str, str | None, int]]) -> None:
        """Raise a running job's reservation to at least ``amount`` before it
        spends; ``BudgetExceeded``, and nothing written, if the difference
        does not fit ``limits``."""

    def charge(self, job: Job, amount: int, limits: list[tuple[str, str | None, int]] = (),
               note: str | None = None, total: bool = False,
               step: str | None = None) -> tuple[int, dict[str, Any] | None]:
        """Record ``amount`` spent by ``job`` (in the name of ``step``, if
        given: ``usage`` by step), always in full (with ``total``:
        raise what it has spent to ``amount``, charging only the difference,
        nothing if it is not higher: concurrent reports of one total charge
        once). The reservation covers what it can; the rest counts against
        the day at once. Returns (the job's spend in all, the state of the
        first of ``limits`` that the uncovered rest passed, or None)."""

    def settle(self, job_id: str, note: str) -> int:
        """Release what is left of the job's reservation; returns its spend
        (0 for a job with none). Settling again releases nothing more."""

    def held(self, before: float, limit: int = 500) -> list[str]:
        """Ids of jobs that still hold a reservation whose last ledger row is
        older than ``before``, at most ``limit`` of them (the sweeper
        releases those whose job has ended or is gone; the age keeps it off
        an intake or retry that has reserved and not yet stored its job)."""

    def spent(self, job_id: str) -> int:
        """What the job has spent (0 for a job with none)."""

    def used_today(self, key_id: str | None = None) -> int:
        """What today has used of the key's budget (None: the service's)."""

    def usage(self, first_day: str, last_day: str, group_by: str,
              key_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Money and outcomes per group over the days given (inclusive).

        ``group_by`` is "day", "workflow", "key" or "step" (what no step
        spent, and what is reserved, is in ""); ``key_id`` keeps one
        key's. Each group: ``{"spend": charged, "reserved": still reserved,
        "jobs": {status: n}}``, the outcomes being those the AuditLog counted
        (``outcome``; it shares the ledger's database; none by step).
        """


@runtime_checkable
class AuditLog(Protocol):
    """Audit rows, job outcomes and per-minute statistics, with group commit.

    ``audit`` of an accepted change (2xx) and ``outcome`` return only once
    their row is written (by the background writer between ``start`` and
    ``stop``, which takes everything waiting as one batch; without it, by
    the caller); ``count`` and refused requests' rows ride along with the
    next batch. ``flush`` writes what has gathered in one atomic step, with
    a heartbeat for the current minute, from which uptime is measured; the
    writer flushes at least every second.
    """

    def audit(self, key_id: str, method: str, path: str, status: int, request_id: str) -> None:
        """Note one authenticated write and its audit row; for a 2xx status,
        return once the row is on disk (``storage.StorageError`` "busy" if it
        cannot be written in time)."""

    def audit_many(self, key_id: str, method: str, paths: Sequence[str], status: int,
                   request_id: str) -> None:
        """``audit`` with one row for each of ``paths``, written together."""

    def statements(self, key_id: str, method: str, paths: Sequence[str], status: int,
                   request_id: str) -> list[tuple[str, list[dict]]]:
        """The rows ``audit_many`` would write, as statements [(sql, [params, ...])]
        for the transaction of the change they record (``JobStore.add_many``'s
        ``also``), on the database this log writes to. Notes nothing."""

    def carried(self, n: int) -> None:
        """Note ``n`` rows of ``statements`` committed with their change, as
        ``audit_many`` notes the rows it writes (``audit_coverage`` counts them)."""

    def count(self, column: str, n: int = 1) -> None:
        """Count ``n`` events this minute: ``column`` is one of
        ``storage.COUNTERS`` ("jobs", "auth_writes", "finished")."""

    def outcome(self, job: Job) -> None:
        """Count a finished job by day, workflow, key and status (shown by
        ``Ledger.usage``)."""

    def flush(self) -> None:
        """Write the pending rows, counters and outcomes, and this minute's
        heartbeat, in one atomic step. If the write fails, everything is kept
        for the next flush and the error is raised."""

    def metrics(self) -> dict[str, Any]:
        """``uptime_rolling_7d``, ``jobs_today``, ``finished_today``,
        ``audit_coverage`` (percent), ``last_updated``; counting what is not
        flushed yet as well as what is."""

    def pending(self) -> int:
        """Audit rows noted and not yet written."""

    @property
    def full(self) -> bool:
        """Whether the next audit row would be dropped: an audited change is
        then refused (503) before it is made."""

    def start(self) -> None:
        """Start the background writer (again, if it had stopped)."""

    def stop(self) -> None:
        """Stop the background writer, then flush."""

    @property
    def running(self) -> bool:
        """Whether the background writer is alive."""
