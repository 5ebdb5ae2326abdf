"""Levqor's HTTP surface: the route table, the router, authentication, rate
limits, and the job and operations handlers.

Handlers take a ``Request`` and the path's parameters and return
``(status, headers, body)``; on failure they raise ``HTTPError``, which one
place (``middleware.ErrorGuard``) turns into the JSON error body. This module
owns nothing that lives between requests: stores, settings and the clock
come from ``request.services`` (``levqor.Services``). HTTP primitives live in
``web``, the body schemas in ``schemas``, the public files in ``static``.
"""

import hashlib
import hmac
import json
import re
import select
import socket
import time
from urllib.parse import unquote

import callbacks
import flow
import metrics as prometheus
import openapi
import ratelimit
import tracing
from accounts import (key_create, key_list, key_revoke, usage, user_get, user_lookup, user_patch,
                      user_upsert)
from costs import BudgetExceeded, to_usd
from engine import JobError, status_view, step_results
from jobstore import JOB_FINAL, IdempotencyMismatch, QueueFull
from middleware import STORAGE_ERRORS
from schemas import IDEMPOTENCY_KEY_PATTERN, MAX_BATCH, SCHEMAS, python_pattern, validate
from static import robots, security_txt, static_file
from storage import StorageError
from web import STATUS_LINES, VERSION, HTTPError, Request, json_body, not_found, respond, whole_number

WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})

# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


def fingerprint(key):
    """What the audit log and logs may say of a key: never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    """The configured API keys, held as SHA-256 digests.

    A presented key is hashed and compared with every digest by
    ``hmac.compare_digest``, without stopping at the first match: the time
    taken says nothing of which key, or how much of one, was right.
    """

    def __init__(self, keys):
        self._keys = [(hashlib.sha256(k.encode()).digest(), fingerprint(k)) for k in keys]

    def __bool__(self):
        return bool(self._keys)

    def check(self, presented):
        """The key's fingerprint if it is one of ours, else None."""
        # A WSGI header is latin-1 text; surrogatepass accepts any str at all.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, fp in self._keys:
            if hmac.compare_digest(known, digest):
                found = fp
        return found


def identify(req):
    """Check X-Api-Key and set who is calling (``key_id``), in what ``role``;
    returns None, or the refusal to answer if the route needs a key.

    ``lq_`` keys are managed keys (client or worker); any other is one of the
    operator's API_KEYS (admin). Missing: 401; not ours, or revoked: 403.
    With no API_KEYS configured (open development mode) a caller without a
    managed key is let in as admin.
    """
    services = req.services
    presented = req.environ.get("HTTP_X_API_KEY")
    if presented and presented.startswith("lq_"):
        key = services.key_store.lookup(presented)
        if key is not None:
            req.key_id, req.role, req.key = key["id"], key["role"], key
            return None
    elif presented and services.keys:
        fp = services.keys.check(presented)
        if fp is not None:
            req.key_id, req.role = fp, "admin"
            return None
    if not services.keys:
        req.key_id, req.role = "open", "admin"
        return None
    if not presented:
        return HTTPError(401, "unauthorized", "an API key is required (X-Api-Key header)",
                        [("WWW-Authenticate", 'ApiKey header="X-Api-Key"')])
    return HTTPError(403, "forbidden", "the API key is not valid")


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def root(req):
    return respond({"ok": True, "service": "levqor-backend", "version": VERSION})


def openapi_document(req):
    body = req.services.openapi_body
    return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                 ("Cache-Control", "public, max-age=300")], body


def health(req):
    if not req.services.database_ok():  # PostgreSQL, asked at most once a second
        raise HTTPError(503, "storage_unavailable", "the database is unavailable",
                        [("Retry-After", "5")], database="unavailable")
    # PERF: the hottest endpoint; the same bytes json_body would make.
    body = b'{"ok":true,"ts":%d}' % int(time.time())
    return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


def metrics(req):
    body = req.services.recorder.metrics()
    counts = req.services.engine.counts()
    body.update(queue_depth=counts["queued_by_priority"], running=counts["by_status"]["running"])
    return respond(body)


def ops_health(req):
    services = req.services
    checks = {}
    try:
        checks["database"] = "ok" if services.db.ping() else "failing"
    except Exception as exc:  # the point of this endpoint is to report, not to fail
        checks["database"] = f"failing: {type(exc).__name__}"
    checks["recorder"] = "ok" if services.recorder.running else "stopped"
    checks["workers"] = "ok" if services.engine.running else "stopped"
    ok = all(v == "ok" for v in checks.values())
    counts = services.engine.counts()
    return respond({
        "ok": ok,
        "ts": int(time.time()),
        "checks": checks,
        "jobs": counts["by_status"],
        "queue_depth": counts["queued_by_priority"],
        "workflows": sorted(services.engine.registry.names()),
        "audit_pending": services.recorder.pending(),
        "uptime_seconds": int(time.time() - services.started_at),
        "version": VERSION,
    }, 200 if ok else 503)


