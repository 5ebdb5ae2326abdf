"""Levqor's OpenAPI 3.1 document, built from the route table and the same
JSON schemas the validators use: one source of truth.

``build(routes, schemas, version)`` is called once per app by
``wsgi_routes.openapi_body``; this module only describes. What each route answers is
written here, beside the route's (method, pattern); ``tests/test_openapi.py``
fails when a route exists in the router but not here, or the reverse.
"""

import copy

from schemas import RFC3339, STATUS_LIST_PATTERN, WORKFLOW_NAME

OBJ = {"type": "object"}
NUM = {"type": "number"}
STR = {"type": "string"}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_STR = {"type": ["string", "null"]}


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required=(), **properties):
    return {"type": "object", "properties": properties, "required": list(required)}


COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}
STATUSES = ["scheduled", "waiting", "queued", "running", "succeeded", "failed", "canceled"]
JOB_STATUS = obj(
    ("job_id", "status", "created_at", "updated_at", "workflow", "priority", "attempts",
     "max_attempts", "result", "error", "progress", "callback", "cost"),
    job_id=STR, status={"enum": STATUSES},
    run_at=NULLABLE_NUM, schedule=NULLABLE_STR, concurrency_key=NULLABLE_STR,
    depends_on={"type": ["array", "null"], "items": STR},
    created_at=NUM, updated_at=NUM, workflow=STR, priority={"enum": ["low", "normal", "high"]},
    attempts={"type": "integer"}, max_attempts={"type": "integer"}, started_at=NULLABLE_NUM,
    finished_at=NULLABLE_NUM, result={},
    error={"type": ["object", "null"]}, progress={"type": ["object", "null"]},
    callback={"type": ["object", "null"]},
    cost=obj(("max", "spent"), max=NUM, spent=NUM),
    waiting_for={"type": ["object", "null"],
                 "description": "while waiting: {until} (a durable sleep), or {event, match, until}"},
    steps={"type": "array", "description": "the recorded steps, in order (not their results)",
           "items": obj(("name", "kind", "state", "started_at", "finished_at", "duration", "cost"),
                        name=STR, kind={"enum": ["step", "sleep", "event"]},
                        state={"enum": ["done", "waiting", "timed_out"]}, started_at=NULLABLE_NUM,
                        finished_at=NULLABLE_NUM, duration=NULLABLE_NUM, cost=NUM,
                        until=NULLABLE_NUM, event=STR)})
USER = obj(("id", "email", "name", "locale", "currency", "meta", "created_at", "updated_at"),
           id=STR, email=STR, name=NULLABLE_STR, locale=NULLABLE_STR,
           currency={"enum": ["GBP", "USD", "EUR", None]}, meta=OBJ, created_at=NUM, updated_at=NUM)
KEY = obj(("id", "name", "role", "prefix", "created_at", "revoked"), id=STR, name=STR,
          role={"enum": ["client", "worker"]}, prefix=STR, created_at=NUM,
          last_used_at=NULLABLE_NUM, revoked_at=NULLABLE_NUM, revoked={"type": "boolean"},
          daily_budget=NULLABLE_NUM, rate_per_minute={"type": ["integer", "null"]},
          spend_today=NUM, workflows={"type": ["array", "null"], "items": STR})

