#!/usr/bin/env python3
"""Microseconds per request for each endpoint, through the WSGI callable
with no server: the app's own cost, for profiling.

    python bench/micro.py               # table of µs per request
    python bench/micro.py --profile     # plus cProfile's top functions per endpoint

Uses the same production settings as bench/run.py, a throwaway SQLite file,
and a log written to an in-memory stream.
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
KEY = "bench-key-0123456789abcdef0123"

os.environ.setdefault("API_KEYS", KEY)  # quiet the module-level app's start-up lines
os.environ.setdefault("LOG_LEVEL", "WARNING")
import levqor  # noqa: E402


class Discard(io.TextIOBase):
    def write(self, s):
        return len(s)


def environ(method, path, body=b""):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
           "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000",
           "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_X_API_KEY": KEY, "HTTP_USER_AGENT": "micro",
           "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http"}
    if body:
        env["CONTENT_LENGTH"] = str(len(body))
        env["CONTENT_TYPE"] = "application/json"
    return env


def start_response(status, headers, exc_info=None):
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5000, help="requests per endpoint")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="levqor-micro-")
    big = "1000000000"
    settings = levqor.Settings.from_env({
        "LEVQOR_ENV": "production", "API_KEYS": KEY, "SQLITE_PATH": os.path.join(tmp, "m.db"),
        "RATE_BURST": big, "RATE_GLOBAL": big, "RATE_READ": big})
    app = levqor.create_app(settings, log_stream=Discard())
    app.start()
    intake_body = (b'{"workflow":"bench.external","payload":{"text":"benchmark me","n":1},'
                   b'"priority":"normal","max_cost":0}')
    b"".join(app(environ("POST", "/api/v1/intake", intake_body), start_response))
    job_id = next(iter(app.services.jobs._jobs))
    _, user = app.services.users.upsert("admin", "reader@example.com", {"name": "Reader"})
    counter = iter(range(10**9))

    def upsert_env():
        i = next(counter)
        return environ("POST", "/api/v1/users/upsert",
                       f'{{"email":"m{i // 2}@example.com","name":"user {i}"}}'.encode())

    cases = [
        ("GET /health", lambda: environ("GET", "/health")),
        ("GET /api/v1/status/<id>", lambda: environ("GET", f"/api/v1/status/{job_id}")),
        ("GET /api/v1/users/<id>", lambda: environ("GET", f"/api/v1/users/{user['id']}")),
        ("POST /api/v1/intake", lambda: environ("POST", "/api/v1/intake", intake_body)),
        ("POST /api/v1/users/upsert", upsert_env),
    ]
    print(f"{'endpoint':30} {'µs/request':>10}")
    for name, make in cases:
        envs = [make() for _ in range(args.n)]
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        for env in envs:
            b"".join(app(env, start_response))
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.disable()
        print(f"{name:30} {elapsed / args.n * 1e6:10.1f}", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    app.stop()


if __name__ == "__main__":
    main()