# -- jobs ------------------------------------------------------------------------

# One spelling with the schemas', whose $ is the end of the string (not of a line).
_IDEMPOTENCY_KEY = python_pattern(IDEMPOTENCY_KEY_PATTERN)
# An idempotency key is held with a digest of its body in this one spelling.
# PERF: one encoder, not one built by each json.dumps with arguments.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
IDEMPOTENCY_TTL = 86_400
_JOB_ERRORS = {"not_found": 404, "conflict": 409, "lease_lost": 409, "budget_exceeded": 409,
               "cost_cap_exceeded": 409, "step_limit": 422}


def _job_call(method, job_id, *args, **kwargs):
    """Run an engine call, its JobError answered with the matching status."""
    if not _JOB_ID.match(job_id):
        raise not_found("job", job_id=job_id)
    try:
        return method(job_id, *args, **kwargs)
    except JobError as exc:
        extra = {"job_id": job_id} if exc.code == "not_found" else {}
        raise HTTPError(_JOB_ERRORS[exc.code], exc.code, exc.message, **extra)


def new_job(req, body):
    """The job an intake body asks for, checked past its schema: the
    callback URL, the payload against its workflow's schema, run_at or
    delay, the parents it depends on, its cost cap."""
    services = req.services
    if "callback_url" in body:
        problem = callbacks.url_problem(body["callback_url"], services.settings.callback_allow_private)
        if problem is not None:
            raise HTTPError(400, "validation_failed", f"callback_url: {problem}", field="callback_url")
    payload_validator = services.payload_validators.get(body["workflow"])
    if payload_validator is not None:
        validate(None, body["payload"], payload_validator, prefix=("payload",))
    run_at = flow.run_at(body, services.engine.now())
    depends_on = flow.parents(req, body.get("depends_on", ()))
    default = services.engine.default_cap(body["workflow"])
    try:
        cap = services.guardrails.cap(body.get("max_cost"), default)
    except ValueError as exc:
        raise HTTPError(422, "cost_cap_exceeded", f"max_cost: {exc}", field="max_cost")
    # A declared cost is reserved at intake; a job without one is charged as it spends.
    declared = body.get("max_cost") is not None or default is not None
    job = services.engine.new_job(body["workflow"], body["payload"], body.get("priority", "normal"),
                                  body.get("callback_url"), req.key_id, cap, declared, run_at=run_at,
                                  concurrency_key=body.get("concurrency_key"), depends_on=depends_on)
    tracing.attach(job, req.environ)
    return job


def idempotency(req, key, body):
    """What the store remembers of an Idempotency-Key: (key_id, key, the
    body's digest, lifetime)."""
    if not _IDEMPOTENCY_KEY.match(key):
        raise HTTPError(400, "invalid_idempotency_key",
                        "Idempotency-Key must be 1 to 255 printable ASCII characters")
    digest = hashlib.sha256(_canonical(body).encode())
    return (req.key_id, key, digest.hexdigest(), IDEMPOTENCY_TTL)


def intake(req):
    body = validate("intake", req.json())
    job = new_job(req, body)
    idem_key = req.environ.get("HTTP_IDEMPOTENCY_KEY")
    (job, created), = accept(req, [job], [None if idem_key is None else idempotency(req, idem_key, body)])
    headers = [("Location", f"/api/v1/status/{job['job_id']}")]
    if not created:
        headers.append(("Idempotent-Replayed", "true"))
    return respond({"job_id": job["job_id"], "status": accepted_status(job, created)}, 202, headers)


def accepted_status(job, created):
    """The status an intake answers: the job's as it was accepted. A replay
    answers exactly what the first request was answered ("queued"); a job
    handed at once to a claim waiting for it was queued, and is running
    by the time the answer leaves."""
    return "queued" if not created or job["status"] == "running" else job["status"]


