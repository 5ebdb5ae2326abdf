"""Handlers for what a key holds besides jobs: its spend (usage), the
managed API keys, and user profiles, which belong to the key that made
them. Routed from ``wsgi_routes.ROUTES``."""

import datetime
import re

from costs import to_micro, to_usd, utc_day
from schemas import EMAIL_PATTERN, validate
from storage import MetaTooLarge
from web import HTTPError, not_found, respond

_USER_ID = re.compile(r"^[0-9a-f]{32}$")
_EMAIL = re.compile(EMAIL_PATTERN)

# -- money and keys ------------------------------------------------------------------

_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _day(req, name, default):
    raw = req.query.get(name, default)
    try:
        if not _DAY.match(raw):
            raise ValueError
        return datetime.date.fromisoformat(raw)
    except ValueError:
        raise HTTPError(400, "invalid_query", f"{name} must be a date, YYYY-MM-DD")


def usage(req):
    today = utc_day(req.services.engine.now())
    # A range from after to is simply empty; a long one costs no more than
    # the ledger rows it holds (the query is an index range).
    first, last = _day(req, "from", today), _day(req, "to", today)
    group_by = req.query.get("group_by", "day")
    if group_by not in ("day", "workflow", "key", "step"):
        raise HTTPError(400, "invalid_query", "group_by must be day, workflow, key or step")
    scope = None if req.role == "admin" else req.key_id  # a client sees its own
    groups = req.services.ledger.usage(first.isoformat(), last.isoformat(), group_by, scope)
    rows = [{group_by: name, "spend": to_usd(g["spend"]), "reserved": to_usd(g["reserved"]),
             "jobs": g["jobs"]} for name, g in sorted(groups.items())]
    return respond({"from": first.isoformat(), "to": last.isoformat(), "group_by": group_by,
                    "groups": rows,
                    "totals": {"spend": to_usd(sum(g["spend"] for g in groups.values())),
                               "reserved": to_usd(sum(g["reserved"] for g in groups.values()))}})


def _key_view(req, key, spent_today=0):
    view = {k: key[k] for k in ("id", "name", "role", "prefix", "created_at", "last_used_at",
                                "rate_per_minute", "revoked_at", "workflows")}
    # The budget that applies: the key's own, else KEY_DAILY_BUDGET.
    view.update(daily_budget=to_usd(req.services.guardrails.daily_budget(key)),
                spend_today=to_usd(spent_today), revoked=key["revoked_at"] is not None)
    return view


def key_create(req):
    body = validate("key_create", req.json())
    budget = body.get("daily_budget")
    record, secret = req.services.key_store.create(body["name"], body["role"],
                                              None if budget is None else to_micro(budget),
                                              body.get("rate_per_minute"), body.get("workflows"))
    # The secret is shown this once; only its digest is kept.
    return respond({**_key_view(req, record), "key": secret}, 201,
                   [("Location", f"/api/v1/keys/{record['id']}"), ("Cache-Control", "no-store")])


def key_list(req):
    today = utc_day(req.services.engine.now())
    spent = req.services.ledger.usage(today, today, "key")
    return respond({"keys": [_key_view(req, k, spent.get(k["id"], {}).get("spend", 0))
                             for k in req.services.key_store.list()]})


def key_revoke(req, key_id):
    key = req.services.key_store.revoke(key_id)
    if key is None:
        raise not_found("key", key_id=key_id)
    return respond({"revoked": True, "key": _key_view(req, key)})


# -- users -------------------------------------------------------------------------


def _normalise_email(raw):
    email_addr = raw.strip().lower()
    if len(email_addr) > 254 or not _EMAIL.match(email_addr):
        raise HTTPError(400, "validation_failed", "email: is not a plausible email address",
                        field="email")
    return email_addr


def _owner(req):
    """Whose profiles the caller works with: a managed key's own; the
    operator's ("admin") for admin keys and open mode, whichever key of
    theirs (rotation keeps them); None for an anonymous public read."""
    if req.role is None:
        return None
    return req.key_id if req.key is not None else "admin"


def _users_call(method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except MetaTooLarge as exc:
        raise HTTPError(400, "validation_failed", str(exc), field="meta")


def user_upsert(req):
    body = validate("user_upsert", req.json())
    email_addr = _normalise_email(body.pop("email"))
    created, user = _users_call(req.services.users.upsert, _owner(req), email_addr, body)
    if created:
        return respond({"created": True, "user": user}, 201,
                       [("Location", f"/api/v1/users/{user['id']}")])
    return respond({"updated": True, "user": user})


def user_lookup(req):
    raw = req.query.get("email")
    if not raw or not raw.strip():
        raise HTTPError(400, "missing_email", "the email query parameter is required")
    # Anonymous public reads (PUBLIC_USER_READS=1, the seed's behaviour) see
    # the operator's profiles.
    user = req.services.users.get_by_email(raw.strip().lower()[:320], _owner(req) or "admin")
    if user is None:
        raise not_found("user")
    return respond(user)


def _scope(req):
    """The owner a read or change by id is limited to: admin keys reach
    every profile, a managed key its own, and an anonymous public read
    (PUBLIC_USER_READS=1) the operator's, as the single-tenant seed did."""
    return None if req.role == "admin" else _owner(req) or "admin"


def user_get(req, user_id):
    user = req.services.users.get(user_id, _scope(req)) if _USER_ID.match(user_id) else None
    if user is None:
        raise not_found("user", user_id=user_id)
    return respond(user)


def user_patch(req, user_id):
    body = req.json()
    if isinstance(body, dict) and "email" in body:
        raise HTTPError(400, "validation_failed", "email: cannot be changed; upsert the new address",
                        field="email")
    validate("user_patch", body)
    user = None
    if _USER_ID.match(user_id):
        user = _users_call(req.services.users.patch, user_id, body, _scope(req))
    if user is None:
        raise not_found("user", user_id=user_id)
    return respond({"updated": True, "user": user})
