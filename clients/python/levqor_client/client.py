"""``Client``: Levqor's HTTP API over keep-alive connections, with bounded
retries; ``Job``: what the status view says of a job."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import LevqorConnectionError, LevqorError, ValidationError, error_for, unsupported

FINAL = ("succeeded", "failed", "canceled")
DEFAULT_URL = "http://127.0.0.1:5000"
BATCH_MAX = 1000  # jobs in one POST /api/v1/intake/batch
_SUBMIT_FIELDS = {"workflow", "payload", "priority", "callback_url", "max_cost", "idempotency_key",
                  "run_at", "delay", "depends_on", "concurrency_key"}


_JOB_FIELDS: set = set()  # Job's field names but raw, once known


@dataclasses.dataclass
class Job:
    """A job as the status view shows it. Fields the answer did not carry
    are None (intake answers only ``job_id`` and ``status``); ``raw`` is the
    answer itself."""

    job_id: str
    status: str
    workflow: Optional[str] = None
    priority: Optional[str] = None
    attempts: Optional[int] = None
    max_attempts: Optional[int] = None
    created_at: Optional[float] = None
    updated_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    progress: Any = None
    result: Any = None
    error: Any = None
    cost: Optional[Dict[str, Any]] = None
    callback: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Job":
        """A Job from a status view (unknown fields stay in ``raw`` only)."""
        if not _JOB_FIELDS:
            _JOB_FIELDS.update(f.name for f in dataclasses.fields(cls) if f.name != "raw")
        return cls(**{k: v for k, v in data.items() if k in _JOB_FIELDS}, raw=dict(data))

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or canceled."""
        return self.status in FINAL

    @property
    def ok(self) -> bool:
        """True if the job succeeded."""
        return self.status == "succeeded"