def intake_batch(req):
    """Up to MAX_BATCH jobs in one call, accepted or refused together: a
    refusal names the first job refused (``index``, and ``jobs/<i>`` in its
    field). Each may carry an ``idempotency_key``: a replayed job answers
    with its status then ("queued"), as a replayed intake does. Or the
    batch has one key of its own (``idempotency_key`` beside ``jobs``, or
    the Idempotency-Key header): one record for all its jobs, and a replay
    answers them all as the first call was answered."""
    body = req.json(limit=req.services.settings.max_batch_content_length)
    items = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(items, list) or set(body) - {"idempotency_key"} != {"jobs"} \
            or not 1 <= len(items) <= MAX_BATCH or not isinstance(body.get("idempotency_key", ""), str):
        validate("intake_batch", body)  # the batch itself is malformed: say how
    name = _batch_key_name(req, body)
    # Each job checked in full before the next, so a refusal names the first bad one.
    jobs, keys, seen = [], [], set()
    for i, item in enumerate(items):
        _in_batch(i, validate, "intake_batch_job", item, prefix=("jobs", str(i)))
        if name is not None and "idempotency_key" in item:
            raise HTTPError(400, "validation_failed", f"jobs/{i}/idempotency_key: a batch with a key of "
                            "its own takes none for its jobs", field=f"jobs/{i}/idempotency_key", index=i)
        key = item.pop("idempotency_key", None)
        if key is not None and key in seen:
            raise HTTPError(400, "validation_failed", f"jobs/{i}/idempotency_key: repeated in this batch",
                            field=f"jobs/{i}/idempotency_key", index=i)
        seen.add(key)
        jobs.append(_in_batch(i, new_job, req, item))
        keys.append(None if key is None else idempotency(req, key, item))
    batch_key = None if name is None else idempotency(req, name, {"jobs": items})
    added = accept(req, jobs, keys, batch_key, each=True)
    replayed = [("Idempotent-Replayed", "true")] if batch_key and not added[0][1] else []
    return respond({"jobs": [{"job_id": job["job_id"], "status": accepted_status(job, created)}
                             for job, created in added]}, 202, replayed)


def _batch_key_name(req, body):
    """The batch's own idempotency key, given in its body or its header (or
    both, the same), or None."""
    header = req.environ.get("HTTP_IDEMPOTENCY_KEY")
    name = body.get("idempotency_key")
    if name is not None and not _IDEMPOTENCY_KEY.match(name):
        raise HTTPError(400, "validation_failed", "idempotency_key: 1 to 255 printable ASCII characters",
                        field="idempotency_key")
    if name is not None and header is not None and header != name:
        raise HTTPError(400, "validation_failed", "idempotency_key: differs from the Idempotency-Key header",
                        field="idempotency_key")
    return header if name is None else name


def _in_batch(index, fn, *args, **kwargs):
    """``fn``'s refusal of the batch's job ``index``, said of that job."""
    try:
        return fn(*args, **kwargs)
    except HTTPError as exc:
        field = exc.extra.get("field")
        if field is not None and not field.startswith("jobs/"):
            exc.extra["field"] = f"jobs/{index}/{field}"
            exc.message = f"jobs/{index}/{exc.message}"
        elif field is None:
            exc.message = f"jobs/{index}: {exc.message}"
        exc.extra["index"] = index
        raise


def accept(req, jobs, keys, batch_key=None, each=False):
    """Reserve and store new jobs (``Engine.accept_many``), its refusals
    answered; [(job, created)]. A refusal of one job of a batch names it.

    The request's audit row (with ``each``, a row per job) is written in
    the jobs' own transaction when the store has one: the jobs and the
    record of who made them are committed together, and the answer waits
    for no second write. Otherwise ``Api._audit`` writes it, as for any
    other request."""
    services = req.services
    carried = []  # the audit paths written with the jobs

    def paths(added):
        return [f"{req.path}#{job['job_id']}" for job, _ in added] if each else [req.path]

    def audit_rows(added):
        carried[:] = paths(added)
        return services.recorder.statements(req.key_id, req.method, carried, 202, req.request_id)

    try:
        added = services.engine.accept_many(jobs, req.key, keys, batch_key,
                                            audit_rows if services.jobs.carries_also else None)
    except BudgetExceeded as exc:
        refusal = budget_refusal(req, exc)
        if len(jobs) > 1:
            refusal.message = f"jobs/{exc.index}: {refusal.message}"
            refusal.extra["index"] = exc.index
        raise refusal
    except QueueFull:
        raise HTTPError(503, "queue_full", "too many jobs are held; try again later",
                        [("Retry-After", "30")])
    except IdempotencyMismatch as exc:
        raise HTTPError(422, "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request body",
                        **({"index": exc.index} if exc.index is not None and len(jobs) > 1 else {}))
    if carried:  # committed with the jobs: nothing left for Api._audit
        services.recorder.carried(len(carried))
        req.audit_paths = []
    elif each:
        req.audit_paths = paths(added)  # a row per job
    created = [job for job, new in added if new]
    if created:
        services.recorder.count("jobs", len(created))
        services.metrics.jobs_enqueued(created)
    return added


