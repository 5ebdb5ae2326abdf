"""``Worker``: runs external workflows in this process. It claims jobs
(waiting at the server while idle, a batch for its idle slots, the next job
with each completion), heartbeats them while they run, and completes or
fails them; it stops cleanly on SIGTERM or SIGINT and rides out a server
restart."""

from __future__ import annotations

import collections
import decimal
import json
import logging
import random
import signal
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional

from .client import Client
from .errors import (AuthError, Conflict, LevqorConnectionError, LevqorError,
                     NotFound, ValidationError, unsupported)

log = logging.getLogger("levqor_client.worker")
MAX_CLAIM = 100  # jobs one claim may ask for (max_jobs)
MAX_WAIT = 30    # seconds a claim may wait at the server
MAX_REPORTS = 100  # reports one call may carry


class Permanent(Exception):
    """Raise it from a workflow function to fail the job without a retry."""


class JobContext:
    """What a workflow function knows of its job, beside the payload.

    ``job_id``, ``workflow``, ``attempt`` (1 for the first); ``canceled``
    turns True when a heartbeat says the job was canceled or its lease was
    lost (stop early: the result will be discarded); ``charge(usd)`` adds
    money spent to the running total reported with heartbeats and the
    completion, which starts from what earlier attempts spent (the claim's
    ``cost_spent``): the server's cap covers all of a job's attempts.
    ``step(name, fn, ...)`` runs a step once for the job (see there).
    """

    def __init__(self, job: Mapping[str, Any], client: Optional[Client] = None) -> None:
        self.job_id: str = job["job_id"]
        self.workflow: str = job["workflow"]
        self.attempt: int = job.get("attempt", 1)
        self.lease_token: str = job["lease_token"]
        self.canceled = False
        self.lease_lost = False
        self._earlier = decimal.Decimal(str(job.get("cost_spent") or 0))
        self._spent = decimal.Decimal(0)  # by this attempt
        self._lock = threading.Lock()
        self._client = client
        self._steps: Dict[str, Any] = dict(job.get("steps") or {})  # recorded results by name
        self._seen: set = set()  # step names reached in this run

    def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, run once for this job: its JSON result,
        and what was charged while it ran, are recorded with the job at the
        server before this returns; a later attempt gets the recorded result
        without running ``fn``. So a retry resumes after the last finished
        step and pays for none of them again; the code between steps must
        take the same path on every attempt. An exception fails the attempt
        and records nothing; a name used twice in one run is ``Permanent``."""
        if name in self._seen:
            raise Permanent(f"step {name!r} is used twice in one run: step names must be unique")
        self._seen.add(name)
        if name in self._steps:
            return self._steps[name]
        if self._client is None:
            raise RuntimeError("ctx.step records through the worker's client: this context has none")
        with self._lock:
            before = self._spent
        result = fn(*args, **kwargs)
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise Permanent(f"step {name!r} returned something that is not JSON: {exc}") from None
        with self._lock:
            cost = self._spent - before
        try:
            self._client.record_step(self.job_id, self.lease_token, name, result,
                                     cost=float(cost) if cost else None)
        except Conflict:
            self.lease_lost = self.canceled = True  # the result will be discarded: stop
            raise
        self._steps[name] = result
        return result

    def charge(self, usd: float) -> None:
        """Record ``usd`` dollars spent by this attempt (added, not replaced)."""
        if usd < 0:
            raise ValueError("a charge is not negative")
        with self._lock:
            self._spent += decimal.Decimal(str(usd))

    @property
    def cost(self) -> Optional[float]:
        """The job's running total in dollars across its attempts, or None
        if this attempt charged nothing."""
        with self._lock:
            return float(round(self._earlier + self._spent, 6)) if self._spent else None


Handler = Callable[[Dict[str, Any], JobContext], Any]


class Worker:
    """Runs ``registry`` (workflow name -> ``fn(payload, ctx)``) for the jobs
    Levqor hands out, ``concurrency`` at a time.

    A function's return value (JSON) completes the job; an exception fails
    the attempt as ``"Type: message"``, retried by the server's rules unless
    it is ``Permanent``. Each claim holds a lease of ``lease_seconds``,
    renewed by a heartbeat every third of it.

    An idle slot claims for all the idle slots, as many jobs as there are
    in one call, and waits at the server up to ``claim_wait`` seconds (at
    most 30) for one to arrive, so an idle worker starts a job the moment it
    is queued, holding one request open, not polling; the slot runs the
    first job itself and leaves the rest to the others. A slot that completes
    (or fails) a job claims its next one in the same call, so a busy worker
    makes at most one round trip per job; while jobs return within
    ``FAST``, it also claims up to ``HOLD`` more, held ready with their
    leases renewed, and reports them together (see HOLD). With
    ``claim_wait=0`` an idle worker polls instead, backing off up to
    ``idle_max`` seconds between claims;
    with a server that knows no batched or blocking claims (or no
    ``claim_next``) it claims one job at a time and polls the same way.
    Connection errors (a server restarting) back off the same way and carry
    on.
    """

    # PERF: seconds a report waits for those of the other slots whose jobs
    # started as recently (a job that does little ends within microseconds),
    # so that one call carries them all: with no-op jobs, a worker of 4 slots
    # sent 2 reports a call, 1 and 3 by turns, and now sends 4. Also how long
    # after a claim got jobs the next claim for the slots still idle waits,
    # unless a report is sent first (which claims the next job itself): sent
    # at once, its request competed for the CPU, at both ends, with the
    # job's report, and an idle worker's jobs took 0.7 ms (12 %) longer.
    GATHER = 0.002
    # PERF: a slot whose job returned within FAST asks, with its report, for
    # up to HOLD more jobs than it needs (claim_next's max_jobs) and holds
    # them ready; while one is ready and its last job was fast, a slot leaves
    # its report for a later call and runs that job. So short jobs make one
    # round trip for several, even on one slot. A held job's lease is renewed
    # from the moment it is held; a report left waiting FLUSH seconds (the
    # job after it was slow) is sent by the heartbeat thread. Jobs are held
    # only while no slot is idle: an idle one waits at the server, where held
    # jobs cannot reach it, and they would run one after another.
    FAST = 0.005
    HOLD = 8
    FLUSH = 0.05

    def __init__(self, client: Client, registry: Mapping[str, Handler], concurrency: int = 4, *,
                 lease_seconds: int = 60, idle_max: float = 1.0, grace: float = 30.0,
                 claim_wait: float = 20.0) -> None:
        if not registry:
            raise ValueError("a worker needs at least one workflow")
        if concurrency < 1:
            raise ValueError("concurrency is at least 1")
        if not 0 <= claim_wait <= MAX_WAIT:
            raise ValueError(f"claim_wait is 0 to {MAX_WAIT} seconds")
        self.client = client
        self.registry = dict(registry)
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.idle_max = idle_max
        self.grace = grace
        self.claim_wait = claim_wait
        self.handled = 0            # jobs run and reported (or given up) so far
        self.lost: List[str] = []   # job ids whose lease was lost before the report
        self.error: Optional[LevqorError] = None  # why the worker stopped by itself, if it did
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._work = _LatestIdleFirst(self._lock)  # idle slots wait here for jobs
        self._ready: Deque[Dict[str, Any]] = collections.deque()  # claimed for idle slots
        self._idle = 0              # slots waiting for a job
        self._busy = 0              # slots holding one
        self._claimed = 0           # claims made or in flight, against max_jobs
        self._claiming = False      # a slot is claiming for the idle ones (or pausing after)
        self._pause = 0.05          # before the next claim, after one that got nothing
        self._claim_after = 0.0     # no claim before then, unless a report went (see GATHER)
        self._last_job = time.monotonic()
        self._max_jobs: Optional[int] = None
        self._idle_exit: Optional[float] = None
        self._ended = threading.Event()
        self._slots: List[threading.Thread] = []
        self._beat_every = max(0.2, lease_seconds / 3)
        self._beat_cond = threading.Condition()
        self._beats: Dict[str, Any] = {}  # job id -> (first beat due, [ctx, done, its thread])
        self._batched = True        # until the server refuses max_jobs and wait
        self._chained = True        # until the server refuses claim_next
        self._chain_works = False   # once a report's claim_next was answered: HOLD applies
        self._grouped = True        # until the server has no POST /api/v1/jobs/report
        self._out_cond = threading.Condition()  # reports wait here for the one in flight
        self._outbox: List[_Outgoing] = []  # reports waiting to go together
        self._sending = False       # a slot is sending reports
        self._running: Dict[str, float] = {}  # job id -> when it started, until its report
        self._begun: Dict[str, Any] = {}  # job id -> (ctx, done, beating) of a job held ready

    def stop(self) -> None:
        """Ask the worker to stop: no more claims (a blocking one is ended);
        jobs in hand are finished."""
        self._stopping.set()
        self._interrupt_claim()

    def _interrupt_claim(self) -> None:
        for slot in self._slots:  # only a claiming one has a claim to end
            self.client.interrupt(slot)

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called (or a signal came)."""
        return self._stopping.is_set()

    def run(self, *, max_jobs: Optional[int] = None, idle_exit: Optional[float] = None,
            handle_signals: bool = True) -> int:
        """Work until stopped; the number of jobs handled.

        Stops on ``stop()``, on SIGTERM or SIGINT (when called in the main
        thread and ``handle_signals``), after ``max_jobs`` claims, or once
        nothing was claimed for ``idle_exit`` seconds. Jobs in hand are
        finished and reported, for at most ``grace`` seconds after the stop.
        """
        restore = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, lambda *_: self.stop())
        self._last_job = time.monotonic()
        self._max_jobs, self._idle_exit = max_jobs, idle_exit
        self._ended.clear()
        beats = threading.Thread(target=self._beat_starter, name="levqor-worker-beats", daemon=True)
        slots = [threading.Thread(target=self._slot, name=f"levqor-worker-{i}", daemon=True)
                 for i in range(self.concurrency)]
        try:
            self._slots = slots
            beats.start()
            for t in slots:
                t.start()
            # Wait in short steps so a signal is handled promptly.
            while any(t.is_alive() for t in slots) and not self._stopping.wait(0.2):
                pass
            deadline = time.monotonic() + self.grace
            # A claim sent just as the stop came may have missed its interrupt.
            while self._claiming and self._stopping.is_set() and time.monotonic() < deadline:
                self._interrupt_claim()
                time.sleep(0.05)
            for t in slots:
                t.join(max(0.0, deadline - time.monotonic()))
            left = [t.name for t in slots if t.is_alive()]
            if left:
                log.warning("grace period over with jobs still running in %s", left)
            self._flush_deferred()  # a slot that failed after leaving its report
        finally:
            self._ended.set()
            with self._beat_cond:
                for _, done, _ in self._begun.values():  # held, never run: let their leases lapse
                    done.set()
                self._begun.clear()
                self._beat_cond.notify_all()
            for sig, old in restore.items():
                signal.signal(sig, old)
        beats.join(1.0)
        return self.handled

    # -- claiming: an idle slot's turn, for all the idle ones -----------------

    def _claim_turn(self) -> Optional[Dict[str, Any]]:
        """Claim for the idle slots, this one among them (called by an idle
        slot when no claim is in flight, under the lock, which is let go
        meanwhile): the job this slot runs, the rest left ready for the
        others; None if nothing came, after backing off if need be. PERF:
        the slot that claimed runs the first job, on the thread and the
        connection that got it (the server may still be waiting on that
        connection for the report: KEEPALIVE_LINGER); a claim thread
        handing it to a slot cost 0.2 ms of a 4.3 ms idle round trip, and
        its next claim, sent at once, competed with the job's report."""
        want = self._idle - len(self._ready)
        if self._max_jobs is not None:
            want = min(want, self._max_jobs - self._claimed)
        want = min(want, MAX_CLAIM)
        self._claimed += want
        self._claiming = True
        quiet = None if self._busy else time.monotonic() - self._last_job
        self._lock.release()
        jobs: List[Dict[str, Any]] = []
        try:
            wait = self._wait_for(quiet)
            failed = False
            sent = time.monotonic()
            try:
                if not self._stopping.is_set():
                    jobs = self._claim(list(self.registry), want, wait)
            except AuthError as exc:
                # A key that is refused stays refused: stop, and say why.
                log.error("claim refused: %s", exc)
                self.error = exc
                self.stop()
            except LevqorError as exc:
                failed = True
                if not self._stopping.is_set():
                    log.warning("claim failed: %s", exc)
            except Exception:  # an answer not understood: the slots carry on
                failed = True
                log.exception("claim failed")
            if jobs:
                self._pause = 0.05
            else:
                quiet = None if self._busy else time.monotonic() - self._last_job
                if self._idle_exit is not None and quiet is not None and quiet > self._idle_exit:
                    self.stop()
                # Nothing: a polled claim, a failed one, or a wait the server cut
                # short. Back off (still this slot's turn); a blocking claim that
                # ran its course goes again.
                elif failed or not wait or time.monotonic() - sent < wait * 0.9:
                    self._stopping.wait(self._pause * random.uniform(0.5, 1.0))
                    self._pause = min(self._pause * 2, self.idle_max)
        finally:
            self._lock.acquire()
            self._claimed -= want - len(jobs)
            self._claiming = False
            self._ready.extend(jobs[1:])
            # A slot for each other job and one to claim next, not every idle
            # one only to find none left (nothing: all, to see whether they are done).
            self._work.notify(len(jobs)) if jobs else self._work.notify_all()
        if jobs:
            self._busy += 1
            self._claim_after = time.monotonic() + self.GATHER
            return jobs[0]
        return None

    def _wait_for(self, quiet: Optional[float]) -> float:
        """How long the next claim may wait at the server: ``claim_wait``,
        but never past the moment ``idle_exit`` would stop the worker."""
        if not self._batched or not self.claim_wait:
            return 0.0
        if self._idle_exit is None:
            return self.claim_wait
        return max(0.0, min(self.claim_wait, self._idle_exit - (quiet or 0.0)))

    def _claim(self, workflows: List[str], want: int, wait: float) -> List[Dict[str, Any]]:
        if self._batched:
            try:
                return self.client.claim(workflows, self.lease_seconds, max_jobs=want,
                                         wait=round(wait, 3) if wait > 0 else None)
            except ValidationError as exc:
                if not unsupported(exc, ("max_jobs", "wait")):
                    raise
                log.info("the server claims one job at a time: polling instead")
                self._batched = False
        job = self.client.claim(workflows, self.lease_seconds)
        return [] if job is None else [job]

    # -- one slot: take a job, run it, report it (and claim the next) -------

    def _slot(self) -> None:
        job: Optional[Dict[str, Any]] = None
        while True:
            if job is None:
                job = self._take()
                if job is None:
                    return
            try:
                job = self._after(*self._execute(job))
            except Exception:  # the slot outlives any one job's surprise
                log.exception("job %s: the worker failed to run or report it", job.get("job_id"))
                job = None
            finally:
                with self._lock:
                    self.handled += 1
                    self._last_job = time.monotonic()
                    if job is None:
                        self._busy -= 1

    def _take(self) -> Optional[Dict[str, Any]]:
        """The next job for this slot: one claimed for it, or, when no claim
        is in flight, its own claim's first; None once no more will come
        (stopping, or ``max_jobs`` claimed)."""
        with self._lock:
            self._idle += 1
            idle_since = time.monotonic()
            try:
                while True:
                    if self._ready:
                        self._busy += 1
                        return self._ready.popleft()
                    done = self._stopping.is_set() or self._ended.is_set() or (
                        self._max_jobs is not None and self._claimed >= self._max_jobs)
                    if done and not self._claiming:
                        return None
                    if not done and not self._claiming:
                        hold = self._claim_after - time.monotonic()
                        if hold <= 0:
                            job = self._claim_turn()
                            if job is not None:
                                return job
                            continue
                        self._work.wait(hold, idle_since)
                        continue
                    self._work.wait(0.2, idle_since)
            finally:
                self._idle -= 1

    def _reserve_next(self) -> bool:
        """Whether a completion may claim the next job (counted if so)."""
        with self._lock:
            if not self._chained or self._stopping.is_set() or (
                    self._max_jobs is not None and self._claimed >= self._max_jobs):
                return False
            self._claimed += 1
            return True

    def _unreserve(self) -> None:
        with self._lock:
            self._claimed -= 1
            self._work.notify()  # under max_jobs, there may be a claim to make

    def _begin(self, job: Dict[str, Any]) -> Any:
        """The job's context, and its heartbeat's ``done`` and entry, from now
        on: _beat_starter starts its heartbeat thread once the first beat is
        due (a job done sooner never has one)."""
        ctx = JobContext(job, self.client)
        done = threading.Event()
        beating: List[Any] = [ctx, done, None]
        with self._beat_cond:
            self._beats[ctx.job_id] = (time.monotonic() + self._beat_every, beating)
            self._beat_cond.notify()
        return ctx, done, beating

    def _hold(self, jobs: List[Dict[str, Any]]) -> None:
        """Jobs claimed ahead: ready for any slot, their leases renewed meanwhile."""
        begun = [(job["job_id"], self._begin(job)) for job in jobs]
        with self._beat_cond:
            self._begun.update(begun)
        with self._lock:
            self._ready.extend(jobs)
            self._work.notify(len(jobs))

    def _execute(self, job: Dict[str, Any]) -> Any:
        """Run one job: (its context, its outcome, whether it was fast)."""
        with self._beat_cond:
            begun = self._begun.pop(job["job_id"], None)
        ctx, done, beating = begun or self._begin(job)
        fn = self.registry[job["workflow"]]
        started = time.monotonic()
        with self._out_cond:
            self._running[ctx.job_id] = started
        try:
            result = fn(job.get("payload") or {}, ctx)
        except Permanent as exc:
            outcome = ("fail", f"{type(exc).__name__}: {exc}", False)
        except Exception as exc:  # any failure of the function fails the attempt
            outcome = ("fail", f"{type(exc).__name__}: {exc}", True)
        else:
            try:
                json.dumps(result, allow_nan=False)
                outcome = ("complete", result, None)
            except (TypeError, ValueError) as exc:
                outcome = ("fail", f"the result is not JSON: {exc}", False)
        finally:
            done.set()
            with self._beat_cond:
                self._beats.pop(ctx.job_id, None)
                beat = beating[2]
            if beat is not None:
                beat.join()
        return ctx, outcome, time.monotonic() - started < self.FAST

    def _after(self, ctx: JobContext, outcome: Any, fast: bool) -> Optional[Dict[str, Any]]:
        """Report the outcome, or leave it for a later call (see HOLD): the
        slot's next job, or None."""
        if fast and len(self._outbox) < self.HOLD:
            with self._lock:
                held = self._ready.popleft() if self._ready else None
            if held is not None:
                entry = _Outgoing(ctx, outcome, deferred=True)
                with self._out_cond:
                    self._outbox.append(entry)
                    self._running.pop(ctx.job_id, None)
                    self._out_cond.notify_all()
                with self._beat_cond:
                    self._beat_cond.notify()  # to send it, should nobody within FLUSH
                return held
        return self._report(ctx, outcome, self.HOLD if fast and self._chain_works else 0)

    def _beat_starter(self) -> None:
        """Start a job's heartbeat thread when its first beat is due. PERF: a
        thread started and joined for every job cost a worker about 180 us
        a job, as much as its own share of the report's round trip."""
        with self._beat_cond:
            while not self._ended.is_set():
                now = time.monotonic()
                pending = []
                for due, beating in self._beats.values():
                    if beating[2] is not None:
                        continue
                    if due > now:
                        pending.append(due)
                        continue
                    beating[2] = threading.Thread(target=self._heartbeat, args=(*beating[:2], 0.0),
                                                  name="levqor-worker-beat", daemon=True)
                    beating[2].start()
                with self._out_cond:
                    left = [e.since + self.FLUSH for e in self._outbox if e.deferred]
                if left and min(left) <= now:
                    threading.Thread(target=self._flush_deferred, name="levqor-worker-flush",
                                     daemon=True).start()
                    left = [now + self.FLUSH]
                self._beat_cond.wait(min(1.0, min(pending + left, default=now + 1.0) - now))

    def _heartbeat(self, ctx: JobContext, done: threading.Event, first: Optional[float] = None) -> None:
        """Renew the lease every third of it until ``done`` (the first time
        after ``first`` seconds); a failed beat is tried again sooner, while
        the lease may still be saved."""
        every = self._beat_every
        wait = every if first is None else first
        while not done.wait(wait):
            try:
                answer = self.client.heartbeat(ctx.job_id, ctx.lease_token, cost=ctx.cost)
            except Conflict as exc:
                ctx.canceled = ctx.lease_lost = True
                log.warning("job %s: heartbeat refused (%s); stopping it", ctx.job_id, exc.code)
                return
            except LevqorError as exc:
                log.warning("job %s: heartbeat failed: %s", ctx.job_id, exc)
                wait = min(every, 1.0)
                continue
            if answer.get("cancel_requested"):
                ctx.canceled = True
            wait = every

    def _report(self, ctx: JobContext, outcome: Any, prefetch: int = 0) -> Optional[Dict[str, Any]]:
        """Complete or fail the job, claiming the next job in the same call
        when it may (and ``prefetch`` more, held ready): the next job, or
        None. PERF: the reports of slots that finish while another slot's
        are in flight wait for them, then go together in one call, sent by
        the first of them to get there (a busy worker's slots make a round
        trip between them, not one each)."""
        mine = _Outgoing(ctx, outcome)
        with self._out_cond:
            self._outbox.append(mine)
            self._running.pop(ctx.job_id, None)
            self._out_cond.notify_all()
            while not mine.sent:
                if self._sending:
                    self._out_cond.wait()
                    continue
                # Jobs that started within GATHER (or were just handed to a
                # slot) may be about to end: wait for their reports, until
                # each has run that long. (Older ones are forgotten here.)
                now = time.monotonic()
                for job_id in [j for j, t in self._running.items() if now - t >= self.GATHER]:
                    del self._running[job_id]
                if not self._running:
                    break
                self._out_cond.wait(max(self._running.values()) + self.GATHER - now)
            if mine.sent:  # it went with another slot's
                return mine.following
            batch = self._take_outbox(mine)
        self._send(batch, prefetch)
        return mine.following

    def _take_outbox(self, mine: Optional[_Outgoing] = None) -> List[_Outgoing]:
        """The reports to send now (at most MAX_REPORTS, ``mine`` among
        them), as the one sending (under _out_cond)."""
        self._sending = True
        batch = self._outbox[:MAX_REPORTS]
        if mine is not None and mine not in batch:
            batch[-1] = mine
        self._outbox = [e for e in self._outbox if e not in batch]
        return batch

    def _flush_deferred(self) -> None:
        """Send the reports left for a later call, unless a send is under way."""
        with self._out_cond:
            if self._sending or not any(e.deferred for e in self._outbox):
                return
            batch = self._take_outbox()
        self._send(batch, 0)

    def _send(self, batch: List[_Outgoing], prefetch: int) -> None:
        """Send ``batch`` (taken with _take_outbox), then let the next go."""
        if self._idle:  # see HOLD; no slot turns idle while this is in flight,
            prefetch = 0  # for one does so only once its own report is answered
        try:
            if not self._grouped or (len(batch) == 1 and not prefetch):
                for entry in batch:
                    entry.following = self._report_one(entry.ctx, entry.outcome, not entry.deferred)
            else:
                self._report_together(batch, prefetch)
        finally:
            with self._out_cond:
                now = time.monotonic()
                for entry in batch:
                    entry.sent = True
                    if entry.following is not None:  # its slot runs it next
                        self._running[entry.following["job_id"]] = now
                self._sending = False
                self._out_cond.notify_all()
            with self._lock:  # the next claim need wait no longer (GATHER)
                if self._claim_after:
                    self._claim_after = 0.0
                    self._work.notify()

    def _report_together(self, batch: List[_Outgoing], prefetch: int = 0) -> None:
        """Send ``batch``'s reports in one call (POST /api/v1/jobs/report),
        with a next job claimed for each slot waiting on its report that may
        take one, as ``_report_one`` does for one, and ``prefetch`` more,
        held ready."""
        for entry in [e for e in batch if e.ctx.lease_lost]:
            batch.remove(entry)
            self._lost(entry.ctx, "the lease was lost while the job ran; result dropped")
        waiting = [e for e in batch if not e.deferred]
        chain = sum(self._reserve_next() for _ in range(min(MAX_CLAIM, len(waiting) + prefetch)))
        give_up = time.monotonic() + self.lease_seconds
        pause = 0.1
        following: List[Dict[str, Any]] = []
        try:
            while batch:
                ask = ({"workflows": list(self.registry), "lease_seconds": self.lease_seconds}
                       if chain else None)
                try:
                    answer = self.client.report_many([e.body() for e in batch], claim_next=ask,
                                                     max_jobs=chain or None)
                except NotFound:
                    log.info("the server takes reports one at a time")
                    self._grouped = False
                    for entry in batch:
                        entry.following = self._report_one(entry.ctx, entry.outcome, not entry.deferred)
                    return
                except LevqorConnectionError as exc:
                    if time.monotonic() + pause > give_up:
                        for entry in batch:
                            self._lost(entry.ctx, f"could not report ({exc}); the lease will run out")
                        return
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                except LevqorError as exc:
                    log.error("reports of %s refused: %s", [e.ctx.job_id for e in batch], exc)
                    return
                outcomes, following = answer if chain else (answer, [])
                self._chain_works = self._chain_works or bool(chain)
                for entry, outcome in zip(batch, outcomes):
                    if outcome.get("error") == "lease_lost":
                        self._lost(entry.ctx, f"{entry.outcome[0]} refused (lease_lost); result dropped")
                    elif "error" in outcome:
                        log.error("job %s: %s refused: %s", entry.ctx.job_id, entry.outcome[0],
                                  outcome.get("message"))
                    else:
                        log.info("job %s: %s", entry.ctx.job_id, outcome["status"])
                for entry, job in zip(waiting, following):
                    entry.following = job
                if following[len(waiting):]:
                    self._hold(following[len(waiting):])
                return
        finally:
            for _ in range(chain - len(following)):
                self._unreserve()

    def _lost(self, ctx: JobContext, why: str) -> None:
        """A job whose result could not be reported (``worker.lost``)."""
        with self._lock:
            self.lost.append(ctx.job_id)
        log.warning("job %s: %s", ctx.job_id, why)

    def _report_one(self, ctx: JobContext, outcome: Any, claim: bool = True) -> Optional[Dict[str, Any]]:
        """Complete or fail the job (claiming the next job in the same call
        when it may); through a server restart, keep trying while the lease may
        still hold (after that the server hands the job to someone else and
        this result is not wanted). The next job, or None."""
        action, value, retryable = outcome
        give_up = time.monotonic() + self.lease_seconds
        pause = 0.1
        chain = claim and self._reserve_next()
        following: Optional[Dict[str, Any]] = None
        try:
            while True:
                try:
                    if ctx.lease_lost:
                        raise Conflict("the lease was lost while the job ran", code="lease_lost",
                                       status=409)
                    ask = ({"workflows": list(self.registry), "lease_seconds": self.lease_seconds}
                           if chain else None)
                    if action == "complete":
                        final = self.client.complete(ctx.job_id, ctx.lease_token, value,
                                                     cost=ctx.cost, claim_next=ask)
                    else:
                        final = self.client.fail(ctx.job_id, ctx.lease_token, value,
                                                 retryable=bool(retryable), cost=ctx.cost,
                                                 claim_next=ask)
                    if chain:
                        final, following = final
                        self._chain_works = True
                except Conflict as exc:
                    self._lost(ctx, f"{action} refused ({exc.code}); result dropped")
                    return None
                except LevqorConnectionError as exc:
                    if time.monotonic() + pause > give_up:
                        self._lost(ctx, f"could not report ({exc}); the lease will run out")
                        return None
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                except ValidationError as exc:
                    if chain and unsupported(exc, ("claim_next",)):
                        log.info("the server does not claim with a report: claiming apart")
                        self._chained = chain = False
                        self._unreserve()
                        continue
                    log.error("job %s: %s refused: %s", ctx.job_id, action, exc)
                    return None
                except LevqorError as exc:
                    log.error("job %s: %s refused: %s", ctx.job_id, action, exc)
                    return None
                log.info("job %s: %s", ctx.job_id, final.status)
                return following
        finally:
            if chain and following is None:
                self._unreserve()


