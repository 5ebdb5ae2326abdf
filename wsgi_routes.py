"""Levqor's HTTP surface: the route table, the router, request and response
helpers, the JSON schemas, and the handlers.

Handlers take a ``Request`` and the path's parameters and return
``(status, headers, body)``; on failure they raise ``HTTPError``, which one
place (``levqor.ErrorGuard``) turns into the JSON error body. This module
owns nothing that lives between requests: stores, settings and the clock
come from ``request.app`` (``levqor.Services``).
"""

import datetime
import email.utils
import hashlib
import hmac
import json
import operator
import os
import re
import time
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import jsonschema
from jsonschema.exceptions import best_match

import callbacks
import openapi
from costs import to_micro, to_usd
from engine import JobError, status_view
from storage import JOB_FINAL, JOB_STATUSES, BudgetExceeded, IdempotencyMismatch, QueueFull, utc_day

STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
VERSION = "1.0.0"

# ---------------------------------------------------------------------------
# Errors and responses
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    """An error answer: status, a stable machine code, a human message.

    ``headers`` are added to the response (Allow, Retry-After, ...);
    ``extra`` fields are added to the JSON body beside error and message.
    """

    def __init__(self, status, code, message, headers=(), **extra):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)
        self.extra = extra

    def body(self, request_id):
        return {"error": self.code, "message": self.message, **self.extra, "request_id": request_id}


# PERF: one encoder, built once; json.dumps with arguments builds one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def json_body(obj):
    return _encode(obj).encode()


