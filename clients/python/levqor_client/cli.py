"""The ``levqor`` command line (argparse).

Exit codes: 0 ok; 1 a job failed or was canceled; 2 a usage error; 3 a
server, authentication or connection error; 4 ``wait`` gave up before the
job finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .client import Client, Job
from .errors import LevqorError
from .worker import Worker

OK, JOB_FAILED, USAGE, SERVER_ERROR, TIMED_OUT = 0, 1, 2, 3, 4


def _out(line: str = "") -> None:
    print(line, flush=True)


def _job_code(job: Job) -> int:
    return OK if job.status not in ("failed", "canceled") else JOB_FAILED


def _payload(text: str) -> Dict[str, Any]:
    """--payload: JSON, @file, or - for standard input."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("the payload is a JSON object")
    return value


def _table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as columns aligned to their widest cell."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    _out("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _when(ts: Optional[float]) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _wait(client: Client, job_id: str, timeout: float) -> int:
    """Wait for a job: a live line on a terminal, a line per change when piped."""
    live = sys.stdout.isatty()
    start = time.monotonic()
    last = [None]

    def show(job: Job) -> None:
        elapsed = time.monotonic() - start
        if live:
            sys.stdout.write(f"\r{job_id}  {job.status:<10} {elapsed:6.1f}s\x1b[K")
            sys.stdout.flush()
        elif job.status != last[0]:
            _out(f"{job_id} {job.status} {elapsed:.1f}s")
        last[0] = job.status

    try:
        job = client.wait(job_id, timeout, on_poll=show)
    except TimeoutError as exc:
        if live:
            _out()
        print(f"levqor: {exc}", file=sys.stderr)
        return TIMED_OUT
    if live:
        _out()
    _out(json.dumps(job.raw, indent=2, sort_keys=True))
    return _job_code(job)


# -- commands -------------------------------------------------------------------


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(args.workflow, args.payload, priority=args.priority,
                        max_cost=args.max_cost, callback_url=args.callback_url,
                        idempotency_key=args.idempotency_key)
    if args.wait:
        print(job.job_id, file=sys.stderr)
        return _wait(client, job.job_id, args.timeout)
    _out(job.job_id)
    return OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.id)
    _out(json.dumps(job.raw, indent=2, sort_keys=True))
    return _job_code(job)


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return _wait(client, args.id, args.timeout)


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs(status=args.status, workflow=args.workflow, limit=args.limit)
    if args.json:
        for job in jobs:
            _out(json.dumps(job.raw, sort_keys=True))
        return OK
    rows = [{"job_id": j.job_id, "status": j.status, "workflow": j.workflow,
             "priority": j.priority, "attempts": j.attempts, "created": _when(j.created_at)}
            for j in jobs]
    _table(rows, ["job_id", "status", "workflow", "priority", "attempts", "created"])
    return OK


def _each(action: Callable[[str], Job], ids: Sequence[str]) -> int:
    """Apply ``action`` to every id; an error is reported and the rest go on."""
    code = OK
    for job_id in ids:
        try:
            _out(f"{job_id} {action(job_id).status}")
        except LevqorError as exc:
            print(f"levqor: {job_id}: {exc}", file=sys.stderr)
            code = SERVER_ERROR
    return code


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    return _each(client.cancel, args.ids)


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    return _each(client.retry, args.ids)


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    usage = client.usage(start=args.start, end=args.end, group_by=args.group_by)
    if args.json:
        _out(json.dumps(usage, sort_keys=True))
        return OK
    group = usage["group_by"]
    rows = [{group: g[group], "spend": g["spend"], "reserved": g["reserved"],
             "jobs": " ".join(f"{k}={v}" for k, v in sorted(g["jobs"].items()))
             if isinstance(g.get("jobs"), dict) else g.get("jobs")} for g in usage["groups"]]
    _table(rows, [group, "spend", "reserved", "jobs"])
    _out(f"total spend {usage['totals']['spend']}, reserved {usage['totals']['reserved']}"
         f" ({usage['from']} to {usage['to']})")
    return OK


