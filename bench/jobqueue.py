#!/usr/bin/env python3
"""The job queue: enqueue and drain throughput, and idle enqueue→start
latency, with jobs in SQLite on one host against PostgreSQL on one and two.

    python bench/jobqueue.py            # full run, writes its section of bench/RESULTS.md
    python bench/jobqueue.py --smoke    # about 15 s, a little of each; writes nothing

A host is one gunicorn master on a port of its own, with one worker per core
(the default with a database) and Levqor's production settings (rate limits
raised out of the way). Two hosts share one PostgreSQL database as two
machines would; here they also share this machine's cores, with the
database and the load generator. Every pass of every setup starts from an
empty database of its own (a new SQLite file, or a new PostgreSQL database
made for the run and dropped at its end); the setups take turns, round
after round, and the report gives each figure's ratio to SQLite's in the
same run.

What each figure measures:

- enqueue: intakes of a job for an external worker (never run by the hosts),
  from wrk with 8 connections in all, split across the hosts: jobs/s
  accepted. The hosts' in-process pools are on, as in production, so each
  intake pays for waking them too.
- drain: --jobs jobs of bench.noop (bench/workflows.py: an in-process
  workflow that does nothing) are queued through a host whose pool is off,
  then parked the way the engine parks a retry (queued, with not_before in
  the future), by this script in the database. With the setup's hosts up
  and idle, all of them become due at one moment: jobs/s from the first
  start to the last finish, by the jobs' own timestamps. So: the in-process
  pools of every process and host claiming, running and finishing jobs,
  with no HTTP in the way.
- latency: with the hosts idle, one bench.noop job at a time submitted to
  host A: from the client sending the intake to the workflow starting, both
  read from this machine's clock (the workflow returns when it started).
  Not the job's started_at less its created_at: with PostgreSQL each process
  reads the database's clock through an offset it measured to within half
  a round trip, and on a loaded machine two processes' offsets differ by
  milliseconds. "A runs none": host A has no pool, so host B, woken by
  NOTIFY, starts every job: the cross-host case, whose p50 target is under
  20 ms.

Needs wrk (Debian: apt-get install wrk). Sends traffic to 127.0.0.1 only.
"""

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import urllib.parse

from run import (KEY, QUEUE_HEADING, Postgres, exit_on_sigterm, launch, machine, publish, stop,
                 wait_ready, wrk)

HERE = os.path.dirname(os.path.abspath(__file__))
CORES = os.cpu_count() or 1
BIG = "1000000000"
LEVQOR_ENV = {"LEVQOR_ENV": "production", "API_KEYS": KEY, "RATE_BURST": BIG, "RATE_GLOBAL": BIG,
              "RATE_READ": BIG, "RATE_WORKER": BIG, "LEVQOR_WORKFLOWS": "bench.workflows"}
EXTERNAL = '{"workflow":"bench.external","payload":{"n":1},"max_cost":0}'
NOOP = '{"workflow":"bench.noop","payload":{"n":1}}'
FINAL = ("succeeded", "failed", "canceled")
TARGET_P50_MS = 20.0
# Connections each Levqor process may hold: its pool (THREADS + WORKER_THREADS
# + CALLBACK_THREADS + 4, as levqor.Services sizes it) and its listener.
CONNECTIONS_PER_PROCESS = 4 + 4 + 2 + 4 + 1

# (name, store, each host's WORKER_THREADS, what is measured). The first is
# what the others are compared with.
SCENARIOS = [
    ("SQLite, 1 host", "sqlite", (4,), ("drain", "latency", "enqueue")),
    ("PostgreSQL, 1 host", "postgres", (4,), ("drain", "latency", "enqueue")),
    ("PostgreSQL, 2 hosts", "postgres", (4, 4), ("drain", "latency", "enqueue")),
    ("PostgreSQL, 2 hosts, A runs none", "postgres", (0, 4), ("latency",)),
]


# ---------------------------------------------------------------------------
# Hosts and the database under them
# ---------------------------------------------------------------------------