class _LatestIdleFirst:
    """Where idle slots wait for jobs (a condition on the worker's lock):
    ``notify(n)`` wakes the n slots idle for the shortest time, not the
    longest waiting as a Condition would. PERF: that slot's thread, and its
    connection, were used last: the server may still be waiting on that
    connection for its next request (KEEPALIVE_LINGER), which spares a
    hand-off between the server's threads. With slots taken in turn, an
    idle worker of 4 slots reported each job on a connection idle for four
    jobs' time."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._sleepers: List[Any] = []  # [idle since, its condition], of slots waiting

    def wait(self, timeout: float, idle_since: float) -> None:
        """Wait (holding the lock) until notified or ``timeout`` passes."""
        sleeper = [idle_since, threading.Condition(self._lock)]
        self._sleepers.append(sleeper)
        try:
            sleeper[1].wait(timeout)
        finally:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    def notify(self, n: int = 1) -> None:
        self._sleepers.sort(key=lambda sleeper: sleeper[0])
        for _ in range(min(n, len(self._sleepers))):
            self._sleepers.pop()[1].notify()

    def notify_all(self) -> None:
        self.notify(len(self._sleepers))


class _Outgoing:
    """A slot's report, waiting to be sent with others (Worker._report)."""

    __slots__ = ("ctx", "outcome", "sent", "following", "deferred", "since")

    def __init__(self, ctx: JobContext, outcome: Any, deferred: bool = False) -> None:
        self.ctx, self.outcome = ctx, outcome
        self.deferred = deferred  # its slot went on to another job (Worker._after)
        self.since = time.monotonic()
        self.sent = False
        self.following: Optional[Dict[str, Any]] = None  # the next job claimed for its slot

    def body(self) -> Dict[str, Any]:
        """Its entry in a POST /api/v1/jobs/report."""
        action, value, retryable = self.outcome
        body: Dict[str, Any] = {"job_id": self.ctx.job_id, "lease_token": self.ctx.lease_token}
        if action == "complete":
            body["result"] = value
        else:
            body.update(error=value[:1000] or "error", retryable=bool(retryable))
        if self.ctx.cost is not None:
            body["cost"] = self.ctx.cost
        return body
