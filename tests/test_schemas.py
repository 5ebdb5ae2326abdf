"""The fast validity check never lets through what jsonschema refuses."""

import random

import pytest

import schemas

TRICKY = [
    None, True, False, 0, 1, 1.0, -1, "", "x", "low", "LOW", "urgent", [], [1], {}, {"a": None},
    "https://example.com/x", "http://", "ftp://example.com", "https://exa mple.com",
    "https://example.com:99999/", "en-GB", "english", "GBP", "JPY", "x" * 129, "x" * 2049,
    0.5, 1.5, 3600, 3601, -0.0, 2.0, -1, 1_000_001, "client", "admin", ["a", "a"], ["a", 1], [["a"]], {"fraction": 2},
    {"fraction": 0.3}, {"fraction": True}, list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    {str(i): i for i in range(101)}, "\ud800", "a@b.com",
]
FIELDS = ["workflow", "payload", "callback_url", "priority", "result", "email", "name",
          "locale", "currency", "meta", "extra", "workflows", "lease_seconds", "lease_token",
          "progress", "error", "retryable", "cost", "max_cost", "role", "daily_budget",
          "rate_per_minute", "run_at", "delay", "concurrency_key", "depends_on", "status",
          "created_after", "max_concurrency", "rate", "cron", "every", "timezone", "paused"]
VALID = {
    "intake": {"workflow": "w", "payload": {}, "priority": "high", "callback_url": "https://a.io/",
               "delay": 5, "concurrency_key": "acme", "depends_on": ["a" * 32]},
    "dev_complete": {"result": {"ok": True}},
    "user_upsert": {"email": "a@b.com", "name": "A", "locale": "en-GB", "currency": "EUR",
                    "meta": {"k": 1}},
    "user_patch": {"name": "A", "meta": {}},
    "claim": {"workflows": ["a", "b"], "lease_seconds": 30, "max_jobs": 10, "wait": 2.5},
    "heartbeat": {"lease_token": "t", "lease_seconds": 5, "progress": {"fraction": 0.5, "note": "n"}},
    "complete": {"lease_token": "t", "result": [1, 2], "claim_next": {"workflows": ["a"]}},
    "intake_batch": {"jobs": [{"workflow": "w", "payload": {"n": 1}, "idempotency_key": "k-1"},
                              {"workflow": "v", "payload": {}, "priority": "low", "delay": 1}]},
    "intake_batch_job": {"workflow": "w", "payload": {}, "idempotency_key": "order 7"},
    "step": {"lease_token": "t", "name": "summarise", "result": {"text": "short"}, "cost": 0.01},
    "event": {"name": "approved", "data": {"doc": "q3", "by": "ada"}},
    "fail": {"lease_token": "t", "error": "boom", "retryable": False, "cost": 0.25},
    "reports": {"reports": [{"job_id": "j", "lease_token": "t", "result": None, "cost": 0.5},
                            {"job_id": "k", "lease_token": "t", "error": "e", "retryable": True}],
                "claim_next": {"workflows": ["a"], "max_jobs": 2}},
    "key_create": {"name": "ci", "role": "worker", "daily_budget": 2.5, "rate_per_minute": 60},
    "bulk": {"status": "failed,canceled", "workflow": "w", "created_after": "2026-01-01T00:00:00Z"},
    "limits": {"max_concurrency": 2, "max_concurrency_per_key": None, "rate": {"count": 5, "per": 2}},
    "schedule": {"name": "nightly", "workflow": "w", "payload": {}, "cron": "0 3 * * *",
                 "timezone": "Europe/London", "priority": "low", "max_cost": 0.1, "paused": False},
    "schedule_patch": {"every": 60, "paused": True},
}


def mutations(seed, base, count):
    rng = random.Random(seed)
    for _ in range(count):
        doc = dict(base)
        for _ in range(rng.randint(1, 3)):
            action = rng.random()
            field = rng.choice(FIELDS)
            if action < 0.6:
                doc[field] = rng.choice(TRICKY)
            elif action < 0.85:
                doc.pop(field, None)
            else:
                doc = rng.choice(TRICKY)
                break
        yield doc


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_fast_check_is_never_more_lenient_than_jsonschema(name):
    validator = schemas.VALIDATORS[name]
    fast = schemas.FAST_CHECKS[name]
    if schemas.fast_check(schemas.SCHEMAS[name]) is None:
        pytest.skip("this schema always goes to jsonschema")
    agreed = 0
    for doc in [VALID[name], *TRICKY, *mutations(name, VALID[name], 3000)]:
        if fast(doc):
            assert validator.is_valid(doc), doc
            agreed += 1
    assert agreed > 10  # and it really is the fast path for valid bodies


# Admin-only and rare: their nullable fields are for jsonschema alone.
SLOW_PATH = {"limits"}


@pytest.mark.parametrize("report, valid", [
    ({"result": 1}, True), ({"error": "e", "retryable": False}, True),
    ({"result": None}, True),  # a null result is a result
    ({}, False), ({"result": 1, "error": "e"}, False),  # oneOf: exactly one
    ({"result": 1, "retryable": True}, False),  # dependentRequired: retryable needs an error
])
def test_the_fast_check_reads_a_or_b_and_dependent_fields_as_jsonschema_does(report, valid):
    body = {"reports": [{"job_id": "j", "lease_token": "t", **report}]}
    assert schemas.FAST_CHECKS["reports"](body) is valid
    assert schemas.VALIDATORS["reports"].is_valid(body) is valid
    # Only "required" alternatives are read here: any other oneOf is jsonschema's.
    assert schemas.fast_check({"oneOf": [{"required": ["a"]}, {"type": "object"}]}) is None


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_valid_bodies_take_the_fast_path(name):
    assert schemas.FAST_CHECKS[name](VALID[name]) is (name not in SLOW_PATH)


def test_unknown_keywords_fall_back_to_jsonschema():
    assert schemas.fast_check({"type": "null"}) is None
    assert schemas.fast_check({"type": "object", "properties": {"n": {"multipleOf": 2}}}) is None
    assert schemas.fast_check({"enum": [1, 2]}) is None