def start_hosts(env, threads, workers, workdir, tag):
    """One host per entry of ``threads`` (its WORKER_THREADS), all launched
    before any is waited for; (processes, urls), host A first."""
    launched = [launch("levqor:app", dict(env, WORKER_THREADS=str(t)), workdir,
                       f"{tag}-{'AB'[i]}", workers) for i, t in enumerate(threads)]
    try:
        for proc, url, log in launched:
            wait_ready(proc, url, log)
    except BaseException:
        stop([proc for proc, _, _ in launched])
        raise
    return [proc for proc, _, _ in launched], [url for _, url, _ in launched]


@contextlib.contextmanager
def database(env):
    """A connection to the setup's database, for the few statements this
    script runs itself: ``(run, dialect)``, where ``run(sql, *params)``
    takes SQLite's ``?`` placeholders on either database."""
    if "DATABASE_URL" in env:
        import psycopg
        with psycopg.connect(env["DATABASE_URL"], autocommit=True, connect_timeout=3,
                             options="-c statement_timeout=30000") as conn:
            yield (lambda sql, *params: conn.execute(sql.replace("?", "%s"), params)), "postgres"
        return
    conn = sqlite3.connect(env["SQLITE_PATH"], timeout=10, isolation_level=None)
    try:
        yield (lambda sql, *params: conn.execute(sql, params)), "sqlite"
    finally:
        conn.close()


