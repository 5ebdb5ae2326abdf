#!/usr/bin/env python3
"""A small external Levqor worker: claims jobs over HTTP, runs them, reports.

    BASE_URL=http://127.0.0.1:5000 API_KEY=... python scripts/example_worker.py uppercase

Claims jobs of the workflows named on the command line, heartbeats while it
works (so the lease does not run out), and completes or fails each job. The
handler here upper-cases every string in the payload; replace ``handle``
with your own work, in this language or any other that speaks HTTP.

Stops on Ctrl-C or SIGTERM after the job in hand, or after --max-jobs jobs,
or once the queue has been empty for --idle-exit seconds.
"""

import argparse
import os
import signal
import sys
import threading
import time

import requests

BASE_URL = os.environ.get("BASE_URL", "http://127.0.0.1:5000").rstrip("/")
API_KEY = os.environ.get("API_KEY", "")


def handle(job):
    """The work itself: here, upper-case the payload's strings."""
    if job["payload"].get("fail"):
        raise ValueError("the payload asked to fail")
    return {k: v.upper() if isinstance(v, str) else v for k, v in job["payload"].items()}


class Worker:
    def __init__(self, workflows, lease_seconds=30):
        self.workflows = workflows
        self.lease_seconds = lease_seconds
        self.session = requests.Session()
        if API_KEY:
            self.session.headers["X-Api-Key"] = API_KEY
        self.stopping = threading.Event()

    def post(self, path, body):
        return self.session.post(BASE_URL + path, json=body, timeout=10)

    def claim(self):
        r = self.post("/api/v1/jobs/claim", {"workflows": self.workflows,
                                             "lease_seconds": self.lease_seconds})
        if r.status_code == 204:
            return None
        r.raise_for_status()
        return r.json()["job"]

    def heartbeat_until(self, job, done):
        """Extend the lease every third of it until ``done`` is set."""
        while not done.wait(self.lease_seconds / 3):
            r = self.post(f"/api/v1/jobs/{job['job_id']}/heartbeat",
                          {"lease_token": job["lease_token"]})
            if r.status_code == 409:  # lease lost: someone else has the job now
                return

    def run_one(self, job):
        done = threading.Event()
        beat = threading.Thread(target=self.heartbeat_until, args=(job, done), daemon=True)
        beat.start()
        try:
            result = handle(job)
        except Exception as exc:
            body, path = {"lease_token": job["lease_token"], "error": f"{type(exc).__name__}: {exc}",
                          "retryable": not isinstance(exc, ValueError)}, "fail"
        else:
            body, path = {"lease_token": job["lease_token"], "result": result}, "complete"
        finally:
            done.set()
            beat.join()
        r = self.post(f"/api/v1/jobs/{job['job_id']}/{path}", body)
        if r.status_code == 409:
            print(f"job {job['job_id']}: lease lost, result dropped", flush=True)
        else:
            r.raise_for_status()
            print(f"job {job['job_id']}: {r.json()['job']['status']}", flush=True)

    def run(self, max_jobs=None, idle_exit=None, poll=0.5):
        handled, idle_since = 0, time.monotonic()
        while not self.stopping.is_set() and (max_jobs is None or handled < max_jobs):
            try:
                job = self.claim()
            except requests.RequestException as exc:
                print(f"claim failed: {exc}", file=sys.stderr, flush=True)
                job = None
            if job is None:
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    break
                self.stopping.wait(poll)
                continue
            self.run_one(job)
            handled += 1
            idle_since = time.monotonic()
        return handled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="+")
    parser.add_argument("--lease", type=int, default=30, help="lease seconds (1..3600)")
    parser.add_argument("--max-jobs", type=int)
    parser.add_argument("--idle-exit", type=float, help="stop after this long with nothing to do")
    args = parser.parse_args()
    worker = Worker(args.workflows, args.lease)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    try:
        handled = worker.run(args.max_jobs, args.idle_exit)
    except KeyboardInterrupt:
        handled = None
    print(f"worker stopped after {handled} jobs", flush=True)


if __name__ == "__main__":
    main()
