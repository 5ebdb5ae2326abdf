"""``Worker``: runs external workflows in this process. It claims jobs,
heartbeats them while they run, and completes or fails them; it stops
cleanly on SIGTERM or SIGINT and rides out a server restart."""

from __future__ import annotations

import decimal
import json
import logging
import random
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from .client import Client
from .errors import AuthError, Conflict, LevqorConnectionError, LevqorError

log = logging.getLogger("levqor_client.worker")


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
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job_id: str = job["job_id"]
        self.workflow: str = job["workflow"]
        self.attempt: int = job.get("attempt", 1)
        self.lease_token: str = job["lease_token"]
        self.canceled = False
        self.lease_lost = False
        self._earlier = decimal.Decimal(str(job.get("cost_spent") or 0))
        self._spent = decimal.Decimal(0)  # by this attempt
        self._lock = threading.Lock()

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
    renewed by a heartbeat every third of it. With nothing to do a slot
    backs off up to ``idle_max`` seconds between claims; connection errors
    (a server restarting) back off the same way and carry on.
    """

    def __init__(self, client: Client, registry: Mapping[str, Handler], concurrency: int = 4, *,
                 lease_seconds: int = 60, idle_max: float = 1.0, grace: float = 30.0) -> None:
        if not registry:
            raise ValueError("a worker needs at least one workflow")
        if concurrency < 1:
            raise ValueError("concurrency is at least 1")
        self.client = client
        self.registry = dict(registry)
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.idle_max = idle_max
        self.grace = grace
        self.handled = 0            # jobs run and reported (or given up) so far
        self.lost: List[str] = []   # job ids whose lease was lost before the report
        self.error: Optional[LevqorError] = None  # why the worker stopped by itself, if it did
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._claimed = 0
        self._busy = 0
        self._last_job = time.monotonic()

    def stop(self) -> None:
        """Ask the worker to stop: no more claims; jobs in hand are finished."""
        self._stopping.set()

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
        slots = [threading.Thread(target=self._slot, args=(max_jobs, idle_exit),
                                  name=f"levqor-worker-{i}", daemon=True)
                 for i in range(self.concurrency)]
        try:
            for t in slots:
                t.start()
            # Wait in short steps so a signal is handled promptly.
            while any(t.is_alive() for t in slots) and not self._stopping.wait(0.2):
                pass
            deadline = time.monotonic() + self.grace
            for t in slots:
                t.join(max(0.0, deadline - time.monotonic()))
            left = [t.name for t in slots if t.is_alive()]
            if left:
                log.warning("grace period over with jobs still running in %s", left)
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)
        return self.handled

    # -- one slot: claim, run, report, again --------------------------------

    def _slot(self, max_jobs: Optional[int], idle_exit: Optional[float]) -> None:
        idle = 0.05
        while not self._stopping.is_set():
            with self._lock:
                if max_jobs is not None and self._claimed >= max_jobs:
                    return
                self._claimed += 1
                self._busy += 1
            try:
                job = self.client.claim(list(self.registry), self.lease_seconds)
            except AuthError as exc:
                # A key that is refused stays refused: stop, and say why.
                log.error("claim refused: %s", exc)
                self.error = exc
                self.stop()
                job = None
            except LevqorError as exc:
                job = None
                log.warning("claim failed: %s", exc)
            if job is None:
                with self._lock:
                    self._claimed -= 1
                    self._busy -= 1
                    quiet_for = None if self._busy else time.monotonic() - self._last_job
                if idle_exit is not None and quiet_for is not None and quiet_for > idle_exit:
                    self.stop()
                    return
                self._stopping.wait(idle * random.uniform(0.5, 1.0))
                idle = min(idle * 2, self.idle_max)
                continue
            idle = 0.05
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._busy -= 1
                    self.handled += 1
                    self._last_job = time.monotonic()

    def _run(self, job: Dict[str, Any]) -> None:
        ctx = JobContext(job)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, done), daemon=True)
        beat.start()
        fn = self.registry[job["workflow"]]
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
            beat.join()
        self._report(ctx, outcome)

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        """Renew the lease every third of it until ``done``; a failed beat is
        tried again sooner, while the lease may still be saved."""
        every = max(0.2, self.lease_seconds / 3)
        wait = every
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

    def _report(self, ctx: JobContext, outcome: Any) -> None:
        """Complete or fail the job; through a server restart, keep trying
        while the lease may still hold (after that the server hands the
        job to someone else and this result is not wanted)."""
        action, value, retryable = outcome
        give_up = time.monotonic() + self.lease_seconds
        pause = 0.1
        while True:
            try:
                if ctx.lease_lost:
                    raise Conflict("the lease was lost while the job ran", code="lease_lost",
                                   status=409)
                if action == "complete":
                    final = self.client.complete(ctx.job_id, ctx.lease_token, value, cost=ctx.cost)
                else:
                    final = self.client.fail(ctx.job_id, ctx.lease_token, value,
                                             retryable=bool(retryable), cost=ctx.cost)
            except Conflict as exc:
                with self._lock:
                    self.lost.append(ctx.job_id)
                log.warning("job %s: %s refused (%s); result dropped", ctx.job_id, action, exc.code)
                return
            except LevqorConnectionError as exc:
                if time.monotonic() + pause > give_up:
                    with self._lock:
                        self.lost.append(ctx.job_id)
                    log.warning("job %s: could not report (%s); the lease will run out",
                                ctx.job_id, exc)
                    return
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            except LevqorError as exc:
                log.error("job %s: %s refused: %s", ctx.job_id, action, exc)
                return
            log.info("job %s: %s", ctx.job_id, final.status)
            return
