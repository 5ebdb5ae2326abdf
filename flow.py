"""Handlers for flow control: when jobs run (delays, schedules), how many
at once (workflow limits), after what (dependencies), and finding and
acting on many jobs at once (search, bulk cancel and retry).

Intake itself is in ``wsgi_routes``; it asks ``run_at`` and ``parents``
here. Every read and bulk action is scoped to the caller's key, as every
job read is.
"""

import datetime
import re

import callbacks
from cron import CronError
from engine import JobError, status_view
from jobstore import FILTERS, JOB_STATUSES, WORKFLOW_NAME_PATTERN
from schedules import SPEC_FIELDS, timing
from schemas import validate
from web import HTTPError, not_found, respond, whole_number

MAX_DELAY = 31_536_000  # seconds: a job may be put off a year at most
_WORKFLOW = re.compile(WORKFLOW_NAME_PATTERN)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CURSOR = re.compile(r"^[0-9]{1,18}$")


def timestamp(text, field):
    """Unix seconds of an RFC 3339 date-time with an offset; 400 otherwise."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper() and " " not in text:
        raise HTTPError(400, "validation_failed",
                        f"{field}: must be an RFC 3339 date-time with an offset, such as "
                        "2026-01-31T09:00:00Z", field=field)
    return moment.timestamp()


def run_at(body, now):
    """When an intake's job may start (``run_at`` or ``delay``), or None: now."""
    if "run_at" in body and "delay" in body:
        raise HTTPError(400, "validation_failed", "run_at: give run_at or delay, not both",
                        field="run_at")
    if "delay" in body:
        return now + body["delay"] if body["delay"] else None
    if "run_at" not in body:
        return None
    at = timestamp(body["run_at"], "run_at")
    if at > now + MAX_DELAY:
        raise HTTPError(400, "validation_failed", "run_at: must be within a year", field="run_at")
    return at if at > now else None  # in the past: now


def parents(req, ids):
    """The jobs an intake's job depends on, each one the caller may read;
    400 naming the first that is unknown or not the caller's."""
    engine = req.services.engine
    for job_id in ids:
        try:
            job = engine.get(job_id) if _JOB_ID.match(job_id) else None
        except JobError:
            job = None
        if job is None or req.role == "client" and job["key_id"] != req.key_id:
            raise HTTPError(400, "validation_failed", f"depends_on: no job {job_id} of yours",
                            field="depends_on")
        if len(job.get("children") or ()) >= engine.MAX_CHILDREN:
            raise HTTPError(400, "validation_failed", f"depends_on: job {job_id} has "
                            f"{engine.MAX_CHILDREN} dependents already", field="depends_on")
    return list(ids)


# -- finding jobs, and acting on many ------------------------------------------------------


def filters(source, where="query"):
    """The job filters (jobstore.FILTERS) in a query string or a JSON body."""
    found = {}
    for name in FILTERS:
        value = source.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 200:
            raise HTTPError(400, f"invalid_{where}", f"{name} must be text of at most 200 characters")
        if name == "status":
            statuses = [s.strip() for s in value.split(",")]
            unknown = [s for s in statuses if s not in JOB_STATUSES]
            if unknown:
                raise HTTPError(400, f"invalid_{where}",
                                f"status {unknown[0]!r} is not one of " + ", ".join(JOB_STATUSES))
            found[name] = statuses
        elif name in ("created_after", "created_before"):
            found[name] = timestamp(value, name)
        elif name == "workflow" and not _WORKFLOW.match(value):
            raise HTTPError(400, f"invalid_{where}", "workflow is not a workflow name")
        else:
            found[name] = value
    return found


def job_list(req):
    query = req.query
    limit = whole_number(query.get("limit", "20"))  # present but empty is a value, and not a number
    if limit is None or not 1 <= limit <= 100:
        raise HTTPError(400, "invalid_query", "limit must be a whole number from 1 to 100")
    before = None
    if "cursor" in query:
        # Opaque to clients; in fact the position to continue below.
        if not _CURSOR.match(query["cursor"]):
            raise HTTPError(400, "invalid_cursor", "the cursor is not one this service gave")
        before = int(query["cursor"])
    jobs, more = req.services.engine.page(req.key_id, filters(query), limit, before)
    cursor = str(jobs[-1]["seq"]) if more else None
    return respond({"jobs": [status_view(j) for j in jobs], "next_cursor": cursor})


def _bulk(req, action):
    body = validate("bulk", req.json())
    matched, changed = req.services.engine.bulk(req.key_id, filters(body, "request"), action, req.key)
    return respond({"matched": matched, "changed": changed})