def respond(obj, status=200, headers=()):
    body = json_body(obj)
    return status, [("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))), *headers], body


def not_found(what, **ids):
    return HTTPError(404, "not_found", f"{what} not found", **ids)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

_MISSING = object()
MAX_JSON_DEPTH = 32
MAX_QUERY_FIELDS = 20
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def _check_tree(value, check_surrogates):
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not UTF-8."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            if check_surrogates and any(_SURROGATE.search(k) for k in item):
                raise ValueError("string is not valid Unicode")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif check_surrogates and isinstance(item, str) and _SURROGATE.search(item):
            raise ValueError("string is not valid Unicode")


def parse_json(raw):
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth."""
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
        surrogates = _LONE_SURROGATE_ESCAPE.search(text) is not None
        # PERF: the tree walk costs as much as parsing; only deep or escaped
        # documents can fail it, and counting brackets runs at C speed.
        if surrogates or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            _check_tree(value, surrogates)
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        raise HTTPError(400, "invalid_json", f"request body is not valid JSON: {reason}"[:300])


class Request:
    """A thin view over the WSGI environ; query and JSON body parsed lazily, once."""

    __slots__ = ("environ", "app", "method", "path", "key_fp", "role", "key", "_query", "_json")

    def __init__(self, environ, app):
        self.environ = environ
        self.app = app
        self.method = environ["REQUEST_METHOD"]
        self.path = environ.get("PATH_INFO") or "/"
        self.key_fp = None  # who: an API key's fingerprint, a managed key's id, or "open"
        self.role = None    # admin, client or worker
        self.key = None     # the managed key's record, if one was used
        self._query = None
        self._json = _MISSING

    @property
    def request_id(self):
        return self.environ.get("levqor.request_id", "-")

    @property
    def query(self):
        if self._query is None:
            try:
                parsed = parse_qs(self.environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                  max_num_fields=MAX_QUERY_FIELDS, errors="strict")
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "invalid_query", "the query string cannot be parsed")
            repeated = sorted(k for k, v in parsed.items() if len(v) > 1)
            if repeated:  # which one would count is anyone's guess: refuse them all
                raise HTTPError(400, "invalid_query", f"query parameter {repeated[0]!r} is repeated")
            self._query = {k: v[0] for k, v in parsed.items()}
        return self._query

    def _read_body(self, optional):
        environ = self.environ
        limit = self.app.settings.max_content_length
        length = environ.get("CONTENT_LENGTH")
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if length:
            try:
                length = int(length)
            except ValueError:
                raise HTTPError(400, "bad_request", "Content-Length is not a number")
            if length < 0:
                raise HTTPError(400, "bad_request", "Content-Length is negative")
            if length > limit:
                raise HTTPError(413, "payload_too_large", f"request body is over {limit} bytes")
            if length == 0:
                return b""
        elif not chunked:
            if optional:
                return b""
            raise HTTPError(411, "length_required", "a request body needs a Content-Length")
        self._check_content_type()
        try:
            # No length to trust when chunked: read one byte past the cap.
            raw = environ["wsgi.input"].read(limit + 1 if chunked and not length else length)
        except OSError:  # a client that stopped sending (the server's read timeout)
            raise HTTPError(408, "request_timeout", "the request body did not arrive in time")
        except Exception:  # the server could not parse the framing (bad chunks)
            raise HTTPError(400, "bad_request", "the request body's framing is malformed")
        if chunked and not length:
            if len(raw) > limit:
                raise HTTPError(413, "payload_too_large", f"request body is over {limit} bytes")
            return raw
        if len(raw) != length:
            raise HTTPError(400, "incomplete_body", "request body is shorter than its Content-Length")
        return raw

    def _check_content_type(self):
        ctype = self.environ.get("CONTENT_TYPE", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise HTTPError(415, "unsupported_media_type", "request body must be application/json")

    def json(self, optional=False):
        """The body as JSON; with ``optional``, an absent body is ``{}``."""
        if self._json is _MISSING:
            raw = self._read_body(optional)
            if not raw.strip():
                if not optional:
                    raise HTTPError(400, "invalid_json", "request body is empty")
                self._json = {}
            else:
                self._json = parse_json(raw)
        return self._json


# ---------------------------------------------------------------------------
# Schemas (compiled once, at import)
# ---------------------------------------------------------------------------

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("http-url")
def _is_http_url(value):
    if not isinstance(value, str):
        return True
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


LOCALE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}$"
# A plausible address: RFC 5321 atext (and dots) before the @, DNS labels after.
# The schema allows spaces around it; the handler trims and lower-cases.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_PATTERN = rf"^[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{_LABEL}(?:\.{_LABEL})+$"
EMAIL_INPUT_PATTERN = "^[ ]*" + EMAIL_PATTERN[1:-1] + "[ ]*$"
# An http(s) URL whose host is a name ending in a letter label: no literal
# addresses in any spelling, no credentials, a real port. callbacks.url_problem
# checks the same again.
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
CALLBACK_URL_PATTERN = (rf"^https?://(?:{_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z])?"
                        rf"(?::{_PORT})?(?:[/?#][!-~]*)?$")
CURRENCIES = ["GBP", "USD", "EUR"]
MAX_META_BYTES = 16 * 1024

PROGRESS = {
    "type": "object",
    "properties": {"fraction": {"type": "number", "minimum": 0, "maximum": 1},
                   "note": {"type": "string", "maxLength": 200}},
    "required": ["fraction"],
    "additionalProperties": False,
}

# Dollars: a job's running total, as an external worker reports it.
COST = {"type": "number", "minimum": 0, "maximum": 1_000_000}

PROFILE_PROPERTIES = {
    "name": {"type": "string", "maxLength": 200},
    "locale": {"type": "string", "maxLength": 35, "pattern": LOCALE_PATTERN},
    "currency": {"enum": CURRENCIES},
    "meta": {"type": "object", "maxProperties": 100},
}

SCHEMAS = {
    "intake": {
        "type": "object",
        "properties": {
            "workflow": {"type": "string", "minLength": 1, "maxLength": 128},
            "payload": {"type": "object"},
            "callback_url": {"type": "string", "maxLength": 2048, "format": "http-url",
                             "pattern": CALLBACK_URL_PATTERN},
            "priority": {"enum": ["low", "normal", "high"]},
            "max_cost": {"type": "number", "minimum": 0},
        },
        "required": ["workflow", "payload"],
        "additionalProperties": False,
    },
    "dev_complete": {
        "type": "object",
        "properties": {"result": {}},
        "additionalProperties": False,
    },
    "claim": {
        "type": "object",
        "properties": {
            "workflows": {"type": "array", "minItems": 1, "maxItems": 50, "uniqueItems": True,
                          "items": {"type": "string", "minLength": 1, "maxLength": 128}},
            "lease_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
        },
        "required": ["workflows"],
        "additionalProperties": False,
    },
    "heartbeat": {
        "type": "object",
        "properties": {
            "lease_token": {"type": "string", "maxLength": 64},
            "lease_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
            "progress": PROGRESS,
            "cost": COST,
        },
        "required": ["lease_token"],
        "additionalProperties": False,
    },
    "complete": {
        "type": "object",
        "properties": {"lease_token": {"type": "string", "maxLength": 64}, "result": {},
                       "cost": COST},
        "required": ["lease_token", "result"],
        "additionalProperties": False,
    },
    "fail": {
        "type": "object",
        "properties": {"lease_token": {"type": "string", "maxLength": 64},
                       "error": {"type": "string", "minLength": 1, "maxLength": 1000},
                       "retryable": {"type": "boolean"}, "cost": COST},
        "required": ["lease_token", "error"],
        "additionalProperties": False,
    },
    "key_create": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "role": {"enum": ["client", "worker"]},
            "daily_budget": {"type": "number", "minimum": 0, "maximum": 1_000_000},
            "rate_per_minute": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        },
        "required": ["name", "role"],
        "additionalProperties": False,
    },
    "user_upsert": {
        "type": "object",
        "properties": {"email": {"type": "string", "maxLength": 254, "pattern": EMAIL_INPUT_PATTERN},
                       **PROFILE_PROPERTIES},
        "required": ["email"],
        "additionalProperties": False,
    },
    "user_patch": {
        "type": "object",
        "properties": PROFILE_PROPERTIES,
        "minProperties": 1,
        "additionalProperties": False,
    },
}

_PY_TYPES = {"object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
             "integer": (int,), "number": (int, float)}
# keyword -> (the types it bounds, what is measured, how it compares)
_BOUNDS = {
    "minimum": ((int, float), lambda v: v, operator.ge),
    "maximum": ((int, float), lambda v: v, operator.le),
    "minLength": ((str,), len, operator.ge),
    "maxLength": ((str,), len, operator.le),
    "minItems": ((list,), len, operator.ge),
    "maxItems": ((list,), len, operator.le),
    "minProperties": ((dict,), len, operator.ge),
    "maxProperties": ((dict,), len, operator.le),
}
_FAST_KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum", "minLength",
                  "maxLength", "pattern", "format", "minProperties", "maxProperties", "items",
                  "minItems", "maxItems", "uniqueItems", "minimum", "maximum"}


def _all_of(checks):
    def check(value):
        for c in checks:
            if not c(value):
                return False
        return True
    return check


def fast_check(schema):
    """A quick test for the subset of JSON Schema these schemas use.

    PERF: jsonschema costs tens of microseconds per body. This test never
    passes an instance that jsonschema would refuse; when it says no (or
    meets a keyword it does not know, returning None), jsonschema decides
    and explains. So jsonschema stays the authority; this is the fast path
    for the valid bodies that make up nearly all traffic.
    """
    if not set(schema) <= _FAST_KEYWORDS:
        return None
    checks = []
    if "type" in schema:
        py_types = _PY_TYPES.get(schema["type"])
        if py_types is None:
            return None
        checks.append(lambda v: type(v) in py_types)  # exact: a bool is not an int
    for keyword, (types, measure, compare) in _BOUNDS.items():
        if keyword in schema:
            checks.append(lambda v, t=types, m=measure, c=compare, b=schema[keyword]:
                          type(v) not in t or c(m(v), b))
    if "items" in schema:
        item_check = fast_check(schema["items"])
        if item_check is None:
            return None
        checks.append(lambda v: type(v) is not list or all(item_check(i) for i in v))
    if schema.get("uniqueItems"):
        # Only strings are compared here; anything else goes to jsonschema.
        checks.append(lambda v: type(v) is not list or (all(type(i) is str for i in v)
                                                       and len(set(v)) == len(v)))
    if "enum" in schema:
        if not all(type(e) is str for e in schema["enum"]):
            return None
        allowed = frozenset(schema["enum"])
        checks.append(lambda v: type(v) is str and v in allowed)
    if "pattern" in schema:
        search = re.compile(schema["pattern"]).search
        checks.append(lambda v: type(v) is not str or search(v) is not None)
    if "format" in schema:
        fmt = schema["format"]
        checks.append(lambda v: FORMATS.conforms(v, fmt))
    if {"properties", "required", "additionalProperties"} & set(schema):
        props = {k: fast_check(sub) for k, sub in schema.get("properties", {}).items()}
        extra_ok = schema.get("additionalProperties", True)
        if None in props.values() or extra_ok not in (True, False):
            return None
        required = tuple(schema.get("required", ()))

        def check_object(v):
            if type(v) is not dict:
                return True
            for k in required:
                if k not in v:
                    return False
            for k, item in v.items():
                check = props.get(k)
                if check is None:
                    if not extra_ok:
                        return False
                elif not check(item):
                    return False
            return True
        checks.append(check_object)
    return _all_of(checks)


VALIDATORS = {}
FAST_CHECKS = {}
for _name, _schema in SCHEMAS.items():
    jsonschema.Draft202012Validator.check_schema(_schema)
    VALIDATORS[_name] = jsonschema.Draft202012Validator(_schema, format_checker=FORMATS)
    FAST_CHECKS[_name] = fast_check(_schema) or (lambda v: False)

_ERROR_TEXT = {
    "required": "is required",
    "additionalProperties": "is not an accepted field",
    "format": "is not a valid http(s) URL",
    "pattern": "is not valid",
    "minProperties": "must not be empty",
}


def validate(name, instance, validator=None, prefix=()):
    """Raise 400 validation_failed naming the failing field, or return the instance.

    ``name`` picks one of SCHEMAS; or pass a compiled ``validator`` (a
    workflow's payload schema), whose field paths are put under ``prefix``.
    """
    if validator is None:
        if FAST_CHECKS[name](instance):
            return instance
        validator = VALIDATORS[name]
    error = best_match(validator.iter_errors(instance))
    if error is None:
        return instance
    path = [*prefix, *(str(p) for p in error.absolute_path)]
    if error.validator == "required":
        path += [next(p for p in error.validator_value if p not in error.instance)]
    elif error.validator == "additionalProperties":
        allowed = error.schema.get("properties", {})
        path += [sorted(k for k in error.instance if k not in allowed)[0]]
    field = "/".join(path)
    if error.validator == "type":
        text = f"must be of type {error.validator_value}"
    elif error.validator == "enum":
        text = "must be one of " + ", ".join(map(str, error.validator_value))
    elif error.validator in ("minLength", "maxLength"):
        bound = "at least" if error.validator == "minLength" else "at most"
        text = f"must be {bound} {error.validator_value} characters"
    elif error.validator in ("minimum", "maximum", "minItems", "maxItems"):
        bound = "at least" if error.validator.startswith("min") else "at most"
        text = f"must be {bound} {error.validator_value}" + (" items" if "Items" in error.validator else "")
    else:
        text = _ERROR_TEXT.get(error.validator, error.message[:200])
    raise HTTPError(400, "validation_failed", f"{field or 'body'}: {text}", field=field)


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


def authenticate(req):
    """Check X-Api-Key and set who is calling (``key_fp``), in what ``role``.

    ``lq_`` keys are managed keys (client or worker); any other is one of the
    operator's API_KEYS (admin). Missing: 401; not ours, or revoked: 403.
    With no API_KEYS configured (open development mode) a caller without a
    managed key is let in as admin.
    """
    app = req.app
    presented = req.environ.get("HTTP_X_API_KEY")
    if presented and presented.startswith("lq_"):
        key = app.key_store.lookup(presented)
        if key is not None:
            req.key_fp, req.role, req.key = key["id"], key["role"], key
            return
    elif presented and app.keys:
        fp = app.keys.check(presented)
        if fp is not None:
            req.key_fp, req.role = fp, "admin"
            return
    if not app.keys:
        req.key_fp, req.role = "open", "admin"
        return
    if not presented:
        raise HTTPError(401, "unauthorized", "an API key is required (X-Api-Key header)",
                        [("WWW-Authenticate", 'ApiKey header="X-Api-Key"')])
    raise HTTPError(403, "forbidden", "the API key is not valid")


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_EMAIL = re.compile(EMAIL_PATTERN)


def root(req):
    return respond({"ok": True, "service": "levqor-backend", "version": VERSION})


def openapi_document(req):
    body = req.app.openapi_body
    return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                 ("Cache-Control", "public, max-age=300")], body


def health(req):
    # PERF: the hottest endpoint; the same bytes json_body would make.
    body = b'{"ok":true,"ts":%d}' % int(time.time())
    return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


def metrics(req):
    body = req.app.recorder.metrics()
    counts = req.app.jobs.counts()
    body.update(queue_depth=counts["queued_by_priority"], running=counts["by_status"]["running"])
    return respond(body)


def ops_health(req):
    app = req.app
    checks = {}
    try:
        checks["database"] = "ok" if app.db.ping() else "failing"
    except Exception as exc:  # the point of this endpoint is to report, not to fail
        checks["database"] = f"failing: {type(exc).__name__}"
    checks["recorder"] = "ok" if app.recorder.running else "stopped"
    checks["workers"] = "ok" if app.engine.running else "stopped"
    ok = all(v == "ok" for v in checks.values())
    counts = app.jobs.counts()
    return respond({
        "ok": ok,
        "ts": int(time.time()),
        "checks": checks,
        "jobs": counts["by_status"],
        "queue_depth": counts["queued_by_priority"],
        "workflows": sorted(app.engine.registry.names()),
        "audit_pending": app.recorder.pending(),
        "uptime_seconds": int(time.time() - app.started_at),
        "version": VERSION,
    }, 200 if ok else 503)


# -- jobs ------------------------------------------------------------------------

_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
CURSOR_PATTERN = r"^[0-9]{1,18}$"
_CURSOR = re.compile(CURSOR_PATTERN)
IDEMPOTENCY_TTL = 86_400
_JOB_ERRORS = {"not_found": 404, "conflict": 409, "lease_lost": 409, "budget_exceeded": 409}


def _job_call(method, job_id, *args, **kwargs):
    """Run an engine call, its JobError answered with the matching status."""
    if not _JOB_ID.match(job_id):
        raise not_found("job", job_id=job_id)
    try:
        return method(job_id, *args, **kwargs)
    except JobError as exc:
        extra = {"job_id": job_id} if exc.code == "not_found" else {}
        raise HTTPError(_JOB_ERRORS[exc.code], exc.code, exc.message, **extra)


def intake(req):
    app = req.app
    body = validate("intake", req.json())
    if "callback_url" in body:
        problem = callbacks.url_problem(body["callback_url"], app.settings.callback_allow_private)
        if problem is not None:
            raise HTTPError(400, "validation_failed", f"callback_url: {problem}", field="callback_url")
    payload_validator = app.payload_validators.get(body["workflow"])
    if payload_validator is not None:
        validate(None, body["payload"], payload_validator, prefix=("payload",))
    idempotency = None
    idem_key = req.environ.get("HTTP_IDEMPOTENCY_KEY")
    if idem_key is not None:
        if not _IDEMPOTENCY_KEY.match(idem_key):
            raise HTTPError(400, "invalid_idempotency_key",
                            "Idempotency-Key must be 1 to 255 printable ASCII characters")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        idempotency = (req.key_fp, idem_key, digest.hexdigest(), IDEMPOTENCY_TTL)
    try:
        cap = app.guardrails.cap(body.get("max_cost"), app.engine.default_cap(body["workflow"]))
    except ValueError as exc:
        raise HTTPError(422, "cost_cap_exceeded", f"max_cost: {exc}", field="max_cost")
    job = app.engine.new_job(body["workflow"], body["payload"], body.get("priority", "normal"),
                             body.get("callback_url"), req.key_fp, cap)
    _reserve(req, job)
    try:
        submitted, created = app.engine.submit(job, idempotency)
    except QueueFull:
        app.guardrails.settle(job, "intake refused: queue full")
        raise HTTPError(503, "queue_full", "too many jobs are held; try again later",
                        [("Retry-After", "30")])
    except IdempotencyMismatch:
        app.guardrails.settle(job, "intake refused: idempotency key reused")
        raise HTTPError(422, "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request body")
    if not created:
        app.guardrails.settle(job, "idempotent replay")
    job = submitted
    headers = [("Location", f"/api/v1/status/{job['job_id']}")]
    if created:
        app.recorder.count("jobs")
    else:
        headers.append(("Idempotent-Replayed", "true"))
    # A replay answers exactly what the first request was answered.
    return respond({"job_id": job["job_id"], "status": "queued"}, 202, headers)


def _reserve(req, job):
    """Reserve the job's cap against today's budgets; 429 if one would be passed."""
    try:
        req.app.guardrails.reserve(job, req.key)
    except BudgetExceeded as exc:
        retry_after, state = req.app.guardrails.refusal(exc)
        raise HTTPError(429, "budget_exceeded", f"the {state['scope']} daily budget is spent",
                        [("Retry-After", str(retry_after))], budget=state)


def _own_job(req, job_id):
    """A job the caller may act on: clients only their own (others: 404)."""
    job = _job_call(req.app.engine.get, job_id)
    if req.role == "client" and job["key_fp"] != req.key_fp:
        raise not_found("job", job_id=job_id)
    return job


def job_status(req, job_id):
    return respond(status_view(_job_call(req.app.engine.get, job_id)))


def dev_complete(req, job_id):
    body = validate("dev_complete", req.json(optional=True))
    job = _job_call(req.app.engine.get, job_id)
    now = req.app.engine.now()
    done = req.app.jobs.update(job_id, status="succeeded", result=body.get("result", {"ok": True}),
                               error=None, updated_at=now, finished_at=now, lease_token=None,
                               lease_expires_at=None)
    if job["status"] not in JOB_FINAL:
        req.app.engine.finished(done)
    return respond({"ok": True})


def job_cancel(req, job_id):
    _own_job(req, job_id)
    return respond({"job": status_view(_job_call(req.app.engine.cancel, job_id))})


def job_retry(req, job_id):
    job = _own_job(req, job_id)
    if job["status"] in ("failed", "canceled"):
        _reserve(req, job)  # the job's cap again, against today's budgets
    try:
        return respond({"job": status_view(_job_call(req.app.engine.retry, job_id))})
    except HTTPError:
        if job["status"] in ("failed", "canceled"):
            req.app.guardrails.settle(job, "retry refused")
        raise


def job_redeliver(req, job_id):
    job = _own_job(req, job_id)
    if job["status"] not in JOB_FINAL:
        raise HTTPError(409, "conflict", "only a finished job has a notification to send")
    if not job.get("callback_url"):
        raise HTTPError(409, "conflict", "the job has no callback_url")
    return respond({"job": status_view(req.app.callbacks.redeliver(job))})


def job_claim(req):
    body = validate("claim", req.json())
    job = req.app.engine.claim(body["workflows"], body.get("lease_seconds", 60))
    if job is None:
        return 204, [], b""
    return respond({"job": {"job_id": job["job_id"], "workflow": job["workflow"],
                            "payload": job["payload"], "priority": job["priority"],
                            "attempt": job["attempts"], "max_attempts": job["max_attempts"],
                            "lease_token": job["lease_token"],
                            "lease_expires_at": job["lease_expires_at"]}})


def job_heartbeat(req, job_id):
    body = validate("heartbeat", req.json())
    job = _job_call(req.app.engine.heartbeat, job_id, body["lease_token"],
                    body.get("lease_seconds"), body.get("progress"), body.get("cost"))
    return respond({"job_id": job_id, "lease_expires_at": job["lease_expires_at"],
                    "cancel_requested": job["cancel_requested"]})


def job_complete(req, job_id):
    body = validate("complete", req.json())
    job = _job_call(req.app.engine.report, job_id, body["lease_token"], result=body["result"],
                    cost=body.get("cost"))
    return respond({"job": status_view(job)})


def job_fail(req, job_id):
    body = validate("fail", req.json())
    job = _job_call(req.app.engine.report, job_id, body["lease_token"], error=body["error"],
                    retryable=body.get("retryable", True), cost=body.get("cost"))
    return respond({"job": status_view(job)})


def _query_int(req, name, default, low, high):
    raw = req.query.get(name)  # present but empty is a value, and not a number
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise HTTPError(400, "invalid_query", f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def job_list(req):
    query = req.query
    limit = _query_int(req, "limit", 20, 1, 100)
    status = query.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise HTTPError(400, "invalid_query", "status must be one of " + ", ".join(JOB_STATUSES))
    before = None
    if "cursor" in query:
        # Opaque to clients; in fact the position to continue below.
        if not _CURSOR.match(query["cursor"]):
            raise HTTPError(400, "invalid_cursor", "the cursor is not one this service gave")
        before = int(query["cursor"])
    jobs, more = req.app.jobs.page(req.key_fp, status, query.get("workflow"), limit, before)
    cursor = str(jobs[-1]["seq"]) if more else None
    return respond({"jobs": [status_view(j) for j in jobs], "next_cursor": cursor})


# -- money and keys ------------------------------------------------------------------

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _day(req, name, default):
    raw = req.query.get(name, default)
    try:
        if not _DAY.match(raw):
            raise ValueError
        return datetime.date.fromisoformat(raw)
    except ValueError:
        raise HTTPError(400, "invalid_query", f"{name} must be a date, YYYY-MM-DD")


def usage(req):
    today = utc_day(req.app.engine.now())
    # A range from after to is simply empty; a long one costs no more than
    # the ledger rows it holds (the query is an index range).
    first, last = _day(req, "from", today), _day(req, "to", today)
    group_by = req.query.get("group_by", "day")
    if group_by not in ("day", "workflow", "key"):
        raise HTTPError(400, "invalid_query", "group_by must be day, workflow or key")
    scope = None if req.role == "admin" else req.key_fp  # a client sees its own
    groups = req.app.ledger.usage(first.isoformat(), last.isoformat(), group_by, scope)
    rows = [{group_by: name, "spend": to_usd(g["spend"]), "reserved": to_usd(g["reserved"]),
             "jobs": g["jobs"]} for name, g in sorted(groups.items())]
    return respond({"from": first.isoformat(), "to": last.isoformat(), "group_by": group_by,
                    "groups": rows,
                    "totals": {"spend": to_usd(sum(g["spend"] for g in groups.values())),
                               "reserved": to_usd(sum(g["reserved"] for g in groups.values()))}})


def _key_view(key, spent_today=0):
    view = {k: key[k] for k in ("id", "name", "role", "prefix", "created_at", "last_used_at",
                                "rate_per_minute", "revoked_at")}
    view.update(daily_budget=to_usd(key["daily_budget"]), spend_today=to_usd(spent_today),
                revoked=key["revoked_at"] is not None)
    return view


def key_create(req):
    body = validate("key_create", req.json())
    budget = body.get("daily_budget")
    record, secret = req.app.key_store.create(body["name"], body["role"],
                                              None if budget is None else to_micro(budget),
                                              body.get("rate_per_minute"))
    # The secret is shown this once; only its digest is kept.
    return respond({**_key_view(record), "key": secret}, 201,
                   [("Location", f"/api/v1/keys/{record['id']}"), ("Cache-Control", "no-store")])


def key_list(req):
    today = utc_day(req.app.engine.now())
    spent = req.app.ledger.usage(today, today, "key")
    return respond({"keys": [_key_view(k, spent.get(k["id"], {}).get("spend", 0))
                             for k in req.app.key_store.list()]})


def key_revoke(req, key_id):
    key = req.app.key_store.revoke(key_id)
    if key is None:
        raise not_found("key", key_id=key_id)
    return respond({"revoked": True, "key": _key_view(key)})


# -- users -------------------------------------------------------------------------


def _normalise_email(raw):
    email_addr = raw.strip().lower()
    if len(email_addr) > 254 or not _EMAIL.match(email_addr):
        raise HTTPError(400, "validation_failed", "email: is not a plausible email address",
                        field="email")
    return email_addr


def _check_meta(body):
    if "meta" in body and len(json_body(body["meta"])) > MAX_META_BYTES:
        raise HTTPError(400, "validation_failed",
                        f"meta: must be at most {MAX_META_BYTES} bytes as JSON", field="meta")


def user_upsert(req):
    body = validate("user_upsert", req.json())
    email_addr = _normalise_email(body.pop("email"))
    _check_meta(body)
    created, user = req.app.users.upsert(email_addr, body)
    if created:
        return respond({"created": True, "user": user}, 201,
                       [("Location", f"/api/v1/users/{user['id']}")])
    return respond({"updated": True, "user": user})


def user_lookup(req):
    raw = req.query.get("email")
    if not raw or not raw.strip():
        raise HTTPError(400, "missing_email", "the email query parameter is required")
    user = req.app.users.get_by_email(raw.strip().lower()[:320])
    if user is None:
        raise not_found("user")
    return respond(user)


def user_get(req, user_id):
    user = req.app.users.get(user_id) if _JOB_ID.match(user_id) else None
    if user is None:
        raise not_found("user", user_id=user_id)
    return respond(user)


def user_patch(req, user_id):
    body = req.json()
    if isinstance(body, dict) and "email" in body:
        raise HTTPError(400, "validation_failed", "email: cannot be changed; upsert the new address",
                        field="email")
    validate("user_patch", body)
    _check_meta(body)
    user = req.app.users.patch(user_id, body) if _JOB_ID.match(user_id) else None
    if user is None:
        raise not_found("user", user_id=user_id)
    return respond({"updated": True, "user": user})


# -- static files -------------------------------------------------------------

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_BAD_PATH_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


def _resolve_static(root, rel):
    """The real path of ``rel`` inside ``root``, or None: nothing outside is reachable."""
    # PATH_INFO arrives percent-decoded, so %2e%2e and %2f are already '..' and '/'.
    if _BAD_PATH_CHARS.search(rel):
        return None
    parts = rel.split("/")
    if parts and parts[-1] == "":
        parts[-1] = "index.html"
    if any(p in ("", ".", "..") for p in parts):
        return None
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.isdir(path):
        path = os.path.join(path, "index.html")
    # realpath resolves symlinks: one pointing out of public/ fails this test.
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path


def _not_modified(req, etag, mtime):
    inm = req.environ.get("HTTP_IF_NONE_MATCH")
    if inm is not None:
        tags = [t.strip().removeprefix("W/") for t in inm.split(",")]
        return "*" in tags or etag in tags
    ims = req.environ.get("HTTP_IF_MODIFIED_SINCE")
    if ims:
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return int(mtime) <= since
    return False


def static_file(req, path):
    root = req.app.settings.public_dir
    full = _resolve_static(root, path)
    ctype = full and CONTENT_TYPES.get(os.path.splitext(full)[1].lower())
    if not ctype:
        raise not_found("file")
    st = os.stat(full)
    etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
    headers = [("ETag", etag),
               ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
               ("Cache-Control", "public, max-age=300")]
    if _not_modified(req, etag, st.st_mtime):
        return 304, headers, b""
    with open(full, "rb") as f:
        body = f.read()
    return 200, [("Content-Type", ctype), ("Content-Length", str(len(body))), *headers], body


def robots(req):
    return static_file(req, "robots.txt")


def security_txt(req):
    return static_file(req, ".well-known/security.txt")


# ---------------------------------------------------------------------------
# The route table
# ---------------------------------------------------------------------------

# What a route asks of the caller:
PUBLIC = "public"
KEY = "key"              # a valid X-Api-Key (unless no keys are configured)
USER_READ = "user_read"  # KEY, unless PUBLIC_USER_READS=1

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
    ("POST", "/api/v1/intake", intake, KEY, ("audit",)),
    ("GET", "/api/v1/status/<job_id>", job_status, PUBLIC, ()),
    ("POST", "/api/v1/_dev/complete/<job_id>", dev_complete, KEY, ("audit", "dev")),
    ("GET", "/api/v1/ops/health", ops_health, KEY, ("admin",)),
    ("GET", "/api/v1/jobs", job_list, KEY, ()),
    ("POST", "/api/v1/jobs/claim", job_claim, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/heartbeat", job_heartbeat, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/complete", job_complete, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/fail", job_fail, KEY, ("audit", "worker")),
    ("POST", "/api/v1/jobs/<job_id>/cancel", job_cancel, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/<job_id>/retry", job_retry, KEY, ("audit",)),
    ("POST", "/api/v1/jobs/<job_id>/callback/redeliver", job_redeliver, KEY, ("audit",)),
    ("GET", "/api/v1/usage", usage, KEY, ()),
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
        if unknown or access not in (PUBLIC, KEY, USER_READ):
            raise ValueError(f"route {method} {pattern}: bad access or flags")
        self.method, self.pattern, self.handler, self.access = method, pattern, handler, access
        self.audit = "audit" in flags
        self.dev = "dev" in flags
        self.worker = "worker" in flags
        self.roles = ({"admin"} if "admin" in flags else
                      {"admin", "worker"} if self.worker else {"admin", "client"})


_PARAM = re.compile(r"<(?:(path):)?([a-z_][a-z0-9_]*)>")


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
        """({method: Route}, params) for a path, or (None, None)."""
        methods = self.static.get(path)
        if methods is not None:
            return methods, {}
        m = self.regex.match(path) if self.regex else None
        if m is None:
            return None, None
        params, methods = self.dynamic[int(m.lastgroup[1:])]
        return methods, {name: m.group(group) for group, name in params}

    def is_worker(self, method, path):
        """Whether method and path name a route of the external worker protocol."""
        methods, _ = self.methods_for(path)
        route = methods.get(method) if methods else None
        return route is not None and route.worker

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


def openapi_body(max_cost_per_job):
    """The OpenAPI document, from the route table and the schemas the
    validators use, with this service's cost cap (built once per app)."""
    schemas = dict(SCHEMAS, intake=json.loads(json.dumps(SCHEMAS["intake"])))
    schemas["intake"]["properties"]["max_cost"]["maximum"] = max_cost_per_job / 1_000_000
    return json_body(openapi.build(ROUTES, schemas))


class Api:
    """The innermost WSGI app: route, authenticate, call the handler, audit."""

    def __init__(self, services, router=ROUTER):
        self.services = services
        self.router = router

    def __call__(self, environ, start_response):
        req = Request(environ, self.services)
        if req.method == "OPTIONS":
            methods, _ = self.router.methods_for(req.path)
            if methods is None:
                raise HTTPError(404, "not_found", "no such endpoint")
            start_response("204 No Content", [("Allow", self.router.allow(methods))])
            return []
        route, params = self.router.match(req.method, req.path)
        if route.dev and not self.services.settings.dev_endpoints:
            raise HTTPError(404, "not_found", "no such endpoint")
        if route.access == KEY or (route.access == USER_READ
                                   and not self.services.settings.public_user_reads):
            authenticate(req)  # unauthenticated requests are refused here, unaudited
        if not route.audit:
            self._admit(req, route)
            status, headers, body = route.handler(req, **params)
        else:
            status = 500
            try:
                self._admit(req, route)  # a refusal for role or rate is audited too
                status, headers, body = route.handler(req, **params)
            except HTTPError as exc:
                status = exc.status
                raise
            finally:
                self.services.recorder.audit(req.key_fp, req.method, req.path, status,
                                             req.request_id)
        start_response(STATUS_LINES[status], headers)
        return [] if req.method == "HEAD" else [body]

    def _admit(self, req, route):
        """An authenticated caller's role, and its managed key's rate limit."""
        if req.role is None:
            return  # a public route
        if req.role not in route.roles:
            raise HTTPError(403, "forbidden", f"a {req.role} key may not use this endpoint")
        rate = req.key and req.key["rate_per_minute"]
        if rate:
            refused = self.services.key_buckets.take(((("key", req.key_fp), rate),))
            if refused is not None:
                raise HTTPError(429, "rate_limited", "this key's rate limit is reached",
                                [("Retry-After", str(refused[3])), ("RateLimit-Limit", str(rate)),
                                 ("RateLimit-Remaining", "0"), ("RateLimit-Reset", str(refused[2]))])
