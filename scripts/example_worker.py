#!/usr/bin/env python3
"""A small external Levqor worker, built on levqor_client.Worker.

    BASE_URL=http://127.0.0.1:5000 API_KEY=... python scripts/example_worker.py uppercase

Claims jobs of the workflows named on the command line, heartbeats while it
works, and completes or fails each job. The handler here upper-cases every
string in the payload; replace ``handle`` with your own work. Stops on
Ctrl-C or SIGTERM after the jobs in hand, after --max-jobs jobs, or once the
queue has been empty for --idle-exit seconds. ``levqor worker module:REGISTRY``
does the same from the command line once the package is installed.
"""

import argparse
import logging
import os
import sys

# Run from a clone without installing the package (pip install ./clients/python).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

from levqor_client import Client, Permanent, Worker  # noqa: E402


def handle(payload, ctx):
    """The work itself: here, upper-case the payload's strings."""
    if payload.get("fail"):
        raise Permanent("the payload asked to fail")  # no retry: it would fail again
    return {k: v.upper() if isinstance(v, str) else v for k, v in payload.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="+")
    parser.add_argument("--lease", type=int, default=30, help="lease seconds (1..3600)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-jobs", type=int)
    parser.add_argument("--idle-exit", type=float, help="stop after this long with nothing to do")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    client = Client(os.environ.get("BASE_URL"), os.environ.get("API_KEY"))
    worker = Worker(client, {name: handle for name in args.workflows}, args.concurrency,
                    lease_seconds=args.lease)
    handled = worker.run(max_jobs=args.max_jobs, idle_exit=args.idle_exit)
    print(f"worker stopped after {handled} jobs", flush=True)


if __name__ == "__main__":
    main()