def jobs_cancel(req):
    return _bulk(req, "cancel")


def jobs_retry(req):
    return _bulk(req, "retry")


# -- workflows and their limits -------------------------------------------------------------


def workflow_limits(req, name):
    if not _WORKFLOW.match(name):
        raise not_found("workflow", workflow=name)
    body = validate("limits", req.json())
    engine = req.services.engine
    limits = {k: v for k, v in {**engine.limits().get(name, {}), **body}.items() if v is not None}
    engine.set_limits(name, limits)
    return respond({"workflow": name, "limits": _limits_view(limits)})


def _limits_view(limits):
    return {"max_concurrency": limits.get("max_concurrency"),
            "max_concurrency_per_key": limits.get("max_concurrency_per_key"),
            "rate": limits.get("rate")}


def workflow_list(req):
    """Every workflow known (registered, limited, or with jobs held), with
    its limits and live counts."""
    engine = req.services.engine
    limits = engine.limits()
    counts = engine.counts()["by_workflow"]
    names = sorted(set(engine.registry.names()) | set(limits) | set(counts))
    return respond({"workflows": [
        {"name": name, "in_process": engine.registry.get(name) is not None,
         "limits": _limits_view(limits.get(name, {})),
         "counts": {s: counts.get(name, {}).get(s, 0) for s in ("scheduled", "queued", "running")}}
        for name in names]})


# -- schedules ---------------------------------------------------------------------------------


def _spec(req, body):
    """A schedule's definition, checked: a known clock, a cost within the
    caps, a callback URL that may be called."""
    if ("cron" in body) == ("every" in body):
        raise HTTPError(400, "validation_failed", "cron: give cron or every, not both nor neither",
                        field="cron")
    if "timezone" in body and "cron" not in body:
        raise HTTPError(400, "validation_failed", "timezone: only a cron schedule has one",
                        field="timezone")
    spec = {k: body.get(k) for k in SPEC_FIELDS}
    try:
        timing(spec)
    except CronError as exc:
        field = "timezone" if str(exc).startswith("timezone") else "cron"
        raise HTTPError(400, "validation_failed", str(exc), field=field)
    services = req.services
    try:
        services.guardrails.cap(spec["max_cost"], services.engine.default_cap(spec["workflow"]))
    except ValueError as exc:
        raise HTTPError(422, "cost_cap_exceeded", f"max_cost: {exc}", field="max_cost")
    if spec["callback_url"] is not None:
        problem = callbacks.url_problem(spec["callback_url"], services.settings.callback_allow_private)
        if problem is not None:
            raise HTTPError(400, "validation_failed", f"callback_url: {problem}", field="callback_url")
    return spec


def _schedule_view(schedule):
    return {k: v for k, v in schedule.items() if k != "key_id"}


def schedule_create(req):
    body = validate("schedule", req.json())
    spec = _spec(req, body)
    made = req.services.schedules.create(req.key_id, body["name"], spec, body.get("paused", False))
    if made is None:
        raise HTTPError(409, "conflict", f"a schedule named {body['name']} exists", name=body["name"])
    return respond({"schedule": _schedule_view(made)}, 201,
                   [("Location", f"/api/v1/schedules/{body['name']}")])


def schedule_list(req):
    return respond({"schedules": [_schedule_view(s) for s in req.services.schedules.list(req.key_id)]})


def _schedule(req, name):
    found = req.services.schedules.get(req.key_id, name)
    if found is None:
        raise not_found("schedule", name=name)
    return found


def schedule_get(req, name):
    return respond({"schedule": _schedule_view(_schedule(req, name))})


def schedule_patch(req, name):
    body = validate("schedule_patch", req.json())
    current = _schedule(req, name)
    merged = {k: current[k] for k in SPEC_FIELDS if current[k] is not None}
    if "cron" in body or "every" in body:  # a new clock replaces the old one
        merged = {k: v for k, v in merged.items() if k not in ("cron", "every", "timezone")}
    merged.update({k: v for k, v in body.items() if k in SPEC_FIELDS})
    spec = _spec(req, {k: v for k, v in merged.items() if v is not None})
    changed = req.services.schedules.change(req.key_id, name, spec, body.get("paused", current["paused"]))
    if changed is None:
        raise not_found("schedule", name=name)
    return respond({"schedule": _schedule_view(changed)})


def schedule_delete(req, name):
    if not req.services.schedules.delete(req.key_id, name):
        raise not_found("schedule", name=name)
    return respond({"deleted": name})
