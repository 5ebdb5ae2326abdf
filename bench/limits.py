#!/usr/bin/env python3
"""What workflow limits cost: intake and claim throughput with limits
configured against the same run without, through the WSGI callable.

    python bench/limits.py            # full run, prints a table for bench/RESULTS.md
    python bench/limits.py --smoke    # a few hundred jobs, for CI; prints the table

For each job store (memory, SQLite, and PostgreSQL when
LEVQOR_BENCH_DATABASE_URL or LEVQOR_TEST_DATABASE_URL names a server), the
same workload runs with no limits and with every kind of limit set on the
workflow, but high enough never to hold a job back: what is measured is the
checking, not the waiting. Intake submits jobs of an external workflow with
a concurrency key; a worker then claims each (POST /api/v1/jobs/claim) and
completes it, so claim/s counts the pair, as a worker meets them. The two
setups take turns, several rounds; medians; the ratio is limited ÷ plain.
Target: at least 0.85 for both.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
KEY = "bench-key-0123456789abcdef0123"
os.environ.setdefault("API_KEYS", KEY)
import levqor  # noqa: E402

LIMITS = {"max_concurrency": 100_000, "max_concurrency_per_key": 100_000,
          "rate": {"count": 1_000_000, "per": 60}}
TARGET = 0.85


class Discard(io.TextIOBase):
    def write(self, s):
        return len(s)


def call(app, method, path, body=b"", answer=False):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
           "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000",
           "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_X_API_KEY": KEY, "wsgi.input": io.BytesIO(body),
           "wsgi.url_scheme": "http", "CONTENT_LENGTH": str(len(body)),
           "CONTENT_TYPE": "application/json"}
    seen = []
    data = b"".join(app(env, lambda status, headers, exc_info=None: seen.append(status)))
    return (int(seen[0][:3]), json.loads(data)) if answer else int(seen[0][:3])


def postgres_database(base):
    """A database of its own on the server at ``base``: (url, drop)."""
    import psycopg
    name = f"levqor_limits_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    from urllib.parse import urlsplit
    return urlsplit(base)._replace(path="/" + name).geturl(), drop


def one_pass(store_env, jobs, limited):
    """(intakes a second, claims a second) on a fresh app and database."""
    tmp = tempfile.mkdtemp(prefix="levqor-limits-")
    big = "1000000000"
    settings = levqor.Settings.from_env({
        "LEVQOR_ENV": "production", "API_KEYS": KEY, "SQLITE_PATH": os.path.join(tmp, "l.db"),
        "RATE_BURST": big, "RATE_GLOBAL": big, "RATE_READ": big, "RATE_WORKER": big,
        "WORKER_THREADS": "0", "MAX_COST_PER_DAY": "1000000", **store_env})
    app = levqor.create_app(settings, log_stream=Discard())
    app.start()
    try:
        if limited:
            app.services.engine.set_limits("bench.work", LIMITS)
        bodies = [b'{"workflow":"bench.work","payload":{"n":%d},"max_cost":0,'
                  b'"concurrency_key":"customer-%d"}' % (i, i % 50) for i in range(jobs)]
        started = time.perf_counter()
        for body in bodies:
            assert call(app, "POST", "/api/v1/intake", body) == 202
        intake = jobs / (time.perf_counter() - started)
        claim_body = b'{"workflows":["bench.work"],"lease_seconds":300}'
        started = time.perf_counter()
        for _ in range(jobs):  # as a worker does: claim, then report
            status, job = call(app, "POST", "/api/v1/jobs/claim", claim_body, answer=True)
            assert status == 200
            done = b'{"lease_token":"%s","result":1}' % job["job"]["lease_token"].encode()
            assert call(app, "POST", f"/api/v1/jobs/{job['job']['job_id']}/complete", done) == 200
        claim = jobs / (time.perf_counter() - started)
        return intake, claim
    finally:
        app.stop(grace=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.rounds = 200, 1
    stores = [("memory", {"JOB_STORE": "memory"}), ("SQLite", {"JOB_STORE": "sqlite"})]
    base = os.environ.get("LEVQOR_BENCH_DATABASE_URL") or os.environ.get("LEVQOR_TEST_DATABASE_URL")
    drops = []
    if base:
        try:
            url, drop = postgres_database(base)
            drops.append(drop)
            stores.append(("PostgreSQL", {"DATABASE_URL": url}))
        except Exception as exc:  # no server, or no psycopg: say so and go on
            print(f"PostgreSQL left out: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = []
    try:
        for name, env in stores:
            results = {False: [], True: []}
            for round_no in range(args.rounds):
                for limited in ((False, True) if round_no % 2 == 0 else (True, False)):
                    if name == "PostgreSQL":  # each pass on an empty queue
                        drops[0]()
                        url, drops[0] = postgres_database(base)
                        env = {"DATABASE_URL": url}
                    results[limited].append(one_pass(env, args.jobs, limited))
            plain = [statistics.median(r[i] for r in results[False]) for i in (0, 1)]
            limited = [statistics.median(r[i] for r in results[True]) for i in (0, 1)]
            rows.append((name, plain, limited))
    finally:
        for drop in drops:
            drop()
    print("| store | intake/s plain | intake/s limited | ratio | claim+complete/s plain | limited | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, plain, limited in rows:
        ratios = [limited[i] / plain[i] for i in (0, 1)]
        marks = ["✅" if r >= TARGET else "❌" for r in ratios]
        print(f"| {name} | {plain[0]:.0f} | {limited[0]:.0f} | {ratios[0]:.2f} {marks[0]} "
              f"| {plain[1]:.0f} | {limited[1]:.0f} | {ratios[1]:.2f} {marks[1]} |")


if __name__ == "__main__":
    main()