RESPONSES = {
    "Error": {
        "type": "object",
        "description": "Every error, from every endpoint, has this shape.",
        "properties": {"error": STR, "message": STR, "request_id": STR, "field": STR},
        "required": ["error", "message", "request_id"],
    },
    "Root": obj(("ok", "service", "version"), ok={"const": True}, service=STR, version=STR),
    "OpenAPI": obj(("openapi", "paths"), openapi=STR, paths=OBJ),
    "Health": obj(("ok", "ts"), ok={"const": True}, ts={"type": "integer"}),
    "Metrics": obj(("uptime_rolling_7d", "jobs_today", "audit_coverage", "last_updated"),
                   uptime_rolling_7d=NUM, jobs_today={"type": "integer"}, audit_coverage=NUM,
                   last_updated={"type": "integer"}, finished_today={"type": "integer"},
                   queue_depth=COUNTS, running={"type": "integer"}),
    "OpsHealth": obj(("ok", "ts", "checks", "jobs"), ok={"type": "boolean"}, ts={"type": "integer"},
                     checks={"type": "object"}, jobs=COUNTS, queue_depth=COUNTS),
    "Accepted": obj(("job_id", "status"), job_id=STR,
                    status={"enum": ["queued", "scheduled", "waiting", "canceled"]}),
    "JobStatus": JOB_STATUS,
    "JobEnvelope": obj(("job",), job=ref("JobStatus")),
    "JobList": obj(("jobs", "next_cursor"), jobs={"type": "array", "items": ref("JobStatus")},
                   next_cursor=NULLABLE_STR),
    "ClaimedJob": obj(("job_id", "workflow", "payload", "attempt", "lease_token", "lease_expires_at",
                       "cost_spent"),
                      job_id=STR, workflow=STR, payload=OBJ, attempt={"type": "integer"},
                      lease_token=STR, lease_expires_at=NUM, cost_spent=NUM,
                      parents={"type": "object", "description": "each parent job's result, by id"},
                      steps={"type": "object", "description": "what earlier attempts recorded, "
                                                              "by step name"},
                      traceparent=NULLABLE_STR),
    "StepRecorded": obj(("recorded", "job"), recorded={"type": "boolean"}, job=ref("JobStatus")),
    "EventDelivered": obj(("resumed",), resumed={"type": "integer"}),
    "Claimed": {"oneOf": [obj(("job",), job=ref("ClaimedJob")),
                          obj(("jobs",), jobs={"type": "array", "items": ref("ClaimedJob")})],
                "description": "job: one (without max_jobs); jobs: with max_jobs, possibly none"},
    "Reported": obj(("job",), job=ref("JobStatus"),
                    next={"oneOf": [ref("ClaimedJob"), {"type": "null"}],
                          "description": "with claim_next: the worker's next job"}),
    "ReportedMany": obj(("reports",), reports={"type": "array", "items": obj(
        ("job_id",), job_id=STR, status={"enum": STATUSES},
        error={"type": "string", "description": "why this report was refused (lease_lost, not_found, ...)"},
        message=STR)},
        next={"type": "array", "items": ref("ClaimedJob"),
              "description": "with claim_next: the worker's next jobs, possibly none"}),
    "AcceptedBatch": obj(("jobs",), jobs={"type": "array", "items": ref("Accepted")}),
    "BulkResult": obj(("matched", "changed"), matched={"type": "integer"}, changed={"type": "integer"}),
    "Limits": obj(("max_concurrency", "max_concurrency_per_key", "rate"),
                  max_concurrency={"type": ["integer", "null"]},
                  max_concurrency_per_key={"type": ["integer", "null"]},
                  rate={"type": ["object", "null"]}),
    "WorkflowLimits": obj(("workflow", "limits"), workflow=STR, limits=ref("Limits")),
    "WorkflowList": obj(("workflows",), workflows={"type": "array", "items": obj(
        ("name", "in_process", "limits", "counts"), name=STR, in_process={"type": "boolean"},
        limits=ref("Limits"), counts=COUNTS)}),
    "Schedule": obj(("name", "workflow", "payload", "paused", "next_fire"), name=STR, workflow=STR,
                    payload=OBJ, priority=NULLABLE_STR, max_cost=NULLABLE_NUM,
                    callback_url=NULLABLE_STR, cron=NULLABLE_STR, timezone=NULLABLE_STR,
                    every={"type": ["integer", "null"]}, paused={"type": "boolean"},
                    next_fire=NULLABLE_NUM, last_fire=NULLABLE_NUM, last_job=NULLABLE_STR,
                    created_at=NUM, updated_at=NUM),
    "ScheduleEnvelope": obj(("schedule",), schedule=ref("Schedule")),
    "ScheduleList": obj(("schedules",), schedules={"type": "array", "items": ref("Schedule")}),
    "Deleted": obj(("deleted",), deleted=STR),
    "Heartbeat": obj(("job_id", "lease_expires_at", "cancel_requested"), job_id=STR,
                     lease_expires_at=NUM, cancel_requested={"type": "boolean"}),
    "Ok": obj(("ok",), ok={"const": True}),
    "User": USER,
    "UserCreated": obj(("created", "user"), created={"const": True}, user=ref("User")),
    "UserUpdated": obj(("updated", "user"), updated={"const": True}, user=ref("User")),
    "Usage": obj(("from", "to", "group_by", "groups", "totals"), groups={"type": "array"},
                 totals=obj(("spend", "reserved"), spend=NUM, reserved=NUM)),
    "Key": KEY,
    "KeyCreated": {"allOf": [ref("Key"), obj(("key",), key=STR)]},
    "KeyList": obj(("keys",), keys={"type": "array", "items": ref("Key")}),
    "KeyRevoked": obj(("revoked", "key"), revoked={"const": True}, key=ref("Key")),
}

