#!/usr/bin/env python3
"""Soak a running Levqor with a mixed workload for a bounded time, then check it.

    BASE_URL=http://127.0.0.1:5000 API_KEY=... CALLBACK_SECRET=whsec_... \\
        python scripts/soak.py --seconds 600 --server-pid <gunicorn master pid>

The server must send callbacks to this machine's loopback
(CALLBACK_ALLOW_PRIVATE=1) signed with CALLBACK_SECRET, and should run with a
short JOB_TTL (say 10 s) so that finished jobs really leave during the run.

Load, from several threads: intakes of in-process (demo.flow) and external
jobs, each with a callback to a receiver started here; status polling;
user upserts and reads; an external worker claiming and completing jobs.
Then it checks: no 5xx at all; every accepted job reached a final state
(its signed callback arrived and verified); every acknowledged user is
readable; and, with --server-pid, the workers' resident memory is flat
after warm-up. Prints a summary and exits non-zero if any check failed.
"""

import argparse
import collections
import http.server
import json
import os
import random
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks import WebhookVerificationError, verify_webhook  # noqa: E402

BASE_URL = os.environ.get("BASE_URL", "http://127.0.0.1:5000").rstrip("/")
API_KEY = os.environ.get("API_KEY", "")
SECRET = os.environ.get("CALLBACK_SECRET", "")


class Receiver:
    """Collects verified callbacks: job_id -> final status."""

    def __init__(self):
        self.final = {}
        self.bad = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    event = verify_webhook(SECRET, dict(self.headers), body)
                    receiver.final[event["data"]["job_id"]] = event["data"]["status"]
                    code = 200
                except (WebhookVerificationError, KeyError, ValueError):
                    receiver.bad += 1
                    code = 400
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # By name: intake refuses literal addresses in callback URLs.
        self.url = f"http://localhost:{self.server.server_address[1]}/soak"
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()


def rss_kib(master_pid):
    """Resident memory of the gunicorn master's children (the workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != master_pid:
                    continue
            with open(f"/proc/{entry}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, ValueError, StopIteration):
            pass
    return total


class Soak:
    def __init__(self, seconds, threads):
        self.deadline = time.monotonic() + seconds
        self.threads = threads
        self.receiver = Receiver()
        self.lock = threading.Lock()
        self.statuses = collections.Counter()
        self.server_errors = []
        self.jobs = []
        self.users = {}

    def session(self):
        s = requests.Session()
        if API_KEY:
            s.headers["X-Api-Key"] = API_KEY
        return s

    def call(self, session, method, path, **kwargs):
        r = session.request(method, BASE_URL + path, timeout=15, **kwargs)
        with self.lock:
            self.statuses[r.status_code] += 1
            if r.status_code >= 500:
                self.server_errors.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r

    def client(self, n):
        s, rng = self.session(), random.Random(n)
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            roll = rng.random()
            if roll < 0.35:
                workflow = "demo.flow" if rng.random() < 0.6 else "soak.external"
                r = self.call(s, "POST", "/api/v1/intake", json={
                    "workflow": workflow, "payload": {"text": f"soak {n} {i}"}, "max_cost": 0,
                    "priority": rng.choice(["low", "normal", "high"]), "callback_url": self.receiver.url})
                if r.status_code == 202:
                    with self.lock:
                        self.jobs.append(r.json()["job_id"])
            elif roll < 0.65 and self.jobs:
                self.call(s, "GET", f"/api/v1/status/{rng.choice(self.jobs[-200:])}")
            elif roll < 0.85:
                email = f"soak-{n}-{i % 500}@example.com"
                r = self.call(s, "POST", "/api/v1/users/upsert", json={"email": email, "meta": {"i": i}})
                if r.status_code in (200, 201):
                    with self.lock:
                        self.users[email] = r.json()["user"]["id"]
            else:
                self.call(s, "GET", "/health")

    def worker(self):
        s = self.session()
        while time.monotonic() < self.deadline + 15:  # and a little after, to drain
            r = self.call(s, "POST", "/api/v1/jobs/claim", json={"workflows": ["soak.external"],
                                                                 "lease_seconds": 30})
            if r.status_code == 204:
                if time.monotonic() > self.deadline and self.all_final():
                    return
                time.sleep(0.05)
                continue
            job = r.json()["job"]
            self.call(s, "POST", f"/api/v1/jobs/{job['job_id']}/complete",
                      json={"lease_token": job["lease_token"], "result": {"echo": job["payload"]}})

    def all_final(self):
        with self.lock:
            return all(j in self.receiver.final for j in self.jobs)

    def run(self, master_pid=None):
        threads = [threading.Thread(target=self.client, args=(n,)) for n in range(self.threads)]
        threads.append(threading.Thread(target=self.worker))
        for t in threads:
            t.start()
        total = self.deadline - time.monotonic()
        samples = []
        while time.monotonic() < self.deadline:
            time.sleep(min(1.0, max(0.0, self.deadline - time.monotonic())))
            if master_pid:
                samples.append((total - (self.deadline - time.monotonic()), rss_kib(master_pid)))
        for t in threads:
            t.join(60)
        settle = time.monotonic() + 20  # callbacks still on their way
        while not self.all_final() and time.monotonic() < settle:
            time.sleep(0.1)
        return self.check(samples, total)

    def check(self, samples, total):
        failures = []
        if self.server_errors:
            failures.append(f"{len(self.server_errors)} server errors, first: {self.server_errors[0]}")
        missing = [j for j in self.jobs if j not in self.receiver.final]
        if missing:
            failures.append(f"{len(missing)} of {len(self.jobs)} accepted jobs never reported a final state")
        if self.receiver.bad:
            failures.append(f"{self.receiver.bad} callbacks failed verification")
        s = self.session()
        unreadable = [e for e, uid in self.users.items()
                      if s.get(BASE_URL + f"/api/v1/users/{uid}", timeout=15).json().get("email") != e]
        if unreadable:
            failures.append(f"{len(unreadable)} acknowledged users cannot be read back")
        memory = None
        if samples:
            warm = [kib for at, kib in samples if at >= total / 3]
            memory = {"after_warmup_kib": warm[0], "end_kib": warm[-1], "peak_kib": max(warm)}
            # Flat: no more than 20% (and 8 MiB) above the level reached after warm-up.
            if warm[-1] > warm[0] * 1.2 + 8192:
                failures.append(f"resident memory grew from {warm[0]} KiB to {warm[-1]} KiB")
        summary = {"requests": sum(self.statuses.values()), "by_status": dict(self.statuses),
                   "jobs": len(self.jobs), "jobs_final": collections.Counter(self.receiver.final.values()),
                   "users": len(self.users), "memory": memory, "failures": failures}
        print(json.dumps(summary, default=dict, indent=2))
        checks = 5
        print(f"soak: {checks - len(failures)} passed, {len(failures)} failed")
        return not failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--server-pid", type=int, help="gunicorn master pid, to watch memory")
    args = parser.parse_args()
    if not SECRET:
        raise SystemExit("soak: set CALLBACK_SECRET to the server's secret")
    ok = Soak(args.seconds, args.threads).run(args.server_pid)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
