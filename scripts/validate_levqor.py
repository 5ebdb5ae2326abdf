#!/usr/bin/env python3
"""Exercise every Levqor endpoint against a running server, as a user would.

    BASE_URL=http://127.0.0.1:5000 API_KEY=... python scripts/validate_levqor.py

API_KEY may be left unset for a server in open development mode. Exits 0 and
prints the green line when every check passes; otherwise exits 1 naming the
first check that failed and what it saw.
"""

import os
import sys
import time
import uuid

import requests

BASE_URL = os.environ.get("BASE_URL", "http://127.0.0.1:5000").rstrip("/")
API_KEY = os.environ.get("API_KEY", "")
TIMEOUT = 10


class CheckFailed(Exception):
    pass


def call(method, path, key=True, **kwargs):
    """One request; a 429 is waited out (Retry-After) and tried again, as a
    polite client would: the full run makes more writes than one minute's
    default budget."""
    headers = kwargs.pop("headers", {})
    if key and API_KEY:
        headers["X-Api-Key"] = API_KEY
    for _ in range(5):
        r = requests.request(method, BASE_URL + path, headers=headers, timeout=TIMEOUT,
                             allow_redirects=False, **kwargs)
        if r.status_code != 429:
            return r
        time.sleep(min(60, int(r.headers.get("Retry-After", "1"))))
    return r


def expect(name, response, status, *fields, error=None):
    """The response has the status, a JSON body with these fields, and the error code."""
    if response.status_code != status:
        raise CheckFailed(f"{name}: expected {status}, got {response.status_code}: {response.text[:300]}")
    if not fields and error is None:
        return None
    try:
        body = response.json()
    except ValueError:
        raise CheckFailed(f"{name}: the body is not JSON: {response.text[:300]}")
    missing = [f for f in fields if f not in body]
    if missing:
        raise CheckFailed(f"{name}: missing {missing} in {body}")
    if error is not None and body.get("error") != error:
        raise CheckFailed(f"{name}: expected error {error!r}, got {body}")
    return body


def check(name, condition, detail=""):
    if not condition:
        raise CheckFailed(f"{name}: {detail}")


