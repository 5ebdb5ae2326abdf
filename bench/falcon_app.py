"""The Falcon peer: the five endpoints bench/run.py drives, written as a
Falcon user would write them, doing the same work Levqor's do.

- an API key in X-Api-Key, compared in constant time, on every route but /health;
- the bodies checked by jsonschema against Levqor's own schemas (the same rules);
- jobs in a dict under a lock; users in SQLite (WAL, synchronous=NORMAL, one
  connection per thread), upserted by email in one statement;
- the same answers and status codes, and Levqor's security headers.

What it leaves out, to Falcon's advantage: the rate limiter, the audit
trail, the JSON access log, budgets and cost reservation, request ids.

    gunicorn -c gunicorn.conf.py bench.falcon_app:app    (API_KEYS, SQLITE_PATH)
"""

import hmac
import json
import os
import sqlite3
import threading
import time
import uuid

import falcon
import jsonschema

from schemas import SCHEMAS

KEYS = [k.encode() for k in os.environ.get("API_KEYS", "").split(",") if k]
DB_PATH = os.environ.get("SQLITE_PATH", "falcon-peer.db")
HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "strict-origin-when-cross-origin",
           "Permissions-Policy": "geolocation=(), microphone=(), camera=()",
           "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"}
INTAKE = jsonschema.Draft202012Validator(SCHEMAS["intake"])
UPSERT = jsonschema.Draft202012Validator(SCHEMAS["user_upsert"])
USER_COLUMNS = "id, email, name, locale, currency, meta, created_at, updated_at"


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def body(req, validator):
    try:
        doc = json.loads(req.bounded_stream.read(req.content_length or 0) or b"null")
    except ValueError:
        raise falcon.HTTPBadRequest(title="invalid_json", description="the body is not JSON")
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise falcon.HTTPBadRequest(title="validation_failed", description=error.message)
    return doc


class Auth:
    def process_request(self, req, resp):
        resp.set_headers(HEADERS)
        if req.path == "/health":
            return
        given = (req.get_header("X-Api-Key") or "").encode()
        if not any(hmac.compare_digest(given, key) for key in KEYS):
            raise falcon.HTTPUnauthorized(title="unauthorized", description="a valid API key is required")


class Health:
    def on_get(self, req, resp):
        resp.media = {"ok": True, "ts": int(time.time())}


class Jobs:
    def __init__(self):
        self.jobs, self.lock = {}, threading.Lock()

    def on_post_intake(self, req, resp):
        doc = body(req, INTAKE)
        stamp = now()
        job = {"job_id": uuid.uuid4().hex, "status": "queued", "workflow": doc["workflow"],
               "priority": doc.get("priority", "normal"), "payload": doc["payload"],
               "callback_url": doc.get("callback_url"), "max_cost": doc.get("max_cost"),
               "attempts": 0, "created_at": stamp, "updated_at": stamp, "result": None, "error": None}
        with self.lock:
            self.jobs[job["job_id"]] = job
        resp.status = falcon.HTTP_202
        resp.location = f"/api/v1/status/{job['job_id']}"
        resp.media = {"job_id": job["job_id"], "status": job["status"]}

    def on_get_status(self, req, resp, job_id):
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise falcon.HTTPNotFound(title="not_found", description="no such job")
        resp.media = {k: v for k, v in job.items() if k not in ("payload", "callback_url")}


class Users:
    def __init__(self, path):
        self.path, self.local = path, threading.local()
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, email TEXT UNIQUE NOT NULL,"
                         " name TEXT, locale TEXT, currency TEXT, meta TEXT NOT NULL,"
                         " created_at TEXT NOT NULL, updated_at TEXT NOT NULL)")

    def db(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.row_factory = sqlite3.Row
        return conn

    def on_post_upsert(self, req, resp):
        doc = body(req, UPSERT)
        new_id, stamp = uuid.uuid4().hex, now()
        row = self.db().execute(
            f"INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, json_patch('{{}}', ?), ?, ?)"
            " ON CONFLICT (email) DO UPDATE SET name = COALESCE(excluded.name, name),"
            " locale = COALESCE(excluded.locale, locale), currency = COALESCE(excluded.currency, currency),"
            " meta = json_patch(meta, excluded.meta), updated_at = excluded.updated_at"
            f" RETURNING {USER_COLUMNS}",
            (new_id, doc["email"].strip().lower(), doc.get("name"), doc.get("locale"), doc.get("currency"),
             json.dumps(doc.get("meta", {})), stamp, stamp)).fetchone()
        user = dict(row, meta=json.loads(row["meta"]))
        if user["id"] == new_id:
            resp.status = falcon.HTTP_201
            resp.location = f"/api/v1/users/{new_id}"
            resp.media = {"created": True, "user": user}
        else:
            resp.media = {"updated": True, "user": user}

    def on_get_user(self, req, resp, user_id):
        row = self.db().execute(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            raise falcon.HTTPNotFound(title="not_found", description="no such user")
        resp.media = dict(row, meta=json.loads(row["meta"]))


def create_app():
    app = falcon.App(middleware=[Auth()])
    jobs, users = Jobs(), Users(DB_PATH)
    app.add_route("/health", Health())
    app.add_route("/api/v1/intake", jobs, suffix="intake")
    app.add_route("/api/v1/status/{job_id}", jobs, suffix="status")
    app.add_route("/api/v1/users/upsert", users, suffix="upsert")
    app.add_route("/api/v1/users/{user_id}", users, suffix="user")
    return app


app = create_app()