def query(name, schema, description):
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


FILTER_QUERY = [
    query("status", {"type": "string", "pattern": STATUS_LIST_PATTERN},
          "only jobs in these states, comma-separated: " + ", ".join(STATUSES)),
    query("workflow", WORKFLOW_NAME, "only this workflow"),
    query("schedule", STR, "only jobs made by this schedule"),
    query("concurrency_key", STR, "only jobs with this concurrency key"),
    query("created_after", RFC3339, "made after (RFC 3339)"),
    query("created_before", RFC3339, "made before (RFC 3339)"),
]

# (method, pattern) -> summary, request body (a SCHEMAS name, "optional:" + name, or None),
# success responses {status: (description, schema or None)}, query parameters.
ROUTE_DOCS = {
    ("GET", "/"): ("Service identity", None, {200: ("The service", "Root")}),
    ("GET", "/openapi.json"): ("This document", None, {200: ("OpenAPI 3.1", "OpenAPI")}),
    ("GET", "/health"): ("Liveness", None, {200: ("Up", "Health")}),
    ("GET", "/public/metrics"): ("Measured uptime, jobs today, audit coverage", None,
                                 {200: ("Metrics", "Metrics")}),
    ("GET", "/metrics"): ("Prometheus metrics, text format 0.0.4 (an admin key, or METRICS_TOKEN as "
                          "a Bearer token)", None, {200: ("The metrics", "text/plain")}),
    ("POST", "/api/v1/intake"): ("Submit a job", "intake",
                                 {202: ("Accepted (or replayed, with Idempotent-Replayed)", "Accepted")}),
    ("POST", "/api/v1/intake/batch"): ("Submit up to 1,000 jobs, accepted or refused together (a "
                                       "refusal's index names the first job refused); idempotency_key "
                                       "(or the Idempotency-Key header) is the batch's own key",
                                       "intake_batch",
                                       {202: ("Accepted, in the order given (or replayed, with "
                                              "Idempotent-Replayed)", "AcceptedBatch")}),
    ("GET", "/api/v1/status/<job_id>"): ("A job's status (in production, for the key that made it "
                                         "or an admin key, unless PUBLIC_JOB_STATUS=1)", None,
                                         {200: ("The job", "JobStatus")},
                                         [query("wait", {"type": "integer", "minimum": 0, "maximum": 30},
                                                "seconds to hold the answer until the job has ended")]),
    ("POST", "/api/v1/_dev/complete/<job_id>"): ("Mark a job succeeded (development only)",
                                                 "optional:dev_complete", {200: ("Done", "Ok")}),
    ("GET", "/api/v1/ops/health"): ("Operational checks (admin)", None,
                                    {200: ("Healthy", "OpsHealth"), 503: ("A check fails", "OpsHealth")}),
    ("GET", "/api/v1/jobs"): ("The caller's jobs, newest first", None, {200: ("A page", "JobList")},
                              [*FILTER_QUERY,
                               query("limit", {"type": "integer", "minimum": 1, "maximum": 100},
                                     "page size, default 20"),
                               query("cursor", {"type": "string", "pattern": "^[0-9]{1,18}$"},
                                     "next_cursor of the previous page")]),
    ("POST", "/api/v1/jobs/cancel"): ("Cancel every job of the caller's that passes the filters "
                                      "(at least one; up to 10,000 a call)", "bulk",
                                      {200: ("What matched, and what changed", "BulkResult")}),
    ("POST", "/api/v1/jobs/retry"): ("Retry every failed or canceled job of the caller's that passes "
                                     "the filters (at least one; up to 10,000 a call)", "bulk",
                                     {200: ("What matched, and what changed", "BulkResult")}),
    ("GET", "/api/v1/workflows"): ("Every known workflow, its limits and live counts", None,
                                   {200: ("The workflows", "WorkflowList")}),
    ("PUT", "/api/v1/workflows/<name>/limits"): ("Set a workflow's limits (admin; null removes one)",
                                                 "limits", {200: ("The limits now", "WorkflowLimits")}),
    ("POST", "/api/v1/schedules"): ("Create a recurring schedule", "schedule",
                                    {201: ("The schedule", "ScheduleEnvelope")}),
    ("GET", "/api/v1/schedules"): ("The caller's schedules", None, {200: ("The schedules", "ScheduleList")}),
    ("GET", "/api/v1/schedules/<name>"): ("A schedule", None, {200: ("The schedule", "ScheduleEnvelope")}),
    ("PATCH", "/api/v1/schedules/<name>"): ("Change or pause a schedule", "schedule_patch",
                                            {200: ("The schedule", "ScheduleEnvelope")}),
    ("DELETE", "/api/v1/schedules/<name>"): ("Delete a schedule", None, {200: ("Deleted", "Deleted")}),
    ("POST", "/api/v1/jobs/claim"): ("Claim the next job, or with max_jobs several (external worker); "
                                     "with wait, held up to that many seconds until one is queued", "claim",
                                     {200: ("Jobs and their leases", "Claimed"),
                                      204: ("Nothing waits (without max_jobs)", None)}),
    ("POST", "/api/v1/jobs/report"): ("Report up to 100 results and failures, each applied on its own "
                                      "(with claim_next, take the next jobs)", "reports",
                                      {200: ("Each report's outcome, in order", "ReportedMany")}),
    ("POST", "/api/v1/jobs/<job_id>/heartbeat"): ("Extend a lease", "heartbeat",
                                                  {200: ("Extended", "Heartbeat")}),
    ("POST", "/api/v1/jobs/<job_id>/complete"): ("Report a result (with claim_next, take the next job)",
                                                 "complete", {200: ("The job", "Reported")}),
    ("POST", "/api/v1/jobs/<job_id>/fail"): ("Report a failure (with claim_next, take the next job)", "fail",
                                             {200: ("The job", "Reported")}),
    ("POST", "/api/v1/jobs/<job_id>/steps"): ("Record a finished step while holding the lease "
                                              "(external worker)", "step",
                                              {200: ("Recorded, or already recorded", "StepRecorded")}),
    ("POST", "/api/v1/events"): ("Send an event: resumes the caller's jobs waiting for it whose match "
                                 "its data holds (an admin key: everyone's); not kept", "event",
                                 {200: ("How many jobs it resumed", "EventDelivered")}),
    ("POST", "/api/v1/jobs/<job_id>/cancel"): ("Cancel a job", None, {200: ("The job", "JobEnvelope")}),
    ("POST", "/api/v1/jobs/<job_id>/retry"): ("Retry a failed or canceled job", None,
                                              {200: ("The job", "JobEnvelope")}),
    ("POST", "/api/v1/jobs/<job_id>/callback/redeliver"): ("Send a finished job's callback again", None,
                                                           {200: ("The job", "JobEnvelope")}),
    ("GET", "/api/v1/usage"): ("Spend, reservations and outcomes", None, {200: ("Usage", "Usage")},
                               [query("from", {"type": "string", "format": "date"}, "first UTC day"),
                                query("to", {"type": "string", "format": "date"}, "last UTC day"),
                                query("group_by", {"enum": ["day", "workflow", "key", "step"]},
                                      "default day")]),
    ("POST", "/api/v1/keys"): ("Create a managed key (admin)", "key_create",
                               {201: ("The key, with its secret shown once", "KeyCreated")}),
    ("GET", "/api/v1/keys"): ("List managed keys (admin)", None, {200: ("The keys", "KeyList")}),
    ("DELETE", "/api/v1/keys/<key_id>"): ("Revoke a managed key (admin)", None,
                                          {200: ("Revoked", "KeyRevoked")}),
    ("POST", "/api/v1/users/upsert"): ("Create or update a user by email", "user_upsert",
                                       {201: ("Created", "UserCreated"), 200: ("Updated", "UserUpdated")}),
    ("GET", "/api/v1/users"): ("Look a user up by email", None, {200: ("The user", "User")},
                               [dict(query("email", {"type": "string", "pattern": "\\S"}, "the address"),
                                     required=True)]),
    ("GET", "/api/v1/users/<user_id>"): ("A user", None, {200: ("The user", "User")}),
    ("PATCH", "/api/v1/users/<user_id>"): ("Update a user", "user_patch", {200: ("Updated", "UserUpdated")}),
    ("GET", "/robots.txt"): ("robots.txt", None, {200: ("The file", "text/plain")}),
    ("GET", "/.well-known/security.txt"): ("security.txt (RFC 9116)", None, {200: ("The file", "text/plain")}),
    ("GET", "/public/<path:path>"): ("Legal and FAQ pages and their assets", None,
                                     {200: ("The file", "text/html"), 304: ("Not modified", None)}),
}

