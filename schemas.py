"""The JSON schemas of request bodies, compiled once at import, and
``validate``, which answers a refusal with 400 naming the failing field.

jsonschema is the authority; ``fast_check`` is a compiled shortcut for the
valid bodies that make up nearly all traffic (see its docstring). The
OpenAPI document (``openapi.py``) is built from these same schemas.
"""

import operator
import re
from urllib.parse import urlsplit

import jsonschema
from jsonschema.exceptions import best_match

from jobstore import FILTERS, MAX_RATE_WINDOW, WORKFLOW_NAME_PATTERN
from web import HTTPError

FORMATS = jsonschema.FormatChecker(formats=())


def python_pattern(pattern):
    """A schema's pattern as Python must search for it. In a JSON Schema
    (ECMA 262) pattern, $ is the end of the string; in Python's, it also
    matches before a final newline, which would let "name\n" through."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern_keyword(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not python_pattern(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# jsonschema's validator with ECMA's meaning of $ in patterns.
Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                         {"pattern": _pattern_keyword})


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
# RFC 3339 date-time with an offset (a calendar check follows in flow.timestamp).
RFC3339_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3])"
                   r":[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")
RFC3339 = {"type": "string", "maxLength": 40, "pattern": RFC3339_PATTERN}
STATUS_LIST_PATTERN = ("^({0})(,({0}))*$".format(
    "|".join(("scheduled", "waiting", "queued", "running", "succeeded", "failed", "canceled"))))
WORKFLOW_NAME = {"type": "string", "minLength": 1, "maxLength": 128,
                 "pattern": WORKFLOW_NAME_PATTERN}
CURRENCIES = ["GBP", "USD", "EUR"]
MAX_META_BYTES = 16 * 1024
MAX_META_KEYS = 100

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
    "meta": {"type": "object", "maxProperties": MAX_META_KEYS},
}

SCHEDULE_PROPERTIES = {
    "name": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": WORKFLOW_NAME_PATTERN},
    "workflow": WORKFLOW_NAME,
    "payload": {"type": "object"},
    "priority": {"enum": ["low", "normal", "high"]},
    "max_cost": {"type": "number", "minimum": 0},
    "callback_url": {"type": "string", "maxLength": 2048, "format": "http-url",
                     "pattern": CALLBACK_URL_PATTERN},
    "cron": {"type": "string", "minLength": 1, "maxLength": 200},
    "timezone": {"type": "string", "minLength": 1, "maxLength": 64,
                 "pattern": r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"},
    "every": {"type": "integer", "minimum": 1, "maximum": 31_536_000},
    "paused": {"type": "boolean"},
}

IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII
MAX_BATCH = 1000      # jobs in one POST /api/v1/intake/batch
MAX_CLAIM_JOBS = 100  # jobs one claim may take
MAX_REPORTS = 100     # completions and failures in one POST /api/v1/jobs/report
MAX_CLAIM_WAIT = 30   # seconds a claim may wait for a job
CLAIM_PROPERTIES = {
    "workflows": {"type": "array", "minItems": 1, "maxItems": 50, "uniqueItems": True,
                  "items": WORKFLOW_NAME},
    "lease_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
}
# On a report: the worker's next job in the same round trip (the answer's "next").
CLAIM_NEXT = {"type": "object", "properties": CLAIM_PROPERTIES, "required": ["workflows"],
              "additionalProperties": False}

SCHEMAS = {
    "intake": {
        "type": "object",
        "properties": {
            "workflow": WORKFLOW_NAME,
            "payload": {"type": "object"},
            "callback_url": {"type": "string", "maxLength": 2048, "format": "http-url",
                             "pattern": CALLBACK_URL_PATTERN},
            "priority": {"enum": ["low", "normal", "high"]},
            "max_cost": {"type": "number", "minimum": 0},
            "run_at": RFC3339,
            "delay": {"type": "number", "minimum": 0, "maximum": 31_536_000},
            "concurrency_key": {"type": "string", "minLength": 1, "maxLength": 200},
            "depends_on": {"type": "array", "maxItems": 100, "uniqueItems": True,
                           "items": {"type": "string", "minLength": 1, "maxLength": 64}},
        },
        "required": ["workflow", "payload"],
        "additionalProperties": False,
    },
    "intake_batch": {
        "type": "object",
        "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                "items": None}},  # intake_batch_job, below
        "required": ["jobs"],
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
            **CLAIM_PROPERTIES,
            # Given: the answer is {"jobs": [...]}, up to this many.
            "max_jobs": {"type": "integer", "minimum": 1, "maximum": MAX_CLAIM_JOBS},
            "wait": {"type": "number", "minimum": 0, "maximum": MAX_CLAIM_WAIT},
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
                       "cost": COST,
                       "claim_next": CLAIM_NEXT},
        "required": ["lease_token", "result"],
        "additionalProperties": False,
    },
    "fail": {
        "type": "object",
        "properties": {"lease_token": {"type": "string", "maxLength": 64},
                       "error": {"type": "string", "minLength": 1, "maxLength": 1000},
                       "retryable": {"type": "boolean"}, "cost": COST, "claim_next": CLAIM_NEXT},
        "required": ["lease_token", "error"],
        "additionalProperties": False,
    },
    # Several completions and failures at once: each a complete's or a
    # fail's body with its job_id, so a result or an error, not both (which
    # takes these bodies past the fast check); claim_next may take several jobs.
    "reports": {
        "type": "object",
        "properties": {
            "reports": {"type": "array", "minItems": 1, "maxItems": MAX_REPORTS, "items": {
                "type": "object",
                "properties": {"job_id": {"type": "string", "minLength": 1, "maxLength": 64},
                               "lease_token": {"type": "string", "maxLength": 64}, "result": {},
                               "error": {"type": "string", "minLength": 1, "maxLength": 1000},
                               "retryable": {"type": "boolean"}, "cost": COST},
                "required": ["job_id", "lease_token"],
                "oneOf": [{"required": ["result"]}, {"required": ["error"]}],
                "$comment": "needs a result or an error, not both",  # said when oneOf fails
                "dependentRequired": {"retryable": ["error"]},
                "additionalProperties": False}},
            "claim_next": dict(CLAIM_NEXT, properties={
                **CLAIM_PROPERTIES,
                "max_jobs": {"type": "integer", "minimum": 1, "maximum": MAX_CLAIM_JOBS}}),
        },
        "required": ["reports"],
        "additionalProperties": False,
    },
    "step": {
        "type": "object",
        "properties": {"lease_token": {"type": "string", "maxLength": 64},
                       "name": {"type": "string", "minLength": 1, "maxLength": 200},
                       "result": {}, "cost": COST},
        "required": ["lease_token", "name", "result"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200},
                       "data": {"type": "object"}},
        "required": ["name"],
        "additionalProperties": False,
    },
    "key_create": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "role": {"enum": ["client", "worker"]},
            "daily_budget": {"type": "number", "minimum": 0, "maximum": 1_000_000},
            "rate_per_minute": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            # A worker key's workflows: names, or prefixes ending in *.
            "workflows": {"type": "array", "minItems": 1, "maxItems": 50, "uniqueItems": True,
                          "items": {"type": "string", "maxLength": 129,
                                    "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\*?$"}},
        },
        "required": ["name", "role"],
        "dependentSchemas": {"workflows": {"properties": {"role": {"enum": ["worker"]}}}},
        "additionalProperties": False,
    },
    "user_upsert": {
        "type": "object",
        "properties": {"email": {"type": "string", "maxLength": 254, "pattern": EMAIL_INPUT_PATTERN},
                       **PROFILE_PROPERTIES},
        "required": ["email"],
        "additionalProperties": False,
    },
    "bulk": {
        "type": "object",
        "properties": {name: {"type": "string", "minLength": 1, "maxLength": 200} for name in FILTERS}
        | {"status": {"type": "string", "maxLength": 200, "pattern": STATUS_LIST_PATTERN},
           "workflow": WORKFLOW_NAME, "created_after": RFC3339, "created_before": RFC3339},
        "minProperties": 1,
        "additionalProperties": False,
    },
    "limits": {
        "type": "object",
        "properties": {
            "max_concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
            "max_concurrency_per_key": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
            "rate": {"oneOf": [{"type": "null"}, {
                "type": "object",
                "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                               "per": {"type": "number", "minimum": 0.001,
                                       "maximum": MAX_RATE_WINDOW}},
                "required": ["count", "per"], "additionalProperties": False}]},
        },
        "minProperties": 1,
        "additionalProperties": False,
    },
    "schedule": {
        "type": "object",
        "properties": SCHEDULE_PROPERTIES,
        "required": ["name", "workflow", "payload"],
        "additionalProperties": False,
    },
    "schedule_patch": {
        "type": "object",
        "properties": {k: v for k, v in SCHEDULE_PROPERTIES.items() if k != "name"},
        "minProperties": 1,
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
                  "minItems", "maxItems", "uniqueItems", "minimum", "maximum", "dependentSchemas",
                  "dependentRequired", "oneOf", "$comment"}


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
        py_types = _PY_TYPES.get(schema["type"]) if isinstance(schema["type"], str) else None
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
        search = python_pattern(schema["pattern"]).search
        checks.append(lambda v: type(v) is not str or search(v) is not None)
    if "format" in schema:
        fmt = schema["format"]
        checks.append(lambda v: FORMATS.conforms(v, fmt))
    if "oneOf" in schema:
        # Only of "required" alone: a test that is exact. (This test may say no
        # to a valid instance; in a oneOf, one such no would let an instance
        # through that matches two.)
        if not all(set(sub) == {"required"} for sub in schema["oneOf"]):
            return None
        alternatives = [tuple(sub["required"]) for sub in schema["oneOf"]]
        checks.append(lambda v: type(v) is not dict
                      or sum(all(k in v for k in names) for names in alternatives) == 1)
    if "dependentRequired" in schema:
        needs = schema["dependentRequired"]
        checks.append(lambda v: type(v) is not dict
                      or all(n in v for k, names in needs.items() if k in v for n in names))
    if "dependentSchemas" in schema:
        dependents = {k: fast_check(sub) for k, sub in schema["dependentSchemas"].items()}
        if None in dependents.values():
            return None
        checks.append(lambda v: type(v) is not dict or all(c(v) for k, c in dependents.items() if k in v))
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


# A batch's job is an intake body with an Idempotency-Key of its own.
SCHEMAS["intake_batch_job"] = dict(SCHEMAS["intake"], properties={
    **SCHEMAS["intake"]["properties"],
    "idempotency_key": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}})
SCHEMAS["intake_batch"]["properties"]["jobs"]["items"] = SCHEMAS["intake_batch_job"]
# A batch may instead have one key of its own, for all its jobs.
SCHEMAS["intake_batch"]["properties"]["idempotency_key"] = {
    "type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}

VALIDATORS = {}
FAST_CHECKS = {}
for _name, _schema in SCHEMAS.items():
    jsonschema.Draft202012Validator.check_schema(_schema)
    VALIDATORS[_name] = Validator(_schema, format_checker=FORMATS)
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
    elif error.validator == "oneOf" and "$comment" in error.schema:
        text = error.schema["$comment"]
    else:
        text = _ERROR_TEXT.get(error.validator, error.message[:200])
    raise HTTPError(400, "validation_failed", f"{field or 'body'}: {text}", field=field)