def budget_refusal(req, exc):
    """429 for a budget that would be passed. A managed key is not shown the
    service's figures, only its own."""
    retry_after, state = req.services.guardrails.refusal(exc, full=req.key is None)
    return HTTPError(429, "budget_exceeded", f"the {state['scope']} daily budget is spent",
                     [("Retry-After", str(retry_after))], budget=state)


def _own_job(req, job_id):
    """A job the caller may act on: clients only their own (others: 404)."""
    job = _job_call(req.services.engine.get, job_id)
    if req.role == "client" and job["key_id"] != req.key_id:
        raise not_found("job", job_id=job_id)
    return job


MAX_STATUS_WAIT = 30  # seconds a status read may wait for its job's end


def job_status(req, job_id):
    """The job's status; with ``?wait=<seconds>`` (up to 30), held until the
    job has ended or the wait is over, whichever is first."""
    wait = whole_number(req.query.get("wait", "0"))
    if wait is None or not 0 <= wait <= MAX_STATUS_WAIT:
        raise HTTPError(400, "invalid_query", f"wait must be a whole number of seconds from 0 to {MAX_STATUS_WAIT}")
    job = _job_call(req.services.engine.get, job_id) if req.role is None else _own_job(req, job_id)
    if wait and job["status"] not in JOB_FINAL:
        job = _job_call(req.services.engine.wait_for_end, job_id, wait, lambda: hung_up(req.environ))
    return respond(status_view(job))


def dev_complete(req, job_id):
    body = validate("dev_complete", req.json(optional=True))
    _job_call(req.services.engine.complete_for_dev, job_id, body.get("result", {"ok": True}))
    return respond({"ok": True})


def job_cancel(req, job_id):
    _own_job(req, job_id)
    return respond({"job": status_view(_job_call(req.services.engine.cancel, job_id))})


def job_retry(req, job_id):
    job = _own_job(req, job_id)
    key = req.key if req.key_id == job["key_id"] else None  # whose budget the retry uses
    try:
        return respond({"job": status_view(_job_call(req.services.engine.retry, job_id, key))})
    except BudgetExceeded as exc:
        raise budget_refusal(req, exc)


def job_redeliver(req, job_id):
    job = _own_job(req, job_id)
    if job["status"] not in JOB_FINAL:
        raise HTTPError(409, "conflict", "only a finished job has a notification to send")
    if not job.get("callback_url"):
        raise HTTPError(409, "conflict", "the job has no callback_url")
    done = req.services.callbacks.redeliver(job)
    if done is None:  # purged between the read and the write
        raise not_found("job", job_id=job_id)
    return respond({"job": status_view(done)})


def _claimed(job):
    """What a worker is handed of a job it claimed."""
    return {"job_id": job["job_id"], "workflow": job["workflow"], "payload": job["payload"],
            "priority": job["priority"], "attempt": job["attempts"],
            "max_attempts": job["max_attempts"], "lease_token": job["lease_token"],
            "lease_expires_at": job["lease_expires_at"],
            # What earlier attempts spent: a reported cost is the job's
            # total across attempts, so it starts from here.
            "cost_spent": to_usd(job["cost_spent"]),
            # The results of the jobs it depends on, by id.
            "parents": job.get("parents") or {},
            # What earlier attempts recorded, by step name (see job_steps).
            "steps": step_results(job),
            "traceparent": job.get("traceparent")}


def _claim(req, ask, max_jobs=1, wait=0.0, alone=False):
    """Jobs claimed for the caller as ``ask`` (a claim body) says; a claim
    that took nothing changed nothing, so it leaves no audit row. A claim
    ``alone`` in its request has its row written in its own transaction
    where the store can (as an intake's is: see ``accept``), else by
    ``Api._audit``."""
    _may_claim(req, ask["workflows"])
    services, carried, rowed = req.services, [], []

    def audit_row(jobs):
        carried[:], rowed[:] = [req.path], [job["job_id"] for job in jobs]
        return services.recorder.statements(req.key_id, req.method, carried, 200, req.request_id)

    jobs = services.engine.claim_many(ask["workflows"], ask.get("lease_seconds", 60), req.key_id,
                                      max_jobs, wait, gone=lambda: hung_up(req.environ),
                                      also=audit_row if alone and services.jobs.carries_also else None)
    if rowed != [job["job_id"] for job in jobs]:
        # Asked for by a transaction that failed (a job handed by an intake
        # that did not commit), and these jobs came another way: not written.
        carried.clear()
    if carried:
        services.recorder.carried(len(carried))
    if not jobs or carried:
        req.audit_paths = []
    return [_claimed(job) for job in jobs]