class Client:
    """Levqor's HTTP API.

    ``base_url`` and ``api_key`` default to the ``LEVQOR_URL`` and
    ``LEVQOR_API_KEY`` environment variables. Each thread keeps one
    keep-alive connection; every call has a ``timeout`` in seconds.

    Connection errors, 429 and 503 are retried with jittered exponential
    backoff, waiting at least the answer's ``Retry-After``, at most
    ``max_retries`` times and never past ``retry_time`` seconds in all. A
    request that may have acted before its connection broke is retried only
    when sending it twice is harmless; intake is made so by an
    ``Idempotency-Key`` (a fresh uuid when the caller gives none).
    ``retries`` counts the requests sent again, for logs and tests.
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 10, *, max_retries: int = 4, retry_time: float = 30) -> None:
        url = (base_url or os.environ.get("LEVQOR_URL") or DEFAULT_URL).rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http or https URL, not {url!r}")
        self.base_url = url
        self.api_key = api_key if api_key is not None else os.environ.get("LEVQOR_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_time = retry_time
        self.retries = 0
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path
        self._local = threading.local()
        self._held: Dict[int, _Connection] = {}  # thread -> its waiting claim's connection
        self._held_lock = threading.RLock()  # a signal handler's stop may come in it
        self._batch_keys = True  # until the server refuses a batch's own idempotency_key

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    # -- jobs ----------------------------------------------------------------

    def submit(self, workflow: str, payload: Mapping[str, Any], *, priority: Optional[str] = None,
               callback_url: Optional[str] = None, max_cost: Optional[float] = None,
               idempotency_key: Optional[str] = None, run_at: Optional[float] = None,
               delay: Optional[float] = None, depends_on: Optional[Sequence[str]] = None,
               concurrency_key: Optional[str] = None) -> Job:
        """Submit a job; its ``Job`` (``job_id``, ``status`` queued).

        Only the fields given are sent. ``run_at``, ``delay``, ``depends_on``
        and ``concurrency_key`` are passed through for servers that know
        them; this server answers them 400 ``validation_failed`` today. The
        same ``idempotency_key`` and body within 24 hours give the first
        job back; without one a uuid is used, so a retry never makes two.
        """
        body = _intake_body(workflow, payload, priority=priority, callback_url=callback_url,
                            max_cost=max_cost, run_at=run_at, delay=delay, depends_on=depends_on,
                            concurrency_key=concurrency_key)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return Job.from_dict(self.request("POST", "/api/v1/intake", body, headers=headers))

    def submit_many(self, jobs: Sequence[Mapping[str, Any]], *, idempotent: bool = True,
                    batch_size: int = BATCH_MAX) -> List[Job]:
        """Submit many jobs in few calls: each item of ``jobs`` is a dict of
        ``submit``'s arguments (``{"workflow": ..., "payload": ..., "priority":
        ...}``). A ``Job`` for each (``job_id``, ``status``), in order.

        Sent ``batch_size`` (at most 1000) to a ``POST /api/v1/intake/batch``,
        each batch accepted or refused whole. With ``idempotent`` (the
        default) each batch is sent with a random key of its own (one record
        at the server for the lot), so a batch whose connection broke is
        sent again without making any job twice. Jobs given an
        ``idempotency_key`` keep it, and then the others of their batch get
        one each, as they do from a server without batch keys. With
        ``idempotent=False`` only such jobs have keys, and a batch is not
        sent again after a broken connection unless all of its jobs do. A
        refused batch raises its error with two more attributes:
        ``accepted``, the jobs of the batches before it (made), and
        ``index``, the position in ``jobs`` of the first job refused (None
        if the answer names none).
        """
        if not 1 <= batch_size <= BATCH_MAX:
            raise ValueError(f"batch_size is 1 to {BATCH_MAX}")
        bodies = []
        for i, spec in enumerate(jobs):
            unknown = set(spec) - _SUBMIT_FIELDS
            if unknown or "workflow" not in spec or "payload" not in spec:
                raise TypeError(f"jobs[{i}]: a job is a dict of submit's arguments (workflow, "
                                f"payload, ...); {sorted(unknown) or 'workflow and payload are required'}")
            fields = dict(spec)
            key = fields.pop("idempotency_key", None)
            body = _intake_body(fields.pop("workflow"), fields.pop("payload"), **fields)
            if key is not None:
                body["idempotency_key"] = key
            bodies.append(body)
        made: List[Job] = []
        for start in range(0, len(bodies), batch_size):
            chunk = bodies[start:start + batch_size]
            try:
                answer = self._submit_batch(chunk, idempotent)
            except LevqorError as exc:
                exc.accepted = list(made)  # type: ignore[attr-defined]
                exc.index = _batch_index(exc.body, start)  # type: ignore[attr-defined]
                raise
            if len(answer["jobs"]) != len(chunk):
                raise LevqorError(f"a batch of {len(chunk)} jobs was answered with "
                                  f"{len(answer['jobs'])}", code="invalid_answer")
            made += [Job.from_dict(item) for item in answer["jobs"]]
        return made

    def _submit_batch(self, chunk: List[Dict[str, Any]], idempotent: bool) -> Any:
        """One ``POST /api/v1/intake/batch``: its answer."""
        if idempotent and self._batch_keys and not any("idempotency_key" in b for b in chunk):
            try:  # PERF: one key for the batch, not one a job (a digest, a lookup and a row each)
                return self.request("POST", "/api/v1/intake/batch",
                                    {"jobs": chunk, "idempotency_key": os.urandom(16).hex()},
                                    retry_unsure=True)
            except ValidationError as exc:
                if not unsupported(exc, ("idempotency_key",)):
                    raise
                self._batch_keys = False  # an older server: a key for each job instead
        if idempotent:
            fresh = os.urandom(16 * len(chunk))  # PERF: one read (a uuid4 each cost 2 µs)
            chunk = [b if "idempotency_key" in b else
                     dict(b, idempotency_key=fresh[16 * i:16 * i + 16].hex()) for i, b in enumerate(chunk)]
        return self.request("POST", "/api/v1/intake/batch", {"jobs": chunk},
                            retry_unsure=all("idempotency_key" in b for b in chunk))

    def get(self, job_id: str, *, wait: int = 0) -> Job:
        """The job's status view; with ``wait`` (whole seconds, up to 30)
        the server holds the answer until the job has ended or the wait is
        over."""
        query = f"?wait={int(wait)}" if wait else ""
        return Job.from_dict(self.request("GET", f"/api/v1/status/{_seg(job_id)}{query}"))

    def wait(self, job_id: str, timeout: float = 60, *, poll_max: float = 1.0,
             on_poll: Any = None) -> Job:
        """Wait until the job is finished; the final ``Job``.

        Each call asks the server to hold its answer until the job ends (up
        to 30 s, or what is left of ``timeout``); one answered early with the
        job unfinished (the server had no room to wait) is followed by
        another after a pause that grows to ``poll_max`` seconds. Raises
        ``TimeoutError`` if the job is not finished within ``timeout``
        seconds. ``on_poll(job)``, if given, sees every answer.
        """
        deadline = time.monotonic() + timeout
        step = 0.05
        while True:
            hold = max(0, min(30, int(deadline - time.monotonic())))
            asked = time.monotonic()
            job = self.get(job_id, wait=hold)
            if on_poll is not None:
                on_poll(job)
            if job.done:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            if time.monotonic() - asked < hold / 2 or not hold:  # not held: pause first
                time.sleep(min(step, left))
                step = min(step * 2, poll_max)

    def jobs(self, *, status: Optional[str] = None, workflow: Optional[str] = None,
             limit: Optional[int] = None, page_size: int = 100) -> Iterator[Job]:
        """The caller's jobs, newest first, following every page's cursor;
        at most ``limit`` of them when given."""
        query: Dict[str, Any] = {"status": status, "workflow": workflow}
        seen = 0
        cursor = None
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - seen))
            page = self.request("GET", "/api/v1/jobs", query={**query, "limit": size,
                                                               "cursor": cursor})
            for item in page["jobs"]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Job.from_dict(item)
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and seen >= limit):
                return

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (at once if queued; a running one is flagged). 409
        ``Conflict`` if it has already finished."""
        return self._job_post(job_id, "cancel")

    def retry(self, job_id: str) -> Job:
        """Queue a failed or canceled job again; 409 ``Conflict`` otherwise."""
        return self._job_post(job_id, "retry")

    def redeliver(self, job_id: str) -> Job:
        """Send a finished job's callback again, as a new event."""
        return self._job_post(job_id, "callback/redeliver")

    def _job_post(self, job_id: str, action: str) -> Job:
        # Not sent again after a broken connection: a second cancel or retry
        # of one that acted would answer 409 and hide that it did.
        answer = self.request("POST", f"/api/v1/jobs/{_seg(job_id)}/{action}", {})
        return Job.from_dict(answer["job"])

    # -- money and keys ------------------------------------------------------

    def usage(self, *, start: Optional[str] = None, end: Optional[str] = None,
              group_by: Optional[str] = None) -> Dict[str, Any]:
        """Spend, reserved money and job counts per day, workflow, key or
        step, from ``start`` to ``end`` (``YYYY-MM-DD``, UTC; default today)."""
        return self.request("GET", "/api/v1/usage",
                            query={"from": start, "to": end, "group_by": group_by})

    def create_key(self, name: str, role: str = "client", *, daily_budget: Optional[float] = None,
                   rate_per_minute: Optional[int] = None,
                   workflows: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Make a managed key (admin only); the answer's ``key`` is shown once."""
        body: Dict[str, Any] = {"name": name, "role": role}
        optional = {"daily_budget": daily_budget, "rate_per_minute": rate_per_minute,
                    "workflows": list(workflows) if workflows is not None else None}
        body.update({k: v for k, v in optional.items() if v is not None})
        return self.request("POST", "/api/v1/keys", body)

    def keys(self) -> List[Dict[str, Any]]:
        """Every managed key, without secrets (admin only)."""
        return self.request("GET", "/api/v1/keys")["keys"]

    def revoke_key(self, key_id: str) -> Dict[str, Any]:
        """Revoke a managed key from its next request on (admin only)."""
        return self.request("DELETE", f"/api/v1/keys/{_seg(key_id)}")

    def health(self) -> Dict[str, Any]:
        """``GET /health``: ``{"ok": true, "ts"}`` while the service answers."""
        return self.request("GET", "/health")

    # -- external workers ----------------------------------------------------

    def claim(self, workflows: Sequence[str], lease_seconds: Optional[int] = None, *,
              max_jobs: Optional[int] = None, wait: Optional[float] = None) -> Any:
        """Claim a job of one of ``workflows``: ``{job_id, workflow, payload,
        attempt, lease_token, lease_expires_at, ...}``, or None if none waits.

        With ``max_jobs`` (1 to 100), up to that many at once: a list,
        empty if none waits. With ``wait`` (seconds, 0 to 30), the server
        holds the request until a job arrives or the wait ends, so an idle
        worker hears of a job the moment it is queued; this request's
        timeout is the client's plus the wait, and ``interrupt`` ends it
        early from another thread. Not sent again after a broken connection
        (a claim that was made would be lost until its lease ran out)."""
        body: Dict[str, Any] = {"workflows": list(workflows)}
        optional = {"lease_seconds": lease_seconds, "max_jobs": max_jobs, "wait": wait}
        body.update({k: v for k, v in optional.items() if v is not None})
        answer = self.request("POST", "/api/v1/jobs/claim", body, retry_unsure=False,
                              timeout=self.timeout + (wait or 0), interruptible=bool(wait))
        if max_jobs is None:
            return None if answer is None else answer["job"]
        if answer is None:
            return []
        # A server that does not batch answers one job, as without max_jobs.
        return list(answer["jobs"]) if "jobs" in answer else [answer["job"]]

    # Seconds a claim asked to end has to answer before its connection is cut.
    INTERRUPT_GRACE = 2.0

    def interrupt(self, thread: Optional[threading.Thread] = None) -> int:
        """End the blocking claims (``wait``) in flight on this client, those
        of ``thread`` only when given; how many.

        A claim's connection is half-closed: the server hears its caller
        hang up, ends the wait and answers with what it has, so the claim
        returns at once with nothing, or with the jobs the server handed
        out at that very moment (cutting the connection instead lost them
        until their leases ran out). Over TLS, and on a call made
        ``INTERRUPT_GRACE`` seconds after the first (a server that cannot
        tell a hang-up), the connection is cut: the claim raises
        ``LevqorConnectionError``, and a job handed out at that moment goes
        to another worker when its lease runs out."""
        with self._held_lock:
            held = [conn for ident, conn in self._held.items()
                    if thread is None or ident == thread.ident]
        ended = 0
        for conn in held:
            sock, now = conn.sock, time.monotonic()
            if sock is None:
                continue
            if conn.interrupted is None:
                conn.interrupted = now
                how = socket.SHUT_RDWR if conn.https else socket.SHUT_WR
            elif now - conn.interrupted >= self.INTERRUPT_GRACE:
                how = socket.SHUT_RDWR
            else:
                ended += 1  # asked already: its answer is on the way
                continue
            try:
                sock.shutdown(how)
                ended += 1
            except OSError:
                pass
        return ended

    def heartbeat(self, job_id: str, lease_token: str, *, lease_seconds: Optional[int] = None,
                  cost: Optional[float] = None,
                  progress: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Extend a claimed job's lease: ``{lease_expires_at, cancel_requested}``.
        ``cost`` is the job's running total in dollars; 409 ``Conflict``
        (``lease_lost``) if the lease is no longer this worker's."""
        body: Dict[str, Any] = {"lease_token": lease_token}
        optional = {"lease_seconds": lease_seconds, "cost": cost,
                    "progress": dict(progress) if progress is not None else None}
        body.update({k: v for k, v in optional.items() if v is not None})
        return self.request("POST", f"/api/v1/jobs/{_seg(job_id)}/heartbeat", body,
                            retry_unsure=True)

    def complete(self, job_id: str, lease_token: str, result: Any, *,
                 cost: Optional[float] = None, claim_next: Any = None) -> Any:
        """Report a claimed job done with ``result`` (JSON) and its total cost:
        the finished ``Job``.

        With ``claim_next`` (a list of workflows, or ``{"workflows": [...],
        "lease_seconds": n}``) the same call claims the next job, so a busy
        worker makes one round trip per job: then ``(job, next)``, where
        ``next`` is a claim's job or None if none waits. A completion whose
        connection broke is sent again (the second is answered 409
        ``lease_lost`` if the first arrived); a next job the first one
        claimed goes to another worker when its lease runs out."""
        body: Dict[str, Any] = {"lease_token": lease_token, "result": result}
        if cost is not None:
            body["cost"] = cost
        return self._report(job_id, "complete", body, claim_next)

    def fail(self, job_id: str, lease_token: str, error: str, *, retryable: bool = True,
             cost: Optional[float] = None, claim_next: Any = None) -> Any:
        """Report a claimed job's attempt failed; retried by the server's
        rules unless ``retryable`` is False. The ``Job``, or with
        ``claim_next`` ``(job, next)``, as ``complete`` answers."""
        body: Dict[str, Any] = {"lease_token": lease_token, "error": error[:1000] or "error",
                                "retryable": retryable}
        if cost is not None:
            body["cost"] = cost
        return self._report(job_id, "fail", body, claim_next)

    def record_step(self, job_id: str, lease_token: str, name: str, result: Any, *,
                    cost: Optional[float] = None) -> bool:
        """Record a finished step of a claimed job (its JSON ``result``, and
        ``cost``, what it spent in dollars, charged in the step's name) while
        the lease is held: a later attempt's claim carries it in ``steps``.
        False if the step was already recorded (nothing charged again); 409
        ``Conflict`` (``lease_lost``) once the lease is no longer this worker's."""
        body: Dict[str, Any] = {"lease_token": lease_token, "name": name, "result": result}
        if cost is not None:
            body["cost"] = cost
        answer = self.request("POST", f"/api/v1/jobs/{_seg(job_id)}/steps", body, retry_unsure=True)
        return bool(answer["recorded"])

    def report_many(self, reports: Sequence[Mapping[str, Any]], *, claim_next: Any = None,
                    max_jobs: Optional[int] = None) -> Any:
        """Report up to 100 claimed jobs in one call, each ``{"job_id",
        "lease_token", "result"}`` or ``{"job_id", "lease_token", "error"}``
        (with ``"retryable"`` if not), and ``"cost"`` if it spent. Each is
        applied on its own: a list, in order, of ``{"job_id", "status"}``,
        or ``{"job_id", "error", "message"}`` for one refused (``lease_lost``,
        ``not_found``, ...) while the others applied.

        With ``claim_next`` (as ``complete`` takes it) the same call claims
        up to ``max_jobs`` next jobs (default 1): then ``(outcomes, jobs)``.
        Sent again after a broken connection, as ``complete`` is."""
        body: Dict[str, Any] = {"reports": [dict(r) for r in reports]}
        if claim_next is not None:
            body["claim_next"] = _claim_next(claim_next)
            if max_jobs is not None:
                body["claim_next"]["max_jobs"] = max_jobs
        answer = self.request("POST", "/api/v1/jobs/report", body, retry_unsure=True)
        outcomes = list(answer["reports"])
        return outcomes if claim_next is None else (outcomes, list(answer.get("next") or []))

    def _report(self, job_id: str, action: str, body: Dict[str, Any], claim_next: Any) -> Any:
        if claim_next is not None:
            body["claim_next"] = _claim_next(claim_next)
        answer = self.request("POST", f"/api/v1/jobs/{_seg(job_id)}/{action}", body,
                              retry_unsure=True)
        job = Job.from_dict(answer["job"])
        return job if claim_next is None else (job, answer.get("next"))

    # -- transport -----------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                query: Optional[Mapping[str, Any]] = None,
                headers: Optional[Mapping[str, str]] = None,
                retry_unsure: Optional[bool] = None, timeout: Optional[float] = None,
                interruptible: bool = False) -> Any:
        """One API call: the answer's JSON (None for 204), or a LevqorError.

        ``timeout`` is this request's, in seconds (default the client's);
        an ``interruptible`` one can be ended by ``interrupt``.

        ``retry_unsure`` says whether the request may be sent again when its
        connection broke after it was sent (it may have acted); by default
        only for GET, HEAD and DELETE, and for a request with an
        Idempotency-Key. 429 and 503 are retried whatever it says: the
        server refused them without acting.
        """
        if retry_unsure is None:
            retry_unsure = method in ("GET", "HEAD", "DELETE") or bool(
                headers and "Idempotency-Key" in headers)
        target = self._prefix + path
        if query:
            pairs = {k: v for k, v in query.items() if v is not None}
            if pairs:
                target += "?" + urllib.parse.urlencode(pairs)
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        sent_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            sent_headers["Content-Type"] = "application/json"
        if self.api_key:
            sent_headers["X-Api-Key"] = self.api_key
        deadline = time.monotonic() + self.retry_time
        attempt = 0
        while True:
            try:
                status, answer_headers, raw = self._send(method, target, data, sent_headers,
                                                         timeout or self.timeout, interruptible)
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                error: LevqorError = LevqorConnectionError(
                    f"{method} {path}: {type(exc).__name__}: {exc}", code="connection_error")
                if not retry_unsure:
                    raise error from exc
                wait = _backoff(attempt)
            else:
                if status < 400:
                    return _json(raw) if raw else None
                retry_after = _retry_after(answer_headers.get("retry-after"))
                error = error_for(status, _json(raw, {}), answer_headers.get("x-request-id"),
                                  retry_after)
                if status not in (429, 503):
                    raise error
                wait = max(retry_after or 0, 0) * random.uniform(1.0, 1.1) or _backoff(attempt)
            if attempt >= self.max_retries or time.monotonic() + wait > deadline:
                raise error
            attempt += 1
            self.retries += 1
            time.sleep(wait)

    def _send(self, method: str, target: str, data: Optional[bytes],
              headers: Mapping[str, str], timeout: float,
              interruptible: bool = False) -> Tuple[int, Dict[str, str], bytes]:
        conn = self._connection()
        ident = threading.get_ident()
        if interruptible:
            if conn.sock is None:
                conn.connect(timeout)  # so that there is a socket to interrupt
            with self._held_lock:
                self._held[ident] = conn
        try:
            status, answer_headers, raw, will_close = conn.request(method, target, data, headers,
                                                                  timeout)
        finally:
            if interruptible:
                with self._held_lock:
                    self._held.pop(ident, None)
        if will_close or conn.interrupted is not None:  # half-closed: of no more use
            self._drop()
        return status, answer_headers, raw

    def _connection(self) -> "_Connection":
        """This thread's connection; a fresh one if the server closed the old
        one while it was idle (a request on it would fail before arriving)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:  # idle and readable: the server closed it (EOF)
                self._drop()
                conn = None
        if conn is None:
            conn = _Connection(self._host, self._port, self._https, self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the connection --------------------------------------------------------

_MAX_LINE = 65536    # the longest status or header line accepted (as http.client)
_MAX_HEADERS = 100   # the most header lines in an answer (as http.client)
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_HEADER = re.compile(r"[\r\n\x00]")


class _Connection:
    """One keep-alive HTTP/1.1 connection. A request goes out in one write,
    head and body together, with Nagle off; an answer is read by its
    Content-Length, its chunks, or to the connection's end. PERF: what
    http.client spends on each answer (its headers go through the email
    package's parser) and on writing a body apart from its head was about
    half of this client's own time per call. Failures raise OSError or
    http.client's exceptions, as http.client would."""

    def __init__(self, host: str, port: Optional[int], https: bool, timeout: float) -> None:
        self.host = host
        self.https = https
        self.port = port or (443 if https else 80)
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self._fp: Any = None
        self.interrupted: Optional[float] = None  # when Client.interrupt half-closed it
        authority = f"[{host}]" if ":" in host else host
        self._host_header = (authority if self.port == (443 if https else 80)
                             else f"{authority}:{self.port}")

    def connect(self, timeout: Optional[float] = None) -> None:
        sock = socket.create_connection((self.host, self.port), timeout or self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                import ssl
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._fp = sock.makefile("rb")

    def close(self) -> None:
        fp, sock = self._fp, self.sock
        self._fp = self.sock = None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()

    def request(self, method: str, target: str, body: Optional[bytes], headers: Mapping[str, str],
                timeout: float) -> Tuple[int, Dict[str, str], bytes, bool]:
        """Send one request; (status, headers by lower-case name, body, whether
        the connection closes after it)."""
        if _BAD_TARGET.search(target):
            raise ValueError(f"a request target may hold no control characters: {target!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}",
                 "Accept-Encoding: identity"]
        for name, value in headers.items():
            if _BAD_HEADER.search(name) or _BAD_HEADER.search(str(value)) or ":" in name:
                raise ValueError(f"invalid header {name!r}")
            lines.append(f"{name}: {value}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.sock is None:
            self.connect(timeout)
        assert self.sock is not None
        self.sock.settimeout(timeout)
        self.sock.sendall(head + body if body else head)
        return self._answer(method)

    def _line(self) -> bytes:
        line = self._fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("an answer's line")
        return line

    def _answer(self, method: str) -> Tuple[int, Dict[str, str], bytes, bool]:
        while True:
            line = self._line()
            if not line:
                raise http.client.RemoteDisconnected("the server closed the connection "
                                                     "without answering")
            parts = line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or len(parts[1]) != 3 \
                    or not parts[1].isdigit():
                raise http.client.BadStatusLine(repr(line[:100]))
            version, status = parts[0], int(parts[1])
            headers = self._headers()
            if not 100 <= status < 200:
                break  # an interim answer (1xx) is followed by the real one
        tokens = headers.get("connection", "").lower()
        will_close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        if method == "HEAD" or status in (204, 304):
            return status, headers, b"", will_close
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return status, headers, self._chunks(), will_close
        length = headers.get("content-length")
        if length is None:  # the body runs to the connection's end
            return status, headers, self._fp.read(), True
        if not length.strip().isdigit():
            raise http.client.HTTPException(f"a bad Content-Length: {length[:40]!r}")
        return status, headers, self._exactly(int(length)), will_close

    def _headers(self) -> Dict[str, str]:
        headers: Dict[str, str] = {}
        last = None
        for _ in range(_MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                return headers
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and last is not None:  # a folded line goes on the last
                headers[last] += " " + text.strip()
                continue
            name, sep, value = text.partition(":")
            if not sep:
                raise http.client.HTTPException(f"a malformed header line: {text[:100]!r}")
            last = name.strip().lower()
            value = value.strip()
            headers[last] = f"{headers[last]}, {value}" if last in headers else value
        raise http.client.HTTPException(f"more than {_MAX_HEADERS} headers")

    def _exactly(self, n: int) -> bytes:
        data = self._fp.read(n)
        if len(data) < n:
            raise http.client.IncompleteRead(data, n - len(data))
        return data

    def _chunks(self) -> bytes:
        parts = []
        while True:
            size = self._line().split(b";", 1)[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise http.client.HTTPException(f"a bad chunk size: {size[:40]!r}") from None
            if n == 0:
                self._headers()  # the trailer, if any, then the blank line
                return b"".join(parts)
            parts.append(self._exactly(n))
            self._line()  # the CRLF after the chunk


def _intake_body(workflow: str, payload: Mapping[str, Any], *, priority: Optional[str] = None,
                 callback_url: Optional[str] = None, max_cost: Optional[float] = None,
                 run_at: Optional[float] = None, delay: Optional[float] = None,
                 depends_on: Optional[Sequence[str]] = None,
                 concurrency_key: Optional[str] = None) -> Dict[str, Any]:
    """An intake body: the fields given, and only those."""
    body: Dict[str, Any] = {"workflow": workflow, "payload": dict(payload)}
    optional = {"priority": priority, "callback_url": callback_url, "max_cost": max_cost,
                "run_at": run_at, "delay": delay, "concurrency_key": concurrency_key,
                "depends_on": list(depends_on) if depends_on is not None else None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _batch_index(body: Mapping[str, Any], offset: int) -> Optional[int]:
    """The index in the caller's list of the job a batch refusal names (its
    ``index``, or its field ``jobs/3/payload``), in a batch from ``offset``."""
    index = body.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return offset + index
    match = re.match(r"jobs[./](\d+)", str(body.get("field") or ""))
    return offset + int(match.group(1)) if match else None


def _seg(value: str) -> str:
    """A path segment, percent-encoded: an id can never change the path."""
    return urllib.parse.quote(str(value), safe="")


def _backoff(attempt: int) -> float:
    """Half to all of 0.1 s doubling per attempt, capped at 5 s (full jitter
    would sometimes retry at once and hammer a struggling server)."""
    return min(5.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0)


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (this server sends whole seconds), or None."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _json(raw: bytes, default: Any = None) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        if default is not None:
            return default
        raise LevqorError(f"the server answered something that is not JSON: {raw[:100]!r}",
                          code="invalid_answer") from None


def _claim_next(claim_next: Any) -> Dict[str, Any]:
    """A report's ``claim_next``: a list of workflows, or a claim body."""
    return {"workflows": list(claim_next)} if not isinstance(claim_next, Mapping) else dict(claim_next)
