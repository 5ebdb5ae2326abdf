#!/usr/bin/env python3
"""Levqor against the bare-WSGI floor, under the same gunicorn, on loopback.

    python bench/run.py            # full run, writes bench/RESULTS.md
    python bench/run.py --smoke    # one short round, for CI; writes nothing

Starts two gunicorn servers with identical settings (1 worker, gthread,
4 threads): Levqor with its production defaults (keys, limiter, validation,
headers, audit and logging all on; only the rate limits raised out of the
way), and bench/floor.py. Then drives each endpoint with `wrk -t1 -c8`,
several rounds, alternating which app goes first, and reports medians:
req/s, p50 and p99 latency, and Levqor's ratios to the floor.

Needs wrk (Debian: apt-get install wrk). Sends traffic to 127.0.0.1 only.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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
P99_LIMIT = 2.0  # Levqor's p99 may be at most this multiple of the floor's


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app, env, workdir, name, workers=1):
    port = free_port()
    log = open(os.path.join(workdir, f"{name}.log"), "wb")
    full_env = {**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1",
                "WEB_CONCURRENCY": str(workers), "THREADS": os.environ.get("BENCH_THREADS", "4")}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app],
                            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} did not start; see {log.name}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{name} did not answer within 20 s; see {log.name}")


def call(url, method, path, body):
    req = urllib.request.Request(url + path, method=method, data=body.encode() if body else None,
                                 headers={"X-Api-Key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wrk(url, method, path, body, seconds, round_no):
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_PATH": path, "BENCH_KEY": KEY}
    if body == "EMAILS":
        env["BENCH_EMAILS"] = f"r{round_no}-{time.monotonic_ns()}-"
    elif body:
        env["BENCH_BODY"] = body
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "5s",
                          "-s", os.path.join(HERE, "wrk.lua"), url + path],
                         env=env, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"^BENCH (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise SystemExit(f"wrk failed: {out.stdout}{out.stderr}")
    r = json.loads(m.group(1))
    if r["non2xx"] or r["socket_errors"]:
        raise SystemExit(f"{method} {path}: {r['non2xx']} non-2xx answers and "
                         f"{r['socket_errors']} socket errors: the run does not measure success")
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1000,
            "p99": r["p99_us"] / 1000}


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
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.seconds = 1, 1
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed. On Debian or Ubuntu: apt-get install wrk")

    workdir = tempfile.mkdtemp(prefix="levqor-bench-")
    big = "1000000000"
    levqor_env = {"LEVQOR_ENV": "production", "API_KEYS": KEY,
                  "RATE_BURST": big, "RATE_GLOBAL": big, "RATE_READ": big}
    cores = os.cpu_count() or 1
    # name -> (app, env, workers). The first Levqor is the headline: the
    # defaults (jobs in memory, one worker); the others are JOB_STORE=sqlite.
    apps = {
        "floor": ("bench.floor:app", {}, 1),
        "levqor": ("levqor:app", levqor_env, 1),
        "sqlite ×1": ("levqor:app", {**levqor_env, "JOB_STORE": "sqlite"}, 1),
        f"sqlite ×{cores}": ("levqor:app", {**levqor_env, "JOB_STORE": "sqlite"}, cores),
    }
    servers, ids = {}, {}
    try:
        for name, (app, env, workers) in apps.items():
            env = dict(env, SQLITE_PATH=os.path.join(workdir, f"{len(servers)}.db")) if env else env
            servers[name] = start(app, env, workdir, f"app{len(servers)}", workers)
        for name, (_, url) in servers.items():
            if name == "floor":
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
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

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
        "# Levqor benchmark results",
        "",
        f"- date: {info['date']}; commit: {info['commit']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}; Python {info['python']}; gunicorn {info['gunicorn']}",
        f"- setup: 1 gunicorn worker, gthread, 4 threads, for both apps; `wrk -t1 -c8`, "
        f"{args.rounds} rounds of {args.seconds} s per endpoint and app, apps alternating; medians",
        "- Levqor: LEVQOR_ENV=production with an API key; rate limits raised out of the way, "
        "everything else on (auth, limiter, validation, headers, audit, JSON access log to a file); "
        "the main table is the default setup, jobs in memory and one worker",
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
    others = [a for a in servers if a not in ("floor", "levqor")]
    lines += ["With jobs in SQLite (`JOB_STORE=sqlite`): req/s, and the ratio to the same "
              "run's floor (one worker):", "",
              "| endpoint | floor | Levqor, memory ×1 | " + " | ".join(f"Levqor, {a}" for a in others) + " |",
              "|---|---:|---:|" + "---:|" * len(others)]
    for name, *_ in ENDPOINTS:
        floor = median(name, "floor", "rps")
        cells = [f"{median(name, a, 'rps'):.0f} ({median(name, a, 'rps') / floor:.2f})"
                 for a in ["levqor", *others]]
        lines.append(f"| {name} | {floor:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    micro = subprocess.run([sys.executable, os.path.join(HERE, "micro.py"), "-n", "300" if args.smoke else "5000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines += ["In-process cost, through the WSGI callable with no server (`bench/micro.py`):", "",
              "```", micro.stdout.strip(), "```", ""]
    report = "\n".join(lines)
    print("\n" + report)
    if not args.smoke:
        with open(args.out, "w") as f:
            f.write(report)
        print(f"written to {os.path.relpath(args.out, ROOT)}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