def cmd_keys(client: Client, args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        made = client.create_key(args.name, args.role, daily_budget=args.daily_budget,
                                 rate_per_minute=args.rate_per_minute, workflows=args.workflow)
        _out(json.dumps(made, indent=2, sort_keys=True))
        print("levqor: the key is shown this once; keep it now", file=sys.stderr)
    elif args.keys_command == "list":
        keys = client.keys()
        if args.json:
            for key in keys:
                _out(json.dumps(key, sort_keys=True))
        else:
            _table([{**k, "created": _when(k.get("created_at"))} for k in keys],
                   ["id", "name", "role", "prefix", "daily_budget", "spend_today", "revoked",
                    "created"])
    else:
        _out(json.dumps(client.revoke_key(args.id), indent=2, sort_keys=True))
    return OK


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    answer = client.health()
    _out(json.dumps(answer, sort_keys=True))
    return OK if answer.get("ok") else SERVER_ERROR


def load_registry(spec: str) -> Dict[str, Any]:
    """``module:name`` -> the dict of workflow name -> function it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise argparse.ArgumentTypeError("give the registry as module:name")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside you
    registry = getattr(importlib.import_module(module_name), attr)
    if not isinstance(registry, dict) or not registry:
        raise argparse.ArgumentTypeError(f"{spec} is not a dict of workflow name -> function")
    return registry


def cmd_worker(client: Client, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        registry = load_registry(args.registry)
    except (ImportError, AttributeError, argparse.ArgumentTypeError) as exc:
        print(f"levqor worker: cannot load {args.registry}: {exc}", file=sys.stderr)
        return USAGE
    try:
        worker = Worker(client, registry, args.concurrency, lease_seconds=args.lease,
                        grace=args.grace, claim_wait=args.claim_wait)
    except ValueError as exc:
        print(f"levqor worker: {exc}", file=sys.stderr)
        return USAGE
    handled = worker.run(max_jobs=args.max_jobs, idle_exit=args.idle_exit)
    _out(f"worker stopped after {handled} jobs")
    return SERVER_ERROR if worker.error is not None else OK


# -- the parser ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(
        prog="levqor", formatter_class=fmt,
        description="Submit, watch and run Levqor jobs.",
        epilog="examples:\n"
               "  export LEVQOR_URL=http://127.0.0.1:5000 LEVQOR_API_KEY=...\n"
               "  levqor submit echo --payload '{\"text\": \"hi\"}' --wait\n"
               "  levqor jobs --status failed\n"
               "  levqor worker my_workers:REGISTRY --concurrency 4\n\n"
               "exit codes: 0 ok, 1 job failed or canceled, 2 usage, "
               "3 server/auth/connection error, 4 wait gave up")
    top.add_argument("--url", default=None, help="service URL (default $LEVQOR_URL)")
    top.add_argument("--api-key", default=None, help="API key (default $LEVQOR_API_KEY)")
    top.add_argument("--timeout", dest="http_timeout", type=float, default=10,
                     help="seconds per HTTP call (default 10)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, fn: Callable[..., int], help: str, examples: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=fmt,
                           epilog="examples:\n" + examples)
        p.set_defaults(fn=fn)
        return p

    p = command("submit", cmd_submit, "submit a job; prints its id (or, with --wait, the final job)",
                "  levqor submit echo --payload '{\"a\": 1}'\n"
                "  levqor submit report.build --payload @payload.json --priority high --wait\n"
                "  echo '{\"a\": 1}' | levqor submit echo --payload -")
    p.add_argument("workflow")
    p.add_argument("--payload", type=_payload, default={}, metavar="JSON|@FILE|-",
                   help="the payload: JSON text, @file, or - for stdin (default {})")
    p.add_argument("--priority", choices=["low", "normal", "high"])
    p.add_argument("--max-cost", type=float, help="dollars this job may spend")
    p.add_argument("--callback-url")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    p.add_argument("--wait-timeout", dest="timeout", type=float, default=300,
                   help="seconds --wait waits (default 300)")

    p = command("status", cmd_status, "show a job's status view (exit 1 if it failed or was canceled)",
                "  levqor status 5f0c...")
    p.add_argument("id")

    p = command("wait", cmd_wait, "wait for a job to finish, showing its status as it changes",
                "  levqor wait 5f0c... --wait-timeout 60")
    p.add_argument("id")
    p.add_argument("--wait-timeout", dest="timeout", type=float, default=300,
                   help="seconds to wait (default 300); exit 4 if still running")

    p = command("jobs", cmd_jobs, "list your jobs, newest first",
                "  levqor jobs --status failed --limit 10\n  levqor jobs --workflow echo --json | jq .")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    p.add_argument("--workflow")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command("cancel", cmd_cancel, "cancel jobs", "  levqor cancel 5f0c... 9a1b...")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = command("retry", cmd_retry, "queue failed or canceled jobs again", "  levqor retry 5f0c...")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command("usage", cmd_usage, "spend and job counts per day, workflow or key",
                "  levqor usage\n  levqor usage --from 2026-11-01 --to 2026-11-30 --group-by workflow")
    p.add_argument("--from", dest="start", metavar="YYYY-MM-DD")
    p.add_argument("--to", dest="end", metavar="YYYY-MM-DD")
    p.add_argument("--group-by", choices=["day", "workflow", "key"])
    p.add_argument("--json", action="store_true", help="the answer as JSON")

    p = command("keys", cmd_keys, "manage API keys (admin key needed)",
                "  levqor keys create acme --role client --daily-budget 5\n"
                "  levqor keys create scraper --role worker --workflow 'scrape.*'\n"
                "  levqor keys list\n  levqor keys revoke <id>")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = keys.add_parser("create", help="make a key; its secret is printed once")
    k.add_argument("name")
    k.add_argument("--role", choices=["client", "worker"], default="client")
    k.add_argument("--daily-budget", type=float)
    k.add_argument("--rate-per-minute", type=int)
    k.add_argument("--workflow", action="append", help="a worker key's workflow (repeat)")
    k = keys.add_parser("list", help="every key, without secrets")
    k.add_argument("--json", action="store_true", help="one JSON object per line")
    k = keys.add_parser("revoke", help="revoke a key")
    k.add_argument("id")

    p = command("worker", cmd_worker, "run external workflows from a module's registry",
                "  levqor worker my_workers:REGISTRY --concurrency 4\n"
                "  # my_workers.py: REGISTRY = {\"report.build\": build}, build(payload, ctx)")
    p.add_argument("registry", metavar="MODULE:NAME",
                   help="a dict of workflow name -> fn(payload, ctx) in an importable module")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--lease", type=int, default=60, help="lease seconds (1..3600)")
    p.add_argument("--max-jobs", type=int, help="stop after this many jobs")
    p.add_argument("--idle-exit", type=float, help="stop after this long with nothing to do")
    p.add_argument("--grace", type=float, default=30,
                   help="seconds to finish jobs in hand on SIGTERM/SIGINT (default 30)")
    p.add_argument("--claim-wait", type=float, default=20,
                   help="seconds an idle worker's claim waits at the server for a job "
                        "(0 to 30, default 20; 0 polls)")

    command("health", cmd_health, "check that the service answers", "  levqor health")
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; its exit code."""
    args = _parser().parse_args(argv)
    try:
        client = Client(args.url, args.api_key, args.http_timeout)
    except ValueError as exc:
        print(f"levqor: {exc}", file=sys.stderr)
        return USAGE
    try:
        return args.fn(client, args)
    except LevqorError as exc:
        print(f"levqor: {exc}", file=sys.stderr)
        return SERVER_ERROR
    except KeyboardInterrupt:
        return 130