def database_now(env):
    """The clock the hosts judge not_before by: the database's, or this machine's."""
    with database(env) as (run, dialect):
        if dialect == "postgres":
            return float(run("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        return time.time()


def set_noop_jobs_due(env, when):
    """Make every queued bench.noop job due at ``when``: the column the queue
    reads and the copy in the job's data, as the engine sets both for a
    retry. Returns how many."""
    with database(env) as (run, dialect):
        data = ("jsonb_set(data, '{not_before}', to_jsonb(CAST(? AS double precision)))"
                if dialect == "postgres" else "json_set(data, '$.not_before', ?)")
        return run(f"UPDATE jobs SET not_before = ?, data = {data}"
                   " WHERE status = 'queued' AND workflow = 'bench.noop'", when, when).rowcount


# ---------------------------------------------------------------------------
# A client
# ---------------------------------------------------------------------------


class Client:
    """One keep-alive connection to a host, as a client's worker holds one."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def call(self, method, path, body=None):
        self.conn.request(method, path, body=body,
                          headers={"X-Api-Key": KEY, "Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise SystemExit(f"{method} {path}: {resp.status} {data[:300]!r}")
        return json.loads(data)

    def close(self):
        self.conn.close()


def submit_noop_jobs(url, n, clients=8):
    """Queue ``n`` bench.noop jobs through ``url`` from ``clients`` threads."""
    def submit(count):
        client = Client(url)
        try:
            for _ in range(count):
                client.call("POST", "/api/v1/intake", NOOP)
        finally:
            client.close()
    shares = [n // clients + (i < n % clients) for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(submit, shares))  # re-raises the first failure


def noop_jobs(url, n):
    """The status views of the bench.noop jobs made with KEY, every page."""
    client, jobs, cursor = Client(url), [], None
    try:
        for _ in range(n // 100 + 2):  # bounded: 100 a page
            page = client.call("GET", "/api/v1/jobs?workflow=bench.noop&limit=100"
                               + (f"&cursor={cursor}" if cursor else ""))
            jobs += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        client.close()
    return jobs


# ---------------------------------------------------------------------------
# The three measurements
# ---------------------------------------------------------------------------


def measure_drain(env, urls, n, limit):
    """Release the parked jobs at once; jobs/s from first start to last finish."""
    # One second ahead: every idle worker polls at least once a second, so
    # each is waiting for exactly this moment when it comes.
    if set_noop_jobs_due(env, database_now(env) + 1.0) != n:
        raise SystemExit(f"drain: {n} parked jobs expected")
    client, deadline = Client(urls[0]), time.monotonic() + limit
    try:
        while True:
            jobs = client.call("GET", "/api/v1/ops/health")["jobs"]
            if jobs["queued"] == 0 and jobs["running"] == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"drain: not done within {limit} s: {jobs}")
            time.sleep(0.1)
    finally:
        client.close()
    jobs = noop_jobs(urls[0], n)
    done = [j for j in jobs if j["status"] == "succeeded"]
    if len(done) != n:
        raise SystemExit(f"drain: {len(done)} of {n} jobs succeeded")
    first = min(j["started_at"] for j in done)
    last = max(j["finished_at"] for j in done)
    return n / (last - first)


def measure_latency(url, samples):
    """Idle enqueue→start, in ms, of ``samples`` jobs sent one at a time to ``url``."""
    client, found = Client(url), []
    try:
        for _ in range(samples):
            sent = time.time()
            job_id = client.call("POST", "/api/v1/intake", NOOP)["job_id"]
            deadline = time.monotonic() + 10
            while True:
                # Polls only find out when the job is done: the figure is
                # when the workflow started. Spaced out, so as not to
                # compete with the workers for the cores.
                time.sleep(0.005)
                view = client.call("GET", f"/api/v1/status/{job_id}")
                if view["status"] in FINAL:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"latency: job {job_id} not done within 10 s: {view['status']}")
            if view["status"] != "succeeded":
                raise SystemExit(f"latency: job {job_id} {view['status']}: {view['error']}")
            found.append((view["result"]["started"] - sent) * 1000)
            # Idle again: every worker back to waiting before the next one.
            time.sleep(random.uniform(0.02, 0.05))
    finally:
        client.close()
    return found


def measure_enqueue(urls, seconds):
    """Intakes of external jobs, wrk on every host at once: jobs/s in all."""
    per_host = max(1, 8 // len(urls))

    def drive(url):
        return wrk(url, "POST", "/api/v1/intake", EXTERNAL, seconds, 0, connections=per_host)
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        return sum(r["rps"] for r in pool.map(drive, urls))


def one_pass(scenario, env, args, workdir, tag):
    """Every measurement of one setup on a fresh database: {what: figure}."""
    name, _, threads, measures = scenario
    found = {}
    if "drain" in measures:
        procs, urls = start_hosts(env, (0,), args.workers, workdir, f"{tag}-load")
        try:
            submit_noop_jobs(urls[0], args.jobs)
        finally:
            stop(procs)
        set_noop_jobs_due(env, database_now(env) + 86_400)  # parked until released
    procs, urls = start_hosts(env, threads, args.workers, workdir, tag)
    try:
        if "drain" in measures:
            time.sleep(args.settle)  # every worker process of every host up, and idle
            found["drain"] = measure_drain(env, urls, args.jobs, limit=60 + args.jobs / 20)
        found["latency"] = measure_latency(urls[0], args.samples)
        if "enqueue" in measures:
            found["enqueue"] = measure_enqueue(urls, args.seconds)
    finally:
        stop(procs)
    return found


# ---------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def check_connections(pg, workers):
    """Fail early, and say why, if two hosts would need more connections
    than the server allows (they would answer 503 mid-run)."""
    with pg.admin() as conn:
        allowed = int(conn.execute("SELECT current_setting('max_connections')").fetchone()[0])
    needed = 2 * workers * CONNECTIONS_PER_PROCESS + 5
    if needed > allowed:
        raise SystemExit(f"two hosts of {workers} workers may need {needed} PostgreSQL connections, "
                         f"past max_connections={allowed}: pass --workers {max(1, workers // 2)}")


def report(results, scenarios, args, pg, pg_skipped, load):
    info = machine()
    base = scenarios[0][0]

    def figure(name, what):
        values = results[name].get(what)
        return None if not values else statistics.median(values)

    def cell(name, what):
        value = figure(name, what)
        if value is None:
            return "—"
        return f"{value:.0f} ({value / figure(base, what):.2f})"

    lines = [
        f"{QUEUE_HEADING}: SQLite and PostgreSQL (`bench/jobqueue.py`)",
        "",
        f"- date: {info['date']}; commit: {info['commit']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}; Python {info['python']}; "
        f"gunicorn {info['gunicorn']}" + (f"; {pg.describe}" if pg else ""),
        f"- the hosts, the clients and the database share the machine's cores; load average "
        f"{load:.2f} when the run began" + (f"; {args.note}" if args.note else ""),
        f"- setup: each host a gunicorn master with {args.workers} workers × 4 threads and "
        "WORKER_THREADS=4, production settings, rate limits raised out of the way; "
        f"{args.rounds} rounds, the setups taking turns, each pass on an empty database of its own",
        f"- enqueue: `wrk` with 8 connections in all for {args.seconds} s, intakes of an external "
        "job; median jobs/s",
        f"- drain: {args.jobs} parked jobs of an in-process workflow that does nothing, released "
        "at once on idle hosts; jobs/s from the first start to the last finish (the jobs' own "
        "timestamps); median",
        f"- latency: {args.samples} such jobs per pass, one at a time to host A while idle, from "
        "the client sending the intake to the workflow starting (this machine's clock); p50 and "
        "p99 over all passes",
        "",
        f"| setup | enqueue jobs/s (÷ {base}) | drain jobs/s (÷ {base}) | "
        "enqueue→start p50 / p99 ms | p50 ÷ " + base + " |",
        "|---|---:|---:|---:|---:|",
    ]
    base_p50 = percentile(results[base]["latency"], 50)
    for name, *_ in scenarios:
        lat = results[name]["latency"]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        lines.append(f"| {name} | {cell(name, 'enqueue')} | {cell(name, 'drain')} | "
                     f"{p50:.1f} / {p99:.1f} | {p50 / base_p50:.2f} |")
    lines.append("")
    cross = "PostgreSQL, 2 hosts, A runs none"
    if cross in results:
        p50 = percentile(results[cross]["latency"], 50)
        lines += [f"Target, idle enqueue→start p50 across two hosts under {TARGET_P50_MS:.0f} ms "
                  f"({cross}): {p50:.1f} ms {'✅' if p50 < TARGET_P50_MS else '❌'}", ""]
    if pg_skipped:
        lines += [f"PostgreSQL: skipped, {pg_skipped}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs drained per pass")
    parser.add_argument("--seconds", type=int, default=4, help="of wrk per enqueue pass")
    parser.add_argument("--samples", type=int, default=200, help="latency samples per pass")
    parser.add_argument("--workers", type=int, default=CORES, help="gunicorn workers per host")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds for every worker to start before the drain")
    parser.add_argument("--smoke", action="store_true", help="about 15 s in all; write no results")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--note", help="a line on the machine for the report (shared? noisy?)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.jobs, args.seconds, args.samples, args.settle = 1, 50, 1, 5, 0.5
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed. On Debian or Ubuntu: apt-get install wrk")
    exit_on_sigterm()
    load = os.getloadavg()[0]  # before this run adds its own

    pg, pg_skipped = Postgres.connect()
    if pg_skipped:
        print(f"bench: the PostgreSQL setups are skipped: {pg_skipped}", flush=True)
    scenarios = [s for s in SCENARIOS if s[1] == "sqlite" or pg is not None]
    workdir = tempfile.mkdtemp(prefix="levqor-queue-")
    results = {name: {} for name, *_ in scenarios}
    try:
        if pg is not None:
            check_connections(pg, args.workers)
        for round_no in range(args.rounds):
            shift = round_no % len(scenarios)
            for scenario in scenarios[shift:] + scenarios[:shift]:  # each setup first in turn
                name, store = scenario[:2]
                tag = f"r{round_no}-{SCENARIOS.index(scenario)}"
                env = dict(LEVQOR_ENV, **({"DATABASE_URL": pg.new()} if store == "postgres" else
                                          {"JOB_STORE": "sqlite",
                                           "SQLITE_PATH": os.path.join(workdir, f"{tag}.db")}))
                found = one_pass(scenario, env, args, workdir, tag)
                for what, value in found.items():
                    results[name].setdefault(what, []).extend(value if what == "latency" else [value])
                lat = found["latency"]
                print(f"round {round_no + 1}/{args.rounds} {name:34} "
                      + "".join(f"{w} {found[w]:7.0f} jobs/s  " for w in ("enqueue", "drain") if w in found)
                      + f"latency p50 {percentile(lat, 50):.1f} ms  p99 {percentile(lat, 99):.1f} ms",
                      flush=True)
    finally:
        if pg is not None:
            pg.drop_all()
    publish(args, QUEUE_HEADING, report(results, scenarios, args, pg, pg_skipped, load))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