def _may_claim(req, workflows):
    """403 unless the caller's key may claim every one of ``workflows``."""
    patterns = req.key and req.key["workflows"]  # None: any workflow
    if patterns:
        for name in workflows:
            if not any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns):
                raise HTTPError(403, "forbidden", f"this key may not claim the workflow {name}")


def hung_up(environ):
    """Whether the client of a request still in hand has closed its end of
    the connection (gunicorn gives the socket; other servers: never known).
    Readable with nothing to read is the end of the stream; anything it may
    have sent already stays unread."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # closed under us
        return True


def job_claim(req):
    """The next job, or with ``max_jobs`` up to that many ({"jobs": [...]});
    with ``wait``, held until one is queued or the wait ends."""
    body = validate("claim", req.json())
    # int(): JSON Schema's integer admits 77.0.
    jobs = _claim(req, body, int(body.get("max_jobs", 1)), body.get("wait", 0), alone=True)
    if "max_jobs" in body:
        return respond({"jobs": jobs})
    return respond({"job": jobs[0]}) if jobs else (204, [], b"")


def job_heartbeat(req, job_id):
    body = validate("heartbeat", req.json())
    job = _job_call(req.services.engine.heartbeat, job_id, body["lease_token"],
                    body.get("lease_seconds"), body.get("progress"), body.get("cost"),
                    key_id=req.key_id)
    return respond({"job_id": job_id, "lease_expires_at": job["lease_expires_at"],
                    "cancel_requested": job["cancel_requested"]})


def job_steps(req, job_id):
    """An external worker's finished step, recorded with the job while its
    lease holds: the next attempt's claim carries it in ``steps``. A name
    already recorded is answered with ``"recorded": false`` and charged
    nothing again."""
    body = validate("step", req.json())
    job, recorded = _job_call(req.services.engine.record_step, job_id, body["lease_token"],
                              body["name"], body.get("result"), body.get("cost"), key_id=req.key_id)
    return respond({"recorded": recorded, "job": status_view(job)})


def event(req):
    """Resume the caller's jobs waiting for this event whose match its data
    holds (an admin key's reach every key's jobs); an event nobody waits
    for is not kept."""
    body = validate("event", req.json())
    scope = None if req.role == "admin" else req.key_id
    resumed = req.services.engine.deliver_event(body["name"], body.get("data", {}), scope)
    return respond({"resumed": resumed})


def _reported(req, job, body):
    """A report's answer: the job, and with ``claim_next`` the worker's next
    job (or null) in the same round trip; that claim never waits."""
    answer = {"job": status_view(job)}
    if "claim_next" in body:
        claimed = _claim(req, body["claim_next"])
        req.audit_paths = None  # the report itself changed the job
        answer["next"] = claimed[0] if claimed else None
    return respond(answer)


def job_complete(req, job_id):
    body = validate("complete", req.json())
    job = _job_call(req.services.engine.report, job_id, body["lease_token"], result=body["result"],
                    cost=body.get("cost"), key_id=req.key_id)
    return _reported(req, job, body)


def job_fail(req, job_id):
    body = validate("fail", req.json())
    job = _job_call(req.services.engine.report, job_id, body["lease_token"], error=body["error"],
                    retryable=body.get("retryable", True), cost=body.get("cost"), key_id=req.key_id)
    return _reported(req, job, body)


def job_reports(req):
    """Several completions and failures in one call, for the caller's
    leases: each applied on its own, as its complete or fail would be, and
    answered in order with the job's status, or the error that refused it
    (the others still apply). With ``claim_next``, up to its ``max_jobs``
    next jobs (``"next"``), claimed after the reports; that claim never waits."""
    body = validate("reports", req.json(limit=req.services.settings.max_batch_content_length))
    if "claim_next" in body:  # refused before any report is applied
        _may_claim(req, body["claim_next"]["workflows"])
    items = body["reports"]
    wellformed = [i for i, item in enumerate(items) if _JOB_ID.match(item["job_id"])]
    outcomes = dict(zip(wellformed, req.services.engine.report_many([
        (items[i]["job_id"], items[i]["lease_token"],
         {"result": items[i]["result"]} if "result" in items[i] else
         {"error": items[i]["error"], "retryable": items[i].get("retryable", True)}, items[i].get("cost"))
        for i in wellformed], key_id=req.key_id)))
    answers, applied = [], []
    for i, item in enumerate(items):
        job_id, job = item["job_id"], outcomes.get(i, JobError("not_found", "no such job"))
        if isinstance(job, JobError):
            answers.append({"job_id": job_id, "error": job.code, "message": job.message})
        else:
            answers.append({"job_id": job_id, "status": job["status"]})
            applied.append(f"{req.path}#{job_id}")
    answer = {"reports": answers}
    if "claim_next" in body:
        ask = body["claim_next"]
        answer["next"] = _claim(req, ask, int(ask.get("max_jobs", 1)))
        applied += [req.path] if answer["next"] else []  # and a row for a claim that took jobs
    req.audit_paths = applied  # a row per report applied
    return respond(answer)


# ---------------------------------------------------------------------------
# The route table
# ---------------------------------------------------------------------------

# What a route asks of the caller:
PUBLIC = "public"
KEY = "key"              # a valid X-Api-Key (unless no keys are configured)
USER_READ = "user_read"  # KEY, unless PUBLIC_USER_READS=1
JOB_READ = "job_read"    # KEY in production, unless PUBLIC_JOB_STATUS=1

# (method, pattern, handler, access, flags). <name> matches one path segment,
# <path:name> the rest of the path. Flags: "audit" writes an audit row,
# "dev" serves only while dev endpoints are on, "worker" is the external
# worker protocol (rate-limited by RATE_WORKER, not the write burst, and the
# only routes a worker key may call), "admin" is for the operator's keys only.
# Every other keyed route is for admin and client keys.
ROUTES = [
    ("GET", "/", root, PUBLIC, ()),
    ("GET", "/openapi.json", openapi_document, PUBLIC, ()),
    ("GET", "/health", health, PUBLIC, ()),
    ("GET", "/public/metrics", metrics, PUBLIC, ()),
    ("GET", "/metrics", prometheus.scrape, PUBLIC, ()),  # an admin key or METRICS_TOKEN
    ("POST", "/api/v1/intake", intake, KEY, ("audit",)),
    ("POST", "/api/v1/intake/batch", intake_batch, KEY, ("audit",)),
    ("GET", "/api/v1/status/<job_id>", job_status, JOB_READ, ()),
    ("POST", "/api/v1/_dev/complete/<job_id>", dev_complete, KEY, ("audit", "dev")),
    ("GET", "/api/v1/ops/health", ops_health, KEY, ("admin",)),
    ("GET", "/api/v1/jobs", flow.job_list, KEY, ()),
    ("POST", "/api/v1/jobs/cancel", flow.jobs_cancel, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/retry", flow.jobs_retry, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/claim", job_claim, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/report", job_reports, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/heartbeat", job_heartbeat, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/complete", job_complete, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/fail", job_fail, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/steps", job_steps, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/cancel", job_cancel, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/<job_id>/retry", job_retry, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/<job_id>/callback/redeliver", job_redeliver, KEY, ("audit",)),
    ("POST", "/api/v1/events", event, KEY, ("audit",)),
    ("GET", "/api/v1/usage", usage, KEY, ()),
    ("GET", "/api/v1/workflows", flow.workflow_list, KEY, ()),
    ("PUT", "/api/v1/workflows/<name>/limits", flow.workflow_limits, KEY, ("audit", "admin")),
    ("POST", "/api/v1/schedules", flow.schedule_create, KEY, ("audit",)),
    ("GET", "/api/v1/schedules", flow.schedule_list, KEY, ()),
    ("GET", "/api/v1/schedules/<name>", flow.schedule_get, KEY, ()),
    ("PATCH", "/api/v1/schedules/<name>", flow.schedule_patch, KEY, ("audit",)),
    ("DELETE", "/api/v1/schedules/<name>", flow.schedule_delete, KEY, ("audit",)),
    ("POST", "/api/v1/keys", key_create, KEY, ("audit", "admin")),
    ("GET", "/api/v1/keys", key_list, KEY, ("admin",)),
    ("DELETE", "/api/v1/keys/<key_id>", key_revoke, KEY, ("audit", "admin")),
    ("POST", "/api/v1/users/upsert", user_upsert, KEY, ("audit",)),
    ("GET", "/api/v1/users", user_lookup, USER_READ, ()),
    ("GET", "/api/v1/users/<user_id>", user_get, USER_READ, ()),
    ("PATCH", "/api/v1/users/<user_id>", user_patch, KEY, ("audit",)),
    ("GET", "/robots.txt", robots, PUBLIC, ()),
    ("GET", "/.well-known/security.txt", security_txt, PUBLIC, ()),
    ("GET", "/public/<path:path>", static_file, PUBLIC, ()),
]


class Route:
    __slots__ = ("method", "pattern", "handler", "access", "audit", "dev", "worker", "roles")

    def __init__(self, method, pattern, handler, access, flags):
        unknown = set(flags) - {"audit", "dev", "worker", "admin"}
        if unknown or access not in (PUBLIC, KEY, USER_READ, JOB_READ):
            raise ValueError(f"route {method} {pattern}: bad access or flags")
        self.method, self.pattern, self.handler, self.access = method, pattern, handler, access
        self.audit = "audit" in flags
        self.dev = "dev" in flags
        self.worker = "worker" in flags
        self.roles = ({"admin"} if "admin" in flags else
                      {"admin", "worker"} if self.worker else {"admin", "client"})


_PARAM = re.compile(r"<(?:(path):)?([a-z_][a-z0-9_]*)>")


def _decode(raw):
    """A raw path parameter, percent-decoded segment by segment; ValueError
    if a segment decodes to a slash or to bytes that are not UTF-8."""
    segments = [unquote(s, errors="strict") for s in raw.split("/")]
    if any("/" in s for s in segments):
        raise ValueError("an encoded slash in a path segment")
    return "/".join(segments)


class Router:
    """Routes compiled once: static paths in a dict, the rest in one regex.

    ``match`` returns (route, params) or raises 404, or 405 with Allow.
    HEAD is served by the GET route; OPTIONS by the router itself.
    """

    def __init__(self, routes):
        self.static = {}    # path -> {method: Route}
        self.dynamic = []   # [(group name, [(group, param)], {method: Route})]
        alternatives = []
        by_pattern = {}
        for spec in routes:
            route = Route(*spec)
            if not route.pattern.startswith("/") or "<" in _PARAM.sub("", route.pattern):
                raise ValueError(f"bad route pattern {route.pattern!r}")
            if "<" not in route.pattern:
                methods = self.static.setdefault(route.pattern, {})
            else:
                if route.pattern not in by_pattern:
                    index = len(self.dynamic)
                    params, regex, pos = [], [], 0
                    for m in _PARAM.finditer(route.pattern):
                        group = f"_{index}_{m.group(2)}"
                        params.append((group, m.group(2)))
                        regex.append(re.escape(route.pattern[pos:m.start()]))
                        regex.append(f"(?P<{group}>{'.+' if m.group(1) else '[^/]+'})")
                        pos = m.end()
                    regex.append(re.escape(route.pattern[pos:]))
                    alternatives.append(f"(?P<_{index}>{''.join(regex)})")
                    by_pattern[route.pattern] = {}
                    self.dynamic.append((params, by_pattern[route.pattern]))
                methods = by_pattern[route.pattern]
            if route.method in methods:
                raise ValueError(f"duplicate route {route.method} {route.pattern}")
            methods[route.method] = route
        # One alternation: the outer group that matched names the route
        # (Match.lastgroup), so a path is matched once, not once per route.
        self.regex = re.compile("^(?:" + "|".join(alternatives) + ")$") if alternatives else None

    def methods_for(self, path):
        """({method: Route}, params) for a path as it was sent (still
        percent-encoded), or (None, None).

        NOTE: routing on the raw path, and decoding each parameter only
        after, means an encoded slash never moves a request to another
        route (/api%2Fv1%2Fkeys is not /api/v1/keys), and a parameter never
        holds a slash its segment did not.
        """
        methods = self.static.get(path)
        if methods is not None:
            return methods, {}
        m = self.regex.match(path) if self.regex else None
        if m is None:
            return None, None
        params, methods = self.dynamic[int(m.lastgroup[1:])]
        try:
            return methods, {name: _decode(m.group(group)) for group, name in params}
        except ValueError:
            return None, None

    @staticmethod
    def allow(methods):
        names = set(methods) | {"OPTIONS"}
        if "GET" in names:
            names.add("HEAD")
        return ", ".join(sorted(names))

    def match(self, method, path):
        methods, params = self.methods_for(path)
        if methods is None:
            raise HTTPError(404, "not_found", "no such endpoint")
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here",
                            [("Allow", self.allow(methods))])
        return route, params


ROUTER = Router(ROUTES)


def openapi_body(max_cost_per_job, job_status_public=False):
    """The OpenAPI document, from the route table and the schemas the
    validators use, with this service's cost cap and whether a key is
    optional for job status (built once per app)."""
    schemas = dict(SCHEMAS)
    for name in ("intake", "schedule", "schedule_patch"):
        schemas[name] = json.loads(json.dumps(SCHEMAS[name]))
        schemas[name]["properties"]["max_cost"]["maximum"] = max_cost_per_job / 1_000_000
    return json_body(openapi.build(ROUTES, schemas, VERSION,
                                   key_optional=lambda access: job_status_public and access == JOB_READ))


class Api:
    """The innermost WSGI app, in the order it works: which route, who is
    calling, whether the rate limits allow it, then the handler, audited.

    Rate limits per client address (RATE_READ for reads, RATE_BURST and
    RATE_GLOBAL for writes, RATE_WORKER for the external worker protocol)
    are taken only after the caller is known: a write that presents no
    valid key (or finds no route) takes from the RATE_ANON buckets instead,
    so anonymous traffic can never use up what authenticated clients may
    write. The buckets are shared by every worker process of a host
    (``ratelimit``).
    """

    def __init__(self, services, router=ROUTER):
        self.services = services
        self.router = router
        self.buckets = ratelimit.buckets(services.settings.rate_table_size)

    def __call__(self, environ, start_response):
        req = Request(environ, self.services)
        settings = self.services.settings
        if req.method == "OPTIONS":
            methods, _ = self.router.methods_for(req.raw_path)
            if methods is None:
                raise HTTPError(404, "not_found", "no such endpoint")
            start_response("204 No Content", [("Allow", self.router.allow(methods))])
            return []
        write = req.method in WRITE_METHODS
        try:
            route, params = self.router.match(req.method, req.raw_path)
            environ["levqor.route"] = route.pattern  # what metrics label the request by
            if route.dev and not settings.dev_endpoints:
                raise HTTPError(404, "not_found", "no such endpoint")
        except HTTPError:
            if write:
                identify(req)
            self._limit(req, None, write)  # a miss costs its sender a token too
            raise
        keyed = (route.access == KEY
                 or (route.access == USER_READ and not settings.public_user_reads)
                 or (route.access == JOB_READ and not settings.job_status_public))
        # A key presented to a public route still says who is calling (its
        # refusal is answered only where the route needs a key).
        refusal = identify(req) if keyed or write or "HTTP_X_API_KEY" in req.environ else None
        self._limit(req, route, write)
        if keyed and refusal is not None:
            raise refusal  # refused for its key: logged, not audited (nobody to attribute it to)
        if not route.audit:
            self._admit(req, route)
            status, headers, body = route.handler(req, **params)
        else:
            status = 500
            try:
                if self.services.recorder.full:  # its audit row could not be kept: change nothing
                    raise HTTPError(503, "storage_busy", "the audit log is behind; try again shortly",
                                    [("Retry-After", "1")])
                self._admit(req, route)  # a refusal for role or rate is audited too
                status, headers, body = route.handler(req, **params)
            except HTTPError as exc:
                status = exc.status
                raise
            except StorageError as exc:  # audited as it is answered (ErrorGuard), not as a 500
                status = STORAGE_ERRORS[exc.kind](str(exc)).status
                raise
            finally:
                self._audit(req, status)
        start_response(STATUS_LINES[status], headers)
        return [] if req.method == "HEAD" else [body]

    def _audit(self, req, status):
        """The request's audit row. An accepted change waits for its row to be
        written; if the database cannot take it now, the change is made all
        the same, so the client is told so (not a 503 that would invite a
        duplicate): the row stays queued for the next write, and the log says
        it is late."""
        paths = [req.path] if req.audit_paths is None else req.audit_paths
        if not paths:
            return
        try:
            self.services.recorder.audit_many(req.key_id, req.method, paths, status, req.request_id)
        except StorageError:
            if not 200 <= status < 300:
                raise
            self.services.log.warning("audit row written late: the database is unavailable",
                                      request_id=req.request_id, status=status)

    def _limit(self, req, route, write):
        """The client address's buckets for this request: 429 when empty."""
        s = self.services.settings
        ip = ratelimit.client_key(req.environ["levqor.client_ip"])
        if not write:
            limits = ((("r", ip), s.rate_read),)
        elif req.role is None:  # no valid key: anonymous buckets of its own
            limits = ((("a", ip), s.rate_anon), (("a",), s.rate_anon_global))
        elif route is not None and route.worker:
            limits = ((("k", ip), s.rate_worker),)
        else:
            limits = ((("w", ip), s.rate_burst), (None, s.rate_global))
        refused = self.buckets.take(limits)
        if refused is not None:
            raise rate_limited(refused, f"too many requests; retry in {refused[3]} s")

    def _admit(self, req, route):
        """An authenticated caller's role, and its managed key's rate limit."""
        if req.role is None:
            return  # a public route
        if req.role not in route.roles:
            raise HTTPError(403, "forbidden", f"a {req.role} key may not use this endpoint")
        rate = req.key and req.key["rate_per_minute"]
        if rate:
            refused = self.buckets.take(((("key", req.key_id), rate),))
            if refused is not None:
                raise rate_limited(refused, "this key's rate limit is reached")


def rate_limited(refused, message):
    """429 with Retry-After and the RateLimit-* headers of the emptiest bucket."""
    limit, remaining, reset, retry_after = refused
    return HTTPError(429, "rate_limited", message,
                     [("Retry-After", str(retry_after)), ("RateLimit-Limit", str(limit)),
                      ("RateLimit-Remaining", str(remaining)), ("RateLimit-Reset", str(reset))])
