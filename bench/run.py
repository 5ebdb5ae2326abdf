#!/usr/bin/env python3
"""Levqor against the bare-WSGI floor, under the same gunicorn, on loopback.

    python bench/run.py            # full run, writes bench/RESULTS.md
    python bench/run.py --smoke    # one short round, for CI; writes nothing

Starts two gunicorn servers with identical settings (1 worker, gthread,
4 threads, both under gunicorn.conf.py): Levqor with its production defaults (keys, limiter, validation,
headers, audit and logging all on; only the rate limits raised out of the
way), and bench/floor.py. Then drives each endpoint with `wrk -t1 -c8`,
several rounds, alternating which app goes first, and reports medians:
req/s, p50 and p99 latency, and Levqor's ratios to the floor.

With Falcon installed, bench/falcon_app.py runs beside them as a peer: the
same five endpoints, under the same gunicorn settings.

Beside them, in the same rounds: Levqor with jobs in SQLite
(JOB_STORE=sqlite) and with every store in PostgreSQL (DATABASE_URL), on
one worker and on one worker per core. For PostgreSQL the run makes
databases of its own on the server at LEVQOR_BENCH_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/postgres) and drops them at the end;
without psycopg, or a server that answers, those rows are skipped, saying why.

Needs wrk (Debian: apt-get install wrk). Sends traffic to 127.0.0.1 only.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = "bench-key-0123456789abcdef0123"

# (name, method, path, body, target ratio of req/s to the floor)
ENDPOINTS = [
    ("GET /health", "GET", "/health", None, 0.90),
    ("GET /api/v1/status/<id>", "GET", "/api/v1/status/{job_id}", None, 0.90),
    ("GET /api/v1/users/<id>", "GET", "/api/v1/users/{user_id}", None, 0.80),
    ("POST /api/v1/intake", "POST", "/api/v1/intake",
     # A job for an external worker, with no cost cap: intake itself is
     # measured (validate, store, audit), not the running of the job.
     '{"workflow":"bench.external","payload":{"text":"benchmark me","n":1},"priority":"normal",'
     '"max_cost":0}', 0.65),
    ("POST /api/v1/users/upsert", "POST", "/api/v1/users/upsert", "EMAILS", 0.55),
]
FALCON_TARGET = 1.25  # Levqor's req/s to the Falcon peer's, every endpoint (issue 19)
P99_LIMIT = 2.0  # Levqor's p99 may be at most this multiple of the floor's
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The headings of RESULTS.md's parts: each script rewrites its own (write_section).
TITLE = "# Levqor benchmark results"
QUEUE_HEADING = "## Job queue"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(app, env, workdir, name, workers=1):
    """Start a gunicorn server without waiting for it: (process, url, log path)."""
    port = free_port()
    log = os.path.join(workdir, f"{name}.log")
    full_env = {**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1",
                "WEB_CONCURRENCY": str(workers), "THREADS": os.environ.get("BENCH_THREADS", "4")}
    with open(log, "wb") as out:
        # A session of its own: stop() can then reach every process of it.
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app],
                                cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc, url, log, limit=20):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} did not start; see {log}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{url} did not answer within {limit} s; see {log}")


def start(app, env, workdir, name, workers=1):
    proc, url, log = launch(app, env, workdir, name, workers)
    wait_ready(proc, url, log)
    return proc, url


def stop(procs, patience=15):
    """SIGTERM every server, wait ``patience`` seconds for each (gunicorn
    drains gracefully), then kill what is left of it: its master if it did
    not stop, and any worker the master left behind (gunicorn's quick
    shutdown has left one alive for good now and then)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def exit_on_sigterm():
    # A SIGTERM'd run still stops its servers and drops its databases:
    # SystemExit unwinds through the finally blocks that do it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Postgres:
    """Databases made for this run on one PostgreSQL server, dropped at the end.

    ``Postgres.connect()`` gives one, or None and why it cannot (no psycopg,
    or no server answering), so a run without PostgreSQL still measures the
    rest. Each ``new()`` database is a fresh, empty one: every Levqor in it
    starts from the same empty schema, and no two share a NOTIFY channel
    (LISTEN/NOTIFY is per database), so one's intakes never wake another's
    workers.
    """

    def __init__(self, admin_url, psycopg):
        self.admin_url = admin_url
        self.psycopg = psycopg
        self.prefix = f"levqor_bench_{os.getpid()}_{os.urandom(3).hex()}"
        self.names = []
        with self.admin() as conn:
            row = conn.execute("SELECT current_setting('server_version'),"
                               " current_setting('synchronous_commit')").fetchone()
        self.describe = (f"PostgreSQL {row[0].split()[0]} on the same machine (synchronous_commit {row[1]}), "
                         f"psycopg {psycopg.__version__}")

    @classmethod
    def connect(cls):
        url = os.environ.get("LEVQOR_BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL
        parts = urllib.parse.urlsplit(url)
        where = f"{parts.hostname}:{parts.port or 5432}"  # never the password
        try:
            import psycopg
        except ImportError:
            return None, "psycopg is not installed (pip install -r requirements-postgres.txt)"
        try:
            return cls(url, psycopg), None
        except psycopg.Error as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return None, f"PostgreSQL at {where} does not answer: {first_line}"

    def admin(self):
        return self.psycopg.connect(self.admin_url, autocommit=True, connect_timeout=3)

    def new(self):
        """A fresh database; its URL (the admin URL's, with its name)."""
        name = f"{self.prefix}_{len(self.names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return urllib.parse.urlsplit(self.admin_url)._replace(path="/" + name).geturl()

    def drop_all(self, patience=30):
        """Drop every database this run made, whoever is still connected;
        if the server is away (restarting), try again for ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while self.names:
            try:
                with self.admin() as conn:
                    while self.names:
                        conn.execute(f'DROP DATABASE IF EXISTS "{self.names[-1]}" WITH (FORCE)')
                        self.names.pop()
            except self.psycopg.OperationalError:
                if time.monotonic() > deadline:
                    print(f"bench: could not drop the databases {', '.join(self.names)}",
                          file=sys.stderr)
                    raise
                time.sleep(1)


def call(url, method, path, body):
    req = urllib.request.Request(url + path, method=method, data=body.encode() if body else None,
                                 headers={"X-Api-Key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wrk(url, method, path, body, seconds, round_no, connections=8):
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_PATH": path, "BENCH_KEY": KEY}
    if body == "EMAILS":
        env["BENCH_EMAILS"] = f"r{round_no}-{time.monotonic_ns()}-"
    elif body:
        env["BENCH_BODY"] = body
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                          "-s", os.path.join(HERE, "wrk.lua"), url + path],
                         env=env, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"^BENCH (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise SystemExit(f"wrk failed: {out.stdout}{out.stderr}")
    r = json.loads(m.group(1))
    if not r["requests"]:  # every request outlasted the run: wrk counts no error for that
        raise SystemExit(f"{method} {path}: no request was answered within {seconds} s")
    if r["non2xx"] or r["socket_errors"]:
        raise SystemExit(f"{method} {path}: {r['non2xx']} non-2xx answers and "
                         f"{r['socket_errors']} socket errors: the run does not measure success")
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1000,
            "p99": r["p99_us"] / 1000, "requests": r["requests"]}


def write_section(path, heading, section):
    """Replace the part of RESULTS.md that begins with ``heading`` (a line
    of its own) and runs to the next "## " heading, or add ``section`` at
    the end if there is none: each benchmark rewrites its own part and
    keeps the others'. run.py's part is the top, under the title."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    start = 0 if old.startswith(heading) else old.find("\n" + heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section.strip("\n") + "\n"
    else:
        end = old.find("\n## ", start + 1)
        rest = "" if end < 0 else "\n" + old[end + 1:].strip("\n") + "\n"
        before = old[:start].rstrip("\n")
        new = (before + "\n\n" if before else "") + section.strip("\n") + "\n" + rest
    with open(path, "w") as f:
        f.write(new)


def publish(args, heading, section):
    """Print a benchmark's section and, unless ``--smoke``, write it to its
    part of ``--out``."""
    print("\n" + section)
    if not args.smoke:
        write_section(args.out, heading, section)
        print(f"written to {os.path.relpath(args.out, ROOT)}")


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip() or "unknown"
        # What ran is the working tree: say so when it is not the commit.
        if subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip():
            commit += " with uncommitted changes outside bench/"
    except OSError:
        commit = "unknown"
    import gunicorn
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "nproc": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "gunicorn": gunicorn.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s; write no results")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--note", help="a line on the machine for the report (shared? noisy?)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.seconds = 1, 1
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed. On Debian or Ubuntu: apt-get install wrk")
    exit_on_sigterm()
    load = os.getloadavg()[0]  # before this run adds its own

    workdir = tempfile.mkdtemp(prefix="levqor-bench-")
    big = "1000000000"
    levqor_env = {"LEVQOR_ENV": "production", "API_KEYS": KEY,
                  "RATE_BURST": big, "RATE_GLOBAL": big, "RATE_READ": big}
    cores = os.cpu_count() or 1
    # name -> (app, env, workers). The first Levqor is the headline: the
    # defaults (jobs in memory, one worker); the others are JOB_STORE=sqlite,
    # then DATABASE_URL (each in a database of its own).
    apps = {
        "floor": ("bench.floor:app", {}, 1),
        "levqor": ("levqor:app", levqor_env, 1),
        "sqlite ×1": ("levqor:app", {**levqor_env, "JOB_STORE": "sqlite"}, 1),
        f"sqlite ×{cores}": ("levqor:app", {**levqor_env, "JOB_STORE": "sqlite"}, cores),
    }
    try:  # the Falcon peer runs in a server of its own: here, only whether it can
        falcon_version, falcon_skipped = importlib.metadata.version("falcon"), None
        apps["falcon"] = ("bench.falcon_app:app", {"API_KEYS": KEY}, 1)
    except importlib.metadata.PackageNotFoundError:
        falcon_skipped = "Falcon is not installed (pip install -r requirements-dev.txt)"
        print(f"bench: the Falcon peer is skipped: {falcon_skipped}", file=sys.stderr, flush=True)
    pg, pg_skipped = Postgres.connect()
    if pg_skipped:
        print(f"bench: the PostgreSQL rows are skipped: {pg_skipped}", file=sys.stderr, flush=True)
    servers, ids = {}, {}
    try:
        if pg is not None:
            for workers in (1, cores):
                apps[f"postgres ×{workers}"] = ("levqor:app",
                                                {**levqor_env, "DATABASE_URL": pg.new()}, workers)
        for name, (app, env, workers) in apps.items():
            env = dict(env, SQLITE_PATH=os.path.join(workdir, f"{len(servers)}.db")) if env else env
            servers[name] = start(app, env, workdir, f"app{len(servers)}", workers)
        for name, (_, url) in servers.items():
            if name == "floor":  # answers every path alike
                ids[name] = {"job_id": "0" * 32, "user_id": "0" * 32}
                continue
            ids[name] = {"job_id": call(url, "POST", "/api/v1/intake", ENDPOINTS[3][3])["job_id"],
                         "user_id": call(url, "POST", "/api/v1/users/upsert",
                                         '{"email":"bench-reader@example.com","name":"Reader"}')["user"]["id"]}
        samples = {(name, app): [] for name, *_ in ENDPOINTS for app in servers}
        names = list(servers)
        for round_no in range(args.rounds):
            for i, (name, method, path, body, _) in enumerate(ENDPOINTS):
                shift = (round_no + i) % len(names)
                for app in names[shift:] + names[:shift]:  # each app first in turn
                    result = wrk(servers[app][1], method, path.format(**ids[app]), body, args.seconds,
                                 round_no)
                    samples[name, app].append(result)
                    print(f"round {round_no + 1}/{args.rounds} {name:28} {app:10} "
                          f"{result['rps']:8.0f} req/s  p50 {result['p50']:.2f} ms  "
                          f"p99 {result['p99']:.2f} ms", flush=True)
    finally:
        stop([proc for proc, _ in servers.values()])
        if pg is not None:
            pg.drop_all()

    def median(name, app, key):
        return statistics.median(s[key] for s in samples[name, app])

    rows = []
    for name, _, _, _, target in ENDPOINTS:
        med = {app: {k: median(name, app, k) for k in ("rps", "p50", "p99")}
               for app in ("levqor", "floor")}
        ratio = med["levqor"]["rps"] / med["floor"]["rps"]
        p99_ratio = med["levqor"]["p99"] / med["floor"]["p99"]
        rows.append((name, med, ratio, target, p99_ratio))

    info = machine()
    lines = [
        TITLE,
        "",
        f"- date: {info['date']}; commit: {info['commit']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}; Python {info['python']}; gunicorn {info['gunicorn']}",
        f"- setup: 1 gunicorn worker, gthread (gunicorn.conf.py's: a thread waits on its kept-alive "
        f"connection up to KEEPALIVE_LINGER, {os.environ.get('KEEPALIVE_LINGER', '0.1')} s, and an "
        f"answer's head and body leave in one write), 4 threads, "
        f"for every app; `wrk -t1 -c8`, "
        f"{args.rounds} rounds of {args.seconds} s per endpoint and app, apps alternating; medians",
        "- Levqor: LEVQOR_ENV=production with an API key; rate limits raised out of the way, "
        "everything else on (auth, limiter, validation, headers, audit, JSON access log to a file); "
        "the main table is the default setup, jobs in memory and one worker",
        f"- the servers, wrk and the database share the machine's cores; load average {load:.2f} "
        "when the run began" + (f"; {args.note}" if args.note else ""),
        "",
        "| endpoint | floor req/s | Levqor req/s | ratio | target | floor p50 / p99 ms | Levqor p50 / p99 ms | p99 ratio (≤ 2) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, med, ratio, target, p99_ratio in rows:
        lines.append(
            f"| {name} | {med['floor']['rps']:.0f} | {med['levqor']['rps']:.0f} | "
            f"**{ratio:.2f}** | ≥ {target:.2f} {'✅' if ratio >= target else '❌'} | "
            f"{med['floor']['p50']:.2f} / {med['floor']['p99']:.2f} | "
            f"{med['levqor']['p50']:.2f} / {med['levqor']['p99']:.2f} | "
            f"{p99_ratio:.2f} {'✅' if p99_ratio <= P99_LIMIT else '❌'} |")
    missed = [name for name, _, ratio, target, p99 in rows if ratio < target or p99 > P99_LIMIT]
    lines += ["", "Targets missed: " + (", ".join(missed) if missed else "none"), ""]
    # How steady the machine was: the floor does the same work every round.
    floors = [[s["rps"] for s in samples[name, "floor"]] for name, *_ in ENDPOINTS]
    spread = max(max(rps) / min(rps) for rps in floors)
    lines += [f"Noise: the floor's req/s for one endpoint varied up to {spread:.2f}× between rounds "
              "of this run.", ""]
    if falcon_skipped is None:
        lines += ["Against Falcon (`bench/falcon_app.py`: the same five endpoints in Falcon "
                  f"{falcon_version}, under the same gunicorn settings; it checks the key and the "
                  "bodies against the same schemas and keeps jobs in a dict and users in SQLite, but has no "
                  "rate limiter, audit trail, access log or budgets), jobs in memory, one worker each:", "",
                  "| endpoint | Falcon req/s | Levqor req/s | Levqor ÷ Falcon | target | Falcon p50 / p99 ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, *_ in ENDPOINTS:
            ratio = median(name, "levqor", "rps") / median(name, "falcon", "rps")
            lines.append(f"| {name} | {median(name, 'falcon', 'rps'):.0f} | {median(name, 'levqor', 'rps'):.0f} | "
                         f"**{ratio:.2f}** | ≥ {FALCON_TARGET:.2f} {'✅' if ratio >= FALCON_TARGET else '❌'} | "
                         f"{median(name, 'falcon', 'p50'):.2f} / {median(name, 'falcon', 'p99'):.2f} |")
        # The floor bounds every app served by this gunicorn: say when a target sits above it.
        above = [name for name, *_ in ENDPOINTS
                 if FALCON_TARGET * median(name, "falcon", "rps") > median(name, "floor", "rps")]
        lines += ["", "Above the floor (1.25× Falcon's req/s is more than the floor's, which no app under "
                  "this gunicorn can pass): " + (", ".join(above) if above else "none"), ""]
    else:
        lines += [f"Against Falcon: skipped, {falcon_skipped}.", ""]
    others = [a for a in servers if a not in ("floor", "levqor", "falcon")]
    lines += ["With jobs in SQLite (`JOB_STORE=sqlite`), and with every store in PostgreSQL "
              "(`DATABASE_URL`): req/s, and the ratio to the same run's floor (one worker):", "",
              "| endpoint | floor | Levqor, memory ×1 | " + " | ".join(f"Levqor, {a}" for a in others) + " |",
              "|---|---:|---:|" + "---:|" * len(others)]
    for name, *_ in ENDPOINTS:
        floor = median(name, "floor", "rps")
        cells = [f"{median(name, a, 'rps'):.0f} ({median(name, a, 'rps') / floor:.2f})"
                 for a in ["levqor", *others]]
        lines.append(f"| {name} | {floor:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    if pg is not None:
        lines += [f"PostgreSQL: {pg.describe}; each configuration in a database made for the run, "
                  "and dropped after it.", ""]
    else:
        lines += [f"PostgreSQL: skipped, {pg_skipped}.", ""]
    micro = subprocess.run([sys.executable, os.path.join(HERE, "micro.py"), "-n", "300" if args.smoke else "5000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines += ["In-process cost, through the WSGI callable with no server (`bench/micro.py`):", "",
              "```", micro.stdout.strip(), "```", ""]
    publish(args, TITLE, "\n".join(lines))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