# Routes that check their own credentials (a public route as the router sees it).
SECURITY = {("GET", "/metrics"): [{"ApiKey": []}, {"MetricsToken": []}]}

ERRORS = {400: "Malformed or invalid input", 401: "No API key", 403: "Key not valid, or role not allowed",
          404: "No such thing", 405: "Method not allowed", 409: "Not in a state that allows this",
          411: "Content-Length required", 413: "Body too large", 415: "Body is not JSON",
          422: "Idempotency key reused, or max_cost over the cap",
          429: "Rate limit or daily budget reached", 500: "Unexpected error",
          503: "Queue full or storage busy", 507: "Disk full"}
# Refused by gunicorn's HTTP parser before Levqor sees the request: its own
# small HTML page, not the Error shape.
SERVER_ERRORS = {414: "Request line too long (gunicorn's limit)",
                 431: "Request headers too large (gunicorn's limits)"}


def openapi_path(pattern):
    return pattern.replace("<path:path>", "{path}").replace("<", "{").replace(">", "}")


def build(routes, schemas, version, keyed=lambda access: access != "public",
          key_optional=lambda access: False):
    """The document, for ``routes`` as in wsgi_routes.ROUTES and ``schemas``
    as in schemas.SCHEMAS, describing service version ``version``; a keyed
    route whose access is ``key_optional`` here also answers without a key."""
    components = {name: copy.deepcopy(schema) for name, schema in schemas.items()}
    components.update(copy.deepcopy(RESPONSES))
    paths = {}
    for method, pattern, handler, access, flags in routes:
        summary, body, success, *extra = ROUTE_DOCS[method, pattern]
        op = {"operationId": handler.__name__, "summary": summary, "responses": {}}
        params = [{"name": name.split(":")[-1], "in": "path", "required": True, "schema": STR}
                  for name in _params(pattern)]
        params += extra[0] if extra else []
        if params:
            op["parameters"] = params
        if body:
            optional = body.startswith("optional:")
            op["requestBody"] = {"required": not optional, "content": {
                "application/json": {"schema": ref(body.removeprefix("optional:"))}}}
        if keyed(access):
            op["security"] = [{}, {"ApiKey": []}] if key_optional(access) else [{"ApiKey": []}]
        if (method, pattern) in SECURITY:
            op["security"] = SECURITY[method, pattern]
        for status, (description, schema) in success.items():
            response = {"description": description}
            if schema in RESPONSES:
                response["content"] = {"application/json": {"schema": ref(schema)}}
            elif schema is not None:
                response["content"] = {schema: {"schema": STR}}
            op["responses"][str(status)] = response
        for status, description in ERRORS.items():
            op["responses"].setdefault(str(status), {
                "description": description,
                "content": {"application/json": {"schema": ref("Error")}}})
        for status, description in SERVER_ERRORS.items():
            op["responses"][str(status)] = {"description": description,
                                            "content": {"text/html": {"schema": STR}}}
        paths.setdefault(openapi_path(pattern), {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Levqor", "version": version,
                 "description": "Job orchestration for AI automation, with validation and cost "
                                "guardrails. Errors share one shape: the Error schema."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
                                "MetricsToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def _params(pattern):
    names, rest = [], pattern
    while "<" in rest:
        rest = rest[rest.index("<") + 1:]
        names.append(rest[:rest.index(">")])
    return names
