"""Helpers the tests share: an in-process client under wsgiref.validate, a
fake clock, a bounded wait, and a real gunicorn on a free loopback port.
Tests import them by name (``from support import Client``); the fixtures
built on them live in conftest.py."""

import io
import json as jsonlib
import os
import signal
import socket
import subprocess
import sys
import time
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import levqor  # noqa: E402

KEY = "test-key-0123456789abcdef"
NEXT_KEY = "next-key-0123456789abcdef"


class Response:
    def __init__(self, status, headers, body):
        self.status_line = status
        self.status = int(status[:3])
        self.header_list = headers
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return jsonlib.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status_line} {self.body[:200]!r}>"


class Client:
    """Calls the WSGI app in-process, checked by wsgiref.validate."""

    def __init__(self, app, remote_addr="127.0.0.1", lint=True):
        self.app = app
        # lint=False only for environs wsgiref.validate itself refuses to build.
        self.wsgi = validator(app) if lint else app
        self.remote_addr = remote_addr

    def request(self, method, path, json=None, body=None, headers=None, key=None,
                content_type="application/json", environ=None):
        env = {}
        setup_testing_defaults(env)
        path, _, query = path.partition("?")
        env.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query,
                   REMOTE_ADDR=self.remote_addr)
        if json is not None:
            body = jsonlib.dumps(json).encode()
        if body is not None:
            env["CONTENT_LENGTH"] = str(len(body))
            if content_type:
                env["CONTENT_TYPE"] = content_type
        env["wsgi.input"] = io.BytesIO(body or b"")
        if key is not None:
            env["HTTP_X_API_KEY"] = key
        for name, value in (headers or {}).items():
            env["HTTP_" + name.upper().replace("-", "_")] = value
        env.update(environ or {})
        seen = {}

        def start_response(status, response_headers, exc_info=None):
            seen["status"], seen["headers"] = status, response_headers

        result = self.wsgi(env, start_response)
        try:
            data = b"".join(result)
        finally:
            getattr(result, "close", lambda: None)()
        return Response(seen["status"], seen["headers"], data)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):
        return self.request("POST", path, json=json, **kw)


def wait_until(condition, seconds, step=0.05):
    """Call condition() until it is true or ``seconds`` have passed; its last
    value. Every wait in the suite is bounded by this, so none can hang."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start=1_800_000_000.0):
        self.t = start

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def make_app(tmp_path, log=None, registry=None, **env):
    """A fresh Levqor on its own SQLite file; env holds settings by name."""
    env.setdefault("SQLITE_PATH", str(tmp_path / "levqor.db"))
    # No pool threads: in-process tests run jobs themselves (engine.run_next).
    env.setdefault("WORKER_THREADS", "0")
    settings = levqor.Settings.from_env({k: str(v) for k, v in env.items()})
    return levqor.create_app(settings, log_stream=log if log is not None else io.StringIO(),
                             registry=registry)





# ---------------------------------------------------------------------------
# Real gunicorn
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """gunicorn serving levqor:app on 127.0.0.1, with its output in a file."""

    def __init__(self, tmp_path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "SQLITE_PATH": str(tmp_path / "levqor.db"), "PYTHONUNBUFFERED": "1",
                    **{k: str(v) for k, v in env.items()}}
        self.proc = None

    def start(self, timeout=20):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "levqor:app"],
            cwd=ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:  # not up yet, or too busy to answer within 1 s
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer in {timeout}s: {self.log()}")

    def kill(self):
        """kill -9 the whole server, master and worker, as a crash would."""
        try:  # first stop the master, so it cannot fork a replacement worker meanwhile
            os.kill(self.proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        for pid in children(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def children(pid):
    """Child pids of pid, from /proc (no procps needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name may hold spaces: the ppid follows its ')'.
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


# ---------------------------------------------------------------------------
# PostgreSQL: a database of this run's own, a fresh schema per use
# ---------------------------------------------------------------------------

POSTGRES = {}  # "url": this run's database, "dbs": PgDatabase objects to close


def postgres_url():
    """The URL of a fresh, empty schema in a database made for this test run
    (dropped at its end, by conftest). Without LEVQOR_TEST_DATABASE_URL the
    test skips, saying why; with LEVQOR_REQUIRE_POSTGRES=1 it fails instead."""
    import pytest
    base = os.environ.get("LEVQOR_TEST_DATABASE_URL")
    missing = None
    if not base:
        missing = "LEVQOR_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/postgres)"
    else:
        try:
            import psycopg
        except ImportError:
            missing = "psycopg is not installed: pip install -r requirements-postgres.txt"
    if missing:
        if os.environ.get("LEVQOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (LEVQOR_REQUIRE_POSTGRES=1): {missing}")
        pytest.skip(f"PostgreSQL test: {missing}")
    from urllib.parse import quote, urlsplit
    if "url" not in POSTGRES:
        name = f"levqor_test_{os.getpid()}_{os.urandom(3).hex()}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        POSTGRES["admin"], POSTGRES["name"] = base, name
        POSTGRES["url"] = urlsplit(base)._replace(path="/" + name, query="").geturl()
    schema = "t_" + os.urandom(6).hex()
    with psycopg.connect(POSTGRES["url"], autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return POSTGRES["url"] + "?options=" + quote(f"-c search_path={schema}")


def postgres_database(url=None, **options):
    """A pg.PgDatabase on a fresh schema (or on ``url``), closed after the test."""
    import pg
    db = pg.PgDatabase(url or postgres_url(), **options)
    POSTGRES.setdefault("dbs", []).append(db)
    return db


def close_postgres_databases():
    for db in POSTGRES.pop("dbs", []):
        db.close()


def drop_postgres():
    """Drop this run's database, connections and all."""
    if "name" in POSTGRES:
        import psycopg
        for _ in range(10):  # a test may have just restarted the server
            try:
                with psycopg.connect(POSTGRES["admin"], autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{POSTGRES["name"]}" WITH (FORCE)')
                break
            except psycopg.OperationalError:
                time.sleep(1)
        POSTGRES.clear()


STORES = ("memory", "sqlite", "postgres")


def store_env(kind):
    """The settings that choose where jobs live: "memory", "sqlite" (the
    SQLite file with JOB_STORE=sqlite) or "postgres" (a fresh schema)."""
    return {"DATABASE_URL": postgres_url()} if kind == "postgres" else {"JOB_STORE": kind}


def job_store(kind, path, **options):
    """A job store of ``kind`` on its own database (a file under ``path``)."""
    import jobstore
    import storage
    if kind == "memory":
        return jobstore.MemoryJobStore(**options)
    db = postgres_database() if kind == "postgres" else storage.Database(str(path / "jobs.db"))
    return jobstore.SqlJobStore(db, **options)