def run():
    body = expect("root", call("GET", "/"), 200, "ok", "service", "version")
    check("root", body["ok"] is True and body["service"] == "levqor-backend", body)
    body = expect("health", call("GET", "/health"), 200, "ok", "ts")
    check("health", isinstance(body["ts"], int), body)
    expect("metrics", call("GET", "/public/metrics"), 200,
           "uptime_rolling_7d", "jobs_today", "audit_coverage", "last_updated")
    expect("ops health", call("GET", "/api/v1/ops/health"), 200, "ok", "ts", "checks", "jobs")

    # Jobs: an in-process workflow runs to the end on its own
    job = {"workflow": "demo.flow", "payload": {"text": "validate levqor"}, "priority": "high",
           "callback_url": "https://example.com/levqor-callback"}
    body = expect("intake", call("POST", "/api/v1/intake", json=job), 202, "job_id", "status")
    job_id = body["job_id"]
    check("intake", body["status"] == "queued", body)
    deadline = time.monotonic() + 15
    while True:
        body = expect("status", call("GET", f"/api/v1/status/{job_id}"), 200,
                      "job_id", "status", "created_at", "result", "error", "attempts", "progress")
        if body["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check("demo.flow ends succeeded", body["status"] == "succeeded"
          and body["result"]["total_words"] == 2, body)

    # A workflow with no handler here waits for an external worker
    external = {"workflow": "validate.external", "payload": {"n": 1}}
    job_id = expect("intake external", call("POST", "/api/v1/intake", json=external), 202,
                    "job_id")["job_id"]
    done = call("POST", f"/api/v1/_dev/complete/{job_id}", json={"result": {"validated": True}})
    if done.status_code != 404:  # dev endpoints are off in production
        expect("dev complete", done, 200, "ok")
        body = expect("status after complete", call("GET", f"/api/v1/status/{job_id}"), 200, "status")
        check("status after complete", body["status"] == "succeeded"
              and body["result"] == {"validated": True}, body)
    job_id = call("POST", "/api/v1/intake", json=external).json()["job_id"]
    body = expect("cancel", call("POST", f"/api/v1/jobs/{job_id}/cancel"), 200, "job")
    check("cancel", body["job"]["status"] == "canceled", body)
    expect("cancel twice", call("POST", f"/api/v1/jobs/{job_id}/cancel"), 409, error="conflict")
    body = expect("retry", call("POST", f"/api/v1/jobs/{job_id}/retry"), 200, "job")
    check("retry", body["job"]["status"] == "queued", body)
    claimed = call("POST", "/api/v1/jobs/claim", json={"workflows": ["validate.external"]})
    body = expect("claim", claimed, 200, "job")
    token = body["job"]["lease_token"]
    expect("heartbeat", call("POST", f"/api/v1/jobs/{body['job']['job_id']}/heartbeat",
                             json={"lease_token": token}), 200, "lease_expires_at")
    body = expect("complete", call("POST", f"/api/v1/jobs/{body['job']['job_id']}/complete",
                                   json={"lease_token": token, "result": {"ok": 1}}), 200, "job")
    check("complete", body["job"]["status"] == "succeeded", body)
    body = expect("list jobs", call("GET", "/api/v1/jobs?limit=5"), 200, "jobs", "next_cursor")
    check("list jobs", len(body["jobs"]) >= 1, body)
    key = f"validate-{uuid.uuid4().hex}"
    first = call("POST", "/api/v1/intake", json=external, headers={"Idempotency-Key": key})
    again = call("POST", "/api/v1/intake", json=external, headers={"Idempotency-Key": key})
    check("idempotent replay", first.status_code == again.status_code == 202
          and first.json()["job_id"] == again.json()["job_id"]
          and again.headers.get("Idempotent-Replayed") == "true", again.text)
    expect("unknown job", call("GET", f"/api/v1/status/{'0' * 32}"), 404, error="not_found")
    expect("intake without payload", call("POST", "/api/v1/intake", json={"workflow": "x"}), 400,
           "field", error="validation_failed")
    expect("intake bad priority", call("POST", "/api/v1/intake",
                                       json={"workflow": "x", "payload": {}, "priority": "urgent"}),
           400, error="validation_failed")
    expect("intake bad JSON", call("POST", "/api/v1/intake", data=b"{nope",
                                   headers={"Content-Type": "application/json"}),
           400, error="invalid_json")
    expect("intake wrong type", call("POST", "/api/v1/intake", data=b"workflow=x",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}),
           415, error="unsupported_media_type")
    expect("wrong method", call("DELETE", "/health"), 405, error="method_not_allowed")
    expect("unknown path", call("GET", "/no/such/path"), 404, error="not_found")

    # Auth, when the server has keys
    if API_KEY:
        expect("no key", call("POST", "/api/v1/intake", key=False, json=job), 401, error="unauthorized")
        expect("wrong key", call("POST", "/api/v1/intake", key=False, json=job,
                                 headers={"X-Api-Key": "wrong-" + uuid.uuid4().hex}),
               403, error="forbidden")

    # Users
    email = f"validate-{uuid.uuid4().hex[:12]}@example.com"
    body = expect("user create", call("POST", "/api/v1/users/upsert",
                                      json={"email": f"  {email.upper()} ", "name": "Val Idate",
                                            "currency": "GBP", "meta": {"plan": "free"}}),
                  201, "created", "user")
    user = body["user"]
    check("user create", user["email"] == email and user["currency"] == "GBP", user)
    body = expect("user update", call("POST", "/api/v1/users/upsert",
                                      json={"email": email, "locale": "en-GB"}), 200, "updated", "user")
    check("user update keeps fields", body["user"]["name"] == "Val Idate"
          and body["user"]["locale"] == "en-GB" and body["user"]["id"] == user["id"], body)
    body = expect("user lookup", call("GET", "/api/v1/users", params={"email": email}), 200, "id")
    check("user lookup", body["id"] == user["id"], body)
    expect("user get", call("GET", f"/api/v1/users/{user['id']}"), 200, "email")
    body = expect("user patch", call("PATCH", f"/api/v1/users/{user['id']}",
                                     json={"name": "Val", "meta": {"tier": 2}}), 200, "updated", "user")
    check("user patch merges meta", body["user"]["meta"] == {"plan": "free", "tier": 2}, body)
    expect("user patch email", call("PATCH", f"/api/v1/users/{user['id']}", json={"email": "x@y.io"}),
           400, error="validation_failed")
    expect("user bad email", call("POST", "/api/v1/users/upsert", json={"email": "not-an-email"}),
           400, error="validation_failed")
    expect("user bad currency", call("POST", "/api/v1/users/upsert",
                                     json={"email": email, "currency": "JPY"}), 400, error="validation_failed")
    expect("user lookup without email", call("GET", "/api/v1/users"), 400, error="missing_email")
    expect("user unknown", call("GET", f"/api/v1/users/{'0' * 32}"), 404, error="not_found")

    # Public pages
    for path in ("/public/legal/privacy.html", "/public/legal/terms.html",
                 "/public/legal/cookies.html", "/public/faq/index.html"):
        r = call("GET", path)
        check(path, r.status_code == 200 and r.headers["Content-Type"].startswith("text/html"),
              f"{r.status_code} {r.headers.get('Content-Type')}")
        again = call("GET", path, headers={"If-None-Match": r.headers["ETag"]})
        check(path + " revalidation", again.status_code == 304, again.status_code)
    for path in ("/public/robots.txt", "/public/.well-known/security.txt"):
        r = call("GET", path)
        check(path, r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"),
              r.status_code)
    expect("static traversal", call("GET", "/public/%2e%2e/levqor.py"), 404, error="not_found")


def main():
    try:
        run()
    except CheckFailed as exc:
        print(f"🔴 FAILED — {exc}")
        return 1
    except requests.RequestException as exc:
        print(f"🔴 FAILED — cannot reach {BASE_URL}: {exc}")
        return 1
    print("🟢 COCKPIT GREEN — Levqor backend validated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
