#!/usr/bin/env python3
"""Job throughput: Levqor beside RQ and Celery on Redis, on a job that does nothing.

    pip install -r bench/requirements-bench.txt   # rq, celery[redis], redis: this script's alone
    python bench/throughput.py            # full run, replaces its section of bench/RESULTS.md
    python bench/throughput.py --smoke    # a little of each, well under a minute; writes nothing

This script installs nothing: without the packages above it stops, naming
the install command. RQ and Celery use the Redis server at 127.0.0.1:6379
(LEVQOR_BENCH_REDIS_URL to change it, on loopback only), in database 13
(--redis-db): that database, and no other, is flushed before and after
every pass. Levqor runs under real gunicorn as bench/jobqueue.py starts it:
production settings, an API key, rate limits raised out of the way, jobs
in memory (one gunicorn worker) or in SQLite (one worker per core), a
database file of its own for every pass.

Each figure is the median of --rounds rounds (3); in every round each
measurement runs once per system, the systems taking turns at going first.
Every ratio is to a peer measured in the same run.

- enqueue: one client thread, one job at a time, for --seconds: Levqor's
  own Python client (levqor_client.Client.submit, over keep-alive) against
  the memory and the SQLite store; RQ ``Queue.enqueue``; Celery ``delay()``
  of a task whose result is kept (the app has a result backend) and of one
  declared ``ignore_result`` (as with Celery's default of no backend).
  Jobs/s accepted; nothing runs them.
- batch enqueue: batches of 1000 for --seconds: Levqor
  ``POST /api/v1/intake/batch`` through ``Client.submit_many`` (SQLite),
  with an idempotency key per batch (the client's default) and without; RQ
  ``Queue.enqueue_many``. Jobs/s.
- external drain: --jobs jobs queued first, then 2 worker processes of each
  system, started together: Levqor's Worker (levqor_client: claims with
  max_jobs and wait, the next job claimed with each report), with its
  default of 4 slots and with 1 (one job at a time, as the peers' workers
  run them); RQ ``SimpleWorker``; Celery ``--pool=solo``. Each process gets ready, then
  waits at a gate that opens for both at once. Jobs/s from the first job's
  start to the last one's finish, by the systems' own records (Levqor's
  started_at and finished_at; RQ's started_at and ended_at; Celery's
  date_done, and the start the task itself returns).
- in-process drain: as bench/jobqueue.py does it, --jobs jobs of bench.noop
  parked in SQLite, then released at once to 2 gunicorn worker processes'
  pools (WORKER_THREADS=4 each): jobs/s, first start to last finish.
- idle latency: one worker process of each system, idle (Levqor's a
  Worker of 4 slots, its default, and of 1, as RQ's and Celery's run one
  job at a time); one job at a time, from the client sending it to the client seeing it finished:
  Levqor's client waits on the job's status (``Client.wait``: one
  ``GET /api/v1/status/<id>?wait=`` the server holds until the job ends),
  RQ blocks on the job's result stream
  (``latest_result(timeout=)``), Celery on its result (``get()``). p50 and
  p99 over every round's samples.

Sends traffic to 127.0.0.1 only.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported by name in the worker processes (PYTHONPATH=bench)
    sys.path.insert(0, HERE)

from jobqueue import LEVQOR_ENV, database_now, measure_drain, percentile, set_noop_jobs_due  # noqa: E402
from run import KEY, ROOT, exit_on_sigterm, launch, machine, publish, stop, wait_ready  # noqa: E402

CLIENT_DIR = os.path.join(ROOT, "clients", "python")
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)

from levqor_client import Client, LevqorError, NotFound, Worker  # noqa: E402

HEADING = "## Job throughput against RQ and Celery"
CORES = os.cpu_count() or 1
DEFAULT_REDIS = "redis://127.0.0.1:6379"
RQ_QUEUE = "levqor-bench"
RQ_NOOP = "throughput.peer_noop"         # the job RQ's workers import (PYTHONPATH=bench)
CELERY_NOOP = "levqor_bench.noop"
EXTERNAL = "bench.external"              # a workflow no Levqor process runs: for workers
BATCH = 1000
PAYLOAD = {"n": 1}
WORKERS = 2                              # worker processes per system in the external drain
SLOTS = 4                                # a Levqor Worker's concurrency: its default
POLL = 0.2                               # seconds between looks at whether a drain is done
# Worker processes wait at a gate: they say they are ready in a file, then
# start when the gate file appears (both at once).
GATE_ENV, READY_ENV = "LEVQOR_BENCH_GATE", "LEVQOR_BENCH_READY"
TARGETS = {"batch": 1.5, "enqueue": 1.0, "drain": 1.5, "inprocess": 4000.0}


# ---------------------------------------------------------------------------
# The peers: their no-op job, Redis, RQ and Celery (imported only when used)
# ---------------------------------------------------------------------------


def peer_noop(payload=None):
    """The RQ and Celery job: does nothing, and says when it started (this
    machine's clock)."""
    return {"started": time.time()}


def levqor_noop(payload, ctx):
    """The Levqor external workers' job: the same."""
    return {"started": time.time()}


def peers():
    """The peers' packages, or a clear stop naming the install command."""
    try:
        import celery
        import redis
        import rq
    except ImportError as exc:
        raise SystemExit(f"bench: {exc.name} is not installed: "
                         "pip install -r bench/requirements-bench.txt") from None
    return redis, rq, celery


def redis_url():
    """The peers' Redis URL with its database; loopback only."""
    base = os.environ.get("LEVQOR_BENCH_REDIS_URL") or DEFAULT_REDIS
    parts = urllib.parse.urlsplit(base)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"bench: Redis must be on loopback, not {parts.hostname}")
    db = os.environ.get("LEVQOR_BENCH_REDIS_DB", "13")
    return parts._replace(path=f"/{int(db)}").geturl()


def redis_conn():
    redis, _, _ = peers()
    return redis.Redis.from_url(redis_url(), socket_timeout=30, socket_connect_timeout=3)


_CELERY = {}


def celery_app():
    """The Celery app: broker and results in the bench's Redis database,
    Celery's defaults otherwise; with a gate in the worker processes."""
    if "app" not in _CELERY:
        _, _, celery = peers()
        app = celery.Celery("levqor_bench", broker=redis_url(), backend=redis_url(),
                            set_as_current=False)
        app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
        _CELERY["noop"] = app.task(name=CELERY_NOOP)(peer_noop)
        # The same job declared with no result kept, as an app without a
        # result backend (Celery's default) sends it: delay() then skips
        # subscribing to the task's result.
        _CELERY["fire"] = app.task(name=CELERY_NOOP + ".fire", ignore_result=True)(peer_noop)
        if os.environ.get(GATE_ENV):
            # The worker is up and about to consume: wait here for the gate.
            from celery import signals
            signals.worker_ready.connect(lambda **_: pass_gate(), weak=False)
        _CELERY["app"] = app
    return _CELERY["app"]


def celery_noop(results=True):
    celery_app()
    return _CELERY["noop" if results else "fire"]


def __getattr__(name):
    # `celery -A throughput worker` looks for the module's `app`: made on demand,
    # so that importing this script needs no Celery.
    if name == "app":
        return celery_app()
    raise AttributeError(name)


def flush(conn):
    """Empty the bench's Redis database (that one only)."""
    conn.flushdb()


def versions():
    redis, rq, celery = peers()
    server = redis_conn().info("server")["redis_version"]
    return {"rq": rq.__version__, "celery": celery.__version__, "redis-py": redis.__version__,
            "Redis": server}


# ---------------------------------------------------------------------------
# Worker processes and their gate
# ---------------------------------------------------------------------------


def pass_gate(limit=120.0):
    """In a worker process: say it is ready, then wait for the gate."""
    gate, ready = os.environ.get(GATE_ENV), os.environ.get(READY_ENV)
    if not gate:
        return
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise SystemExit("bench worker: the gate never opened")
        time.sleep(0.001)


def worker_main(args):
    """A worker process of this script's own (Levqor's or RQ's)."""
    logging.basicConfig(level=logging.WARNING)
    if args.worker == "levqor":
        client = Client(args.url, KEY, timeout=10)
        worker = Worker(client, {args.workflow: levqor_noop}, concurrency=args.concurrency,
                        claim_wait=args.claim_wait)
        pass_gate()
        worker.run()  # until SIGTERM
        return
    redis, rq, _ = peers()
    conn = redis_conn()
    worker = rq.SimpleWorker([rq.Queue(RQ_QUEUE, connection=conn)], connection=conn)
    pass_gate()
    worker.work(burst=args.burst, logging_level="WARNING")


class Workers:
    """Worker processes of one system, started at once behind a gate."""

    def __init__(self, workdir, tag, commands, env=None):
        self.gate = os.path.join(workdir, f"{tag}.gate")
        self.ready = [os.path.join(workdir, f"{tag}.{i}.ready") for i in range(len(commands))]
        self.logs = [os.path.join(workdir, f"{tag}.{i}.log") for i in range(len(commands))]
        self.procs = []
        for command, ready, log in zip(commands, self.ready, self.logs):
            full = {**os.environ, **(env or {}), GATE_ENV: self.gate, READY_ENV: ready,
                    "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(command, cwd=ROOT, env=full, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def open(self, limit=60.0):
        """Wait until every process is ready, then let them all go."""
        deadline = time.monotonic() + limit
        while not all(os.path.exists(r) for r in self.ready):
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise SystemExit(f"bench: a worker exited before it was ready; see {log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: workers not ready within {limit} s; see {self.logs}")
            time.sleep(0.01)
        with open(self.gate, "w"):
            pass

    def wait(self, limit):
        """Wait for every process to exit by itself (RQ's burst mode)."""
        deadline = time.monotonic() + limit
        for proc, log in zip(self.procs, self.logs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SystemExit(f"bench: a worker did not finish within {limit} s; see {log}")

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def levqor_worker_cmd(url, workflow, args, slots=SLOTS):
    return [sys.executable, os.path.join(HERE, "throughput.py"), "--worker", "levqor", "--url", url,
            "--workflow", workflow, "--concurrency", str(slots), "--claim-wait", str(args.claim_wait)]


def rq_worker_cmd(burst):
    return [sys.executable, os.path.join(HERE, "throughput.py"), "--worker", "rq"] + (
        ["--burst"] if burst else [])


def celery_worker_cmd(i):
    return [sys.executable, "-m", "celery", "-A", "throughput", "worker", "--pool=solo",
            "--concurrency=1", f"--hostname=bench{i}-{os.getpid()}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"]


# ---------------------------------------------------------------------------
# Levqor hosts
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def levqor_host(store, workdir, tag, workers=None, patience=15.0, **extra):
    """A gunicorn master serving Levqor for one pass: (url, env).

    At the end it is stopped gracefully (SIGTERM), and killed, its workers
    too, if it has not stopped within ``patience`` seconds. A host that
    served external workers is given little: a claim still waiting at the
    server holds up a graceful stop until its wait ends, even after its
    worker has hung up, and once the pass has its figures nothing is lost
    by a kill. (gunicorn's quick shutdown, SIGINT, is no way out: it left a
    worker with a waiting claim behind now and then, alive for good.)"""
    env = dict(LEVQOR_ENV, MAX_JOBS="10000000", JOB_STORE=store,
               SQLITE_PATH=os.path.join(workdir, f"{tag}.db"), **extra)
    if workers is None:
        workers = 1 if store == "memory" else CORES
    proc, url, log = launch("levqor:app", env, workdir, tag, workers)
    try:
        wait_ready(proc, url, log)
        yield url, env
    finally:
        stop([proc], patience)


class Features:
    """What the server under test offers, found out by asking it once."""
    batch = None   # POST /api/v1/intake/batch
    blocking = None  # claims with max_jobs and wait

    @classmethod
    def probe(cls, url):
        client = Client(url, KEY)
        try:
            client.submit_many([{"workflow": "bench.probe", "payload": {}}])
            cls.batch = True
        except NotFound:
            cls.batch = False
        try:
            answer = client.request("POST", "/api/v1/jobs/claim",
                                    {"workflows": ["bench.probe"], "max_jobs": 1, "wait": 0})
            cls.blocking = isinstance(answer, dict) and "jobs" in answer
        except LevqorError:
            cls.blocking = False
        client.close()


def submit_all(client, workflow, n):
    """Queue ``n`` jobs of ``workflow``: in batches where the server has them."""
    spec = {"workflow": workflow, "payload": PAYLOAD, "max_cost": 0}
    if Features.batch:
        for start in range(0, n, BATCH):
            client.submit_many([spec] * min(BATCH, n - start))
    else:
        for _ in range(n):
            client.submit(**spec)


def jobs_of(client, workflow, n):
    """The status views of ``workflow``'s jobs (every page)."""
    return list(client.jobs(workflow=workflow, limit=n + 1, page_size=100))


def wait_drained(client, limit):
    deadline = time.monotonic() + limit
    while True:
        # Seldom: with SQLite each look costs the server a few ms of counting.
        time.sleep(POLL)
        counts = client.request("GET", "/api/v1/ops/health")["jobs"]
        if counts["queued"] == 0 and counts["running"] == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"drain: not done within {limit} s: {counts}")


def rate(n, first, last):
    if last <= first:
        raise SystemExit(f"drain: {n} jobs between {first} and {last}: no time passed")
    return n / (last - first)


def timestamp(value):
    """A datetime (or ISO text) as Unix seconds; naive ones are UTC."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


# ---------------------------------------------------------------------------
# The measurements: each runs one pass of one system and returns its figure
# ---------------------------------------------------------------------------


def timed(seconds, step, limit=10_000_000):
    """Call ``step()`` (which returns how many jobs it made) until
    ``seconds`` pass: jobs/s."""
    done, start = 0, time.perf_counter()
    for _ in range(limit):
        done += step()
        if time.perf_counter() - start >= seconds:
            break
    return done / (time.perf_counter() - start)


def enqueue_levqor(store, ctx):
    with levqor_host(store, ctx.workdir, ctx.tag) as (url, _):
        client = Client(url, KEY)
        for _ in range(20):  # the connection open, the first requests' imports done
            client.submit(EXTERNAL, PAYLOAD, max_cost=0)
        figure = timed(ctx.args.seconds, lambda: client.submit(EXTERNAL, PAYLOAD, max_cost=0) and 1)
        client.close()
        return figure


def enqueue_rq(ctx):
    _, rq, _ = peers()
    queue = rq.Queue(RQ_QUEUE, connection=ctx.redis)
    for _ in range(20):
        queue.enqueue(RQ_NOOP, PAYLOAD)
    return timed(ctx.args.seconds, lambda: queue.enqueue(RQ_NOOP, PAYLOAD) and 1)


def enqueue_celery(ctx, results=True):
    task = celery_noop(results)
    for _ in range(20):
        task.delay(PAYLOAD)
    return timed(ctx.args.seconds, lambda: task.delay(PAYLOAD) and 1)


def batch_levqor(ctx, idempotent=True):
    with levqor_host("sqlite", ctx.workdir, ctx.tag) as (url, _):
        client = Client(url, KEY)
        specs = [{"workflow": EXTERNAL, "payload": PAYLOAD, "max_cost": 0}] * BATCH
        if not Features.batch:  # the server has none: single intakes, so the run goes on
            return timed(ctx.args.seconds, lambda: client.submit(**specs[0]) and 1)
        client.submit_many(specs[:10], idempotent=idempotent)
        figure = timed(ctx.args.seconds,
                       lambda: len(client.submit_many(specs, idempotent=idempotent)))
        client.close()
        return figure


def batch_rq(ctx):
    _, rq, _ = peers()
    queue = rq.Queue(RQ_QUEUE, connection=ctx.redis)
    queue.enqueue_many([rq.Queue.prepare_data(RQ_NOOP, (PAYLOAD,)) for _ in range(10)])

    def step():
        return len(queue.enqueue_many([rq.Queue.prepare_data(RQ_NOOP, (PAYLOAD,))
                                       for _ in range(BATCH)]))
    return timed(ctx.args.seconds, step)


def drain_levqor(store, ctx, slots=SLOTS):
    n, workflow = ctx.args.jobs, "bench.drain"
    with levqor_host(store, ctx.workdir, ctx.tag, patience=2) as (url, _):
        client = Client(url, KEY)
        submit_all(client, workflow, n)
        workers = Workers(ctx.workdir, ctx.tag, [levqor_worker_cmd(url, workflow, ctx.args, slots)
                                                 for _ in range(WORKERS)])
        try:
            workers.open()
            wait_drained(client, ctx.limit)
        finally:
            workers.stop()
        jobs = [j for j in jobs_of(client, workflow, n) if j.status == "succeeded"]
        client.close()
    if len(jobs) != n:
        raise SystemExit(f"drain: {len(jobs)} of {n} Levqor jobs succeeded")
    return rate(n, min(j.started_at for j in jobs), max(j.finished_at for j in jobs))


def drain_rq(ctx):
    _, rq, _ = peers()
    n = ctx.args.jobs
    queue = rq.Queue(RQ_QUEUE, connection=ctx.redis)
    ids = []
    for start in range(0, n, BATCH):
        ids += [job.id for job in queue.enqueue_many(
            [rq.Queue.prepare_data(RQ_NOOP, (PAYLOAD,)) for _ in range(min(BATCH, n - start))])]
    workers = Workers(ctx.workdir, ctx.tag, [rq_worker_cmd(burst=True) for _ in range(WORKERS)])
    try:
        workers.open()
        workers.wait(ctx.limit)  # burst mode: each exits when the queue is empty
    finally:
        workers.stop()
    jobs = [j for j in rq.job.Job.fetch_many(ids, connection=ctx.redis)
            if j is not None and j.get_status(refresh=False) == "finished"]
    if len(jobs) != n:
        raise SystemExit(f"drain: {len(jobs)} of {n} RQ jobs finished")
    return rate(n, min(timestamp(j.started_at) for j in jobs),
                max(timestamp(j.ended_at) for j in jobs))


def celery_results(conn, ids):
    """The result records of ``ids`` that exist (Celery's Redis backend keys)."""
    found = []
    for start in range(0, len(ids), 1000):
        raw = conn.mget([f"celery-task-meta-{i}" for i in ids[start:start + 1000]])
        found += [json.loads(r) for r in raw if r is not None]
    return found


def drain_celery(ctx):
    n = ctx.args.jobs
    task = celery_noop()
    ids = [task.delay(PAYLOAD).id for _ in range(n)]
    workers = Workers(ctx.workdir, ctx.tag, [celery_worker_cmd(i) for i in range(WORKERS)])
    try:
        workers.open()
        deadline = time.monotonic() + ctx.limit
        while True:
            # The queue's length is one cheap look; the results are read
            # only once it is empty, so as not to load Redis meanwhile.
            time.sleep(POLL)
            if ctx.redis.llen("celery") == 0 and len(celery_results(ctx.redis, ids)) == n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"drain: Celery not done within {ctx.limit} s")
    finally:
        workers.stop()
    results = [r for r in celery_results(ctx.redis, ids) if r["status"] == "SUCCESS"]
    if len(results) != n:
        raise SystemExit(f"drain: {len(results)} of {n} Celery tasks succeeded")
    return rate(n, min(r["result"]["started"] for r in results),
                max(timestamp(r["date_done"]) for r in results))


def drain_inprocess(ctx):
    """bench/jobqueue.py's drain: parked bench.noop jobs released at once
    to two gunicorn workers' pools (SQLite)."""
    n = ctx.args.jobs
    with levqor_host("sqlite", ctx.workdir, ctx.tag, WORKER_THREADS="0") as (url, env):
        client = Client(url, KEY)
        submit_all(client, "bench.noop", n)
        client.close()
    set_noop_jobs_due(env, database_now(env) + 86_400)  # parked until released
    with levqor_host("sqlite", ctx.workdir, ctx.tag, workers=2) as (url, env):
        time.sleep(ctx.args.settle)  # every worker process up, and idle
        return measure_drain(env, [url], n, limit=ctx.limit)


def idle_gap():
    """Between two samples: every worker back to waiting."""
    time.sleep(random.uniform(0.02, 0.05))


def latency_levqor(store, ctx, slots=SLOTS):
    samples, workflow = [], "bench.latency"
    with levqor_host(store, ctx.workdir, ctx.tag, patience=2) as (url, _):
        workers = Workers(ctx.workdir, ctx.tag, [levqor_worker_cmd(url, workflow, ctx.args, slots)])
        client = Client(url, KEY)
        try:
            workers.open()
            time.sleep(ctx.args.settle)  # the worker's first claim is in, waiting
            for _ in range(ctx.args.samples):
                sent = time.perf_counter()
                job_id = client.submit(workflow, PAYLOAD, max_cost=0).job_id
                try:
                    job = client.wait(job_id, timeout=10)
                except TimeoutError as exc:
                    raise SystemExit(f"latency: {exc}")
                samples.append((time.perf_counter() - sent) * 1000)
                if not job.ok:
                    raise SystemExit(f"latency: Levqor job {job_id} {job.status}: {job.error}")
                idle_gap()
        finally:
            client.close()
            workers.stop()
    return samples


def latency_rq(ctx):
    _, rq, _ = peers()
    queue, samples = rq.Queue(RQ_QUEUE, connection=ctx.redis), []
    workers = Workers(ctx.workdir, ctx.tag, [rq_worker_cmd(burst=False)])
    try:
        workers.open()
        time.sleep(ctx.args.settle)
        for _ in range(ctx.args.samples):
            sent = time.perf_counter()
            job = queue.enqueue(RQ_NOOP, PAYLOAD)
            result = job.latest_result(timeout=10)
            samples.append((time.perf_counter() - sent) * 1000)
            if result is None or result.type != result.Type.SUCCESSFUL:
                raise SystemExit(f"latency: RQ job {job.id}: {result}")
            idle_gap()
    finally:
        workers.stop()
    return samples


def latency_celery(ctx):
    task, samples = celery_noop(), []
    workers = Workers(ctx.workdir, ctx.tag, [celery_worker_cmd(0)])
    try:
        workers.open()
        time.sleep(ctx.args.settle)
        for _ in range(ctx.args.samples):
            sent = time.perf_counter()
            task.delay(PAYLOAD).get(timeout=10)
            samples.append((time.perf_counter() - sent) * 1000)
            idle_gap()
    finally:
        workers.stop()
    return samples


# (section, [(system, function(ctx)), ...]). Levqor's entries first; the
# order they run in turns each round.
SECTIONS = [
    ("enqueue", [("Levqor, memory", lambda ctx: enqueue_levqor("memory", ctx)),
                 ("Levqor, SQLite", lambda ctx: enqueue_levqor("sqlite", ctx)),
                 ("RQ", enqueue_rq), ("Celery", enqueue_celery),
                 ("Celery, no result", lambda ctx: enqueue_celery(ctx, results=False))]),
    ("batch", [("Levqor, SQLite", batch_levqor),
               ("Levqor, SQLite, no keys", lambda ctx: batch_levqor(ctx, idempotent=False)),
               ("RQ", batch_rq)]),
    ("drain", [("Levqor, memory", lambda ctx: drain_levqor("memory", ctx)),
               ("Levqor, SQLite", lambda ctx: drain_levqor("sqlite", ctx)),
               ("Levqor, memory, 1 slot", lambda ctx: drain_levqor("memory", ctx, 1)),
               ("Levqor, SQLite, 1 slot", lambda ctx: drain_levqor("sqlite", ctx, 1)),
               ("RQ", drain_rq), ("Celery", drain_celery)]),
    ("inprocess", [("Levqor, SQLite", drain_inprocess)]),
    ("latency", [("Levqor, memory", lambda ctx: latency_levqor("memory", ctx)),
                 ("Levqor, SQLite", lambda ctx: latency_levqor("sqlite", ctx)),
                 ("Levqor, memory, 1 slot", lambda ctx: latency_levqor("memory", ctx, 1)),
                 ("Levqor, SQLite, 1 slot", lambda ctx: latency_levqor("sqlite", ctx, 1)),
                 ("RQ", latency_rq), ("Celery", latency_celery)]),
]


class Pass:
    """What one measurement needs: the run's options, a work folder, a tag
    for its files, and the peers' Redis connection."""

    def __init__(self, args, workdir, tag, redis):
        self.args, self.workdir, self.tag, self.redis = args, workdir, tag, redis
        self.limit = 60 + args.jobs / 50  # seconds any drain may take


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def report(results, args, load, info, peer_versions):
    def med(section, system):
        values = results.get((section, system))
        return statistics.median(values) if values else None

    def lat(system, p):
        return percentile([x for one in results[("latency", system)] for x in one], p)

    def spread(section, system):
        values = results.get((section, system)) or []
        return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else ""

    def per_round(section, system, peer):
        """The ratio in each round, Levqor's figure to the peer's of that round."""
        ours, theirs = results[(section, system)], results[(section, peer)]
        if section == "latency":
            ours, theirs = [percentile(v, 50) for v in ours], [percentile(v, 50) for v in theirs]
        return ", ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))

    def celery_name(section):
        if section != "enqueue":
            return "Celery"
        return max(("Celery", "Celery, no result"), key=lambda name: med(section, name))

    def celery(section):
        """Celery's figure to compare with: in the enqueue, the faster of
        delay() with and without a result kept."""
        return med(section, celery_name(section))

    def ratio(a, b):
        return f"{a / b:.2f}×" if a and b else "—"

    used = ("the batch intake" if Features.batch else
            "no batch intake on this server (single intakes measured in its place)")
    used += ("; claims with max_jobs, wait and claim_next" if Features.blocking else
             "; no blocking or batched claims on this server (the Worker polled)")
    lines = [
        f"{HEADING} (`bench/throughput.py`)",
        "",
        f"- date: {info['date']}; commit: {info['commit']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}; Python {info['python']}; "
        f"gunicorn {info['gunicorn']}; " + ", ".join(f"{k} {v}" for k, v in peer_versions.items()),
        f"- everything shares the machine's cores (the servers, Redis, the worker processes and "
        f"the client); load average {load:.2f} when the run began"
        + (f"; {args.note}" if args.note else ""),
        f"- Levqor: production settings, rate limits raised out of the way, 4 threads per "
        f"gunicorn worker, WORKER_THREADS=4; memory: 1 gunicorn worker, SQLite: {CORES}; the "
        f"server had {used}. Levqor's client gives every intake, and every batch, an idempotency "
        "key (its default: a retry never makes two jobs), which the server keeps; RQ and Celery "
        "have none",
        "- RQ and Celery: Redis on the same machine (it keeps nothing on disk), their defaults "
        "otherwise; Celery's app has a Redis result backend, which the drain and the latency "
        "read",
        f"- {args.rounds} rounds, the systems taking turns at going first; jobs/s are the medians "
        "of the rounds' figures (beside them, the lowest and highest round); ratios are "
        "Levqor's median to the peer's, in this run",
        "",
        "| measurement | system | jobs/s | rounds | ÷ RQ | ÷ Celery |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("enqueue, 1 client thread", "enqueue",
         [("Levqor, memory", "Levqor, memory: `Client.submit`"),
          ("Levqor, SQLite", "Levqor, SQLite: `Client.submit`"),
          ("RQ", "RQ `Queue.enqueue`"),
          ("Celery", "Celery `delay()`, result kept"),
          ("Celery, no result", "Celery `delay()`, no result (`ignore_result`)")]),
        (f"batch enqueue, {BATCH} a call", "batch",
         [("Levqor, SQLite", "Levqor, SQLite: `Client.submit_many`"),
          ("Levqor, SQLite, no keys", "Levqor, SQLite: `submit_many(idempotent=False)`"),
          ("RQ", "RQ `enqueue_many`")]),
        (f"drain, {WORKERS} external worker processes, {args.jobs} jobs", "drain",
         [("Levqor, memory", f"Levqor, memory: `Worker` ×{WORKERS}, {SLOTS} slots each (its default)"),
          ("Levqor, SQLite", f"Levqor, SQLite: `Worker` ×{WORKERS}, {SLOTS} slots each"),
          ("Levqor, memory, 1 slot", f"Levqor, memory: `Worker` ×{WORKERS}, 1 slot each"),
          ("Levqor, SQLite, 1 slot", f"Levqor, SQLite: `Worker` ×{WORKERS}, 1 slot each"),
          ("RQ", f"RQ `SimpleWorker` ×{WORKERS}"), ("Celery", f"Celery `--pool=solo` ×{WORKERS}")]),
        (f"drain in-process, {args.jobs} jobs", "inprocess",
         [("Levqor, SQLite", "Levqor, SQLite: the pools of 2 gunicorn workers")]),
    ]
    for title, section, systems in rows:
        for i, (system, label) in enumerate(systems):
            value = med(section, system)
            if value is None:
                continue
            is_peer = not system.startswith("Levqor")
            lines.append(f"| {title if i == 0 else ''} | {label} | {value:,.0f} | "
                         f"{spread(section, system)} | "
                         f"{'' if is_peer else ratio(value, med(section, 'RQ'))} | "
                         f"{'' if is_peer else ratio(value, celery(section))} |")
    lines += [
        "",
        "In the enqueue, ÷ Celery is to the faster of Celery's two rows. In the drain, every "
        "system has the same number of worker processes; RQ's and Celery's run one job at a "
        "time, a Levqor `Worker` as many as its slots.",
        "",
        f"Idle latency, from sending a job to seeing it finished, one job at a time, "
        f"{args.samples} samples a round, one worker process each, idle between jobs (Levqor's "
        "client waits on the job's status, `GET /api/v1/status/<id>?wait=`, which the server holds "
        "until the job ends; RQ and Celery block on the result):",
        "",
        "| system | p50 ms | p99 ms | p50 ÷ RQ's | p50 ÷ Celery's |",
        "|---|---:|---:|---:|---:|",
    ]
    for system, label in (("Levqor, memory", f"Levqor, memory: `Worker` of {SLOTS} slots, waiting claim"),
                          ("Levqor, SQLite", f"Levqor, SQLite: `Worker` of {SLOTS} slots, waiting claim"),
                          ("Levqor, memory, 1 slot", "Levqor, memory: `Worker` of 1 slot, waiting claim"),
                          ("Levqor, SQLite, 1 slot", "Levqor, SQLite: `Worker` of 1 slot, waiting claim"),
                          ("RQ", "RQ `SimpleWorker`"), ("Celery", "Celery `--pool=solo`")):
        p50 = lat(system, 50)
        is_peer = not system.startswith("Levqor")
        lines.append(f"| {label} | {p50:.1f} | {lat(system, 99):.1f} | "
                     f"{'' if is_peer else ratio(p50, lat('RQ', 50))} | "
                     f"{'' if is_peer else ratio(p50, lat('Celery', 50))} |")

    targets = []  # (target, this run's figure, each round's, met)
    value, peer = med("batch", "Levqor, SQLite"), med("batch", "RQ")
    targets.append(("batch enqueue, SQLite ≥ 1.5× RQ `enqueue_many`", f"{value / peer:.2f}×",
                    per_round("batch", "Levqor, SQLite", "RQ"), value / peer >= TARGETS["batch"]))
    for store in ("memory", "SQLite"):
        value, peer = med("enqueue", f"Levqor, {store}"), celery("enqueue")
        targets.append((f"single enqueue, {store} ≥ 1.0× Celery `delay()` (its faster row)",
                        f"{value / peer:.2f}×",
                        per_round("enqueue", f"Levqor, {store}", celery_name("enqueue")),
                        value / peer >= TARGETS["enqueue"]))
    for store in ("memory", "SQLite"):
        for system, slots in ((f"Levqor, {store}", f"{SLOTS} slots"),
                              (f"Levqor, {store}, 1 slot", "1 slot")):
            value, peer = med("drain", system), med("drain", "Celery")
            targets.append((f"external drain, {store}, `Worker` of {slots} ≥ 1.5× Celery solo",
                            f"{value / peer:.2f}×", per_round("drain", system, "Celery"),
                            value / peer >= TARGETS["drain"]))
    values = results[("inprocess", "Levqor, SQLite")]
    value = med("inprocess", "Levqor, SQLite")
    targets.append(("in-process drain, SQLite, 2 processes ≥ 4,000 jobs/s (2× today's)",
                    f"{value:,.0f} jobs/s", ", ".join(f"{v:,.0f}" for v in values),
                    value >= TARGETS["inprocess"]))
    for store in ("memory", "SQLite"):
        for system, slots in ((f"Levqor, {store}", f"{SLOTS} slots"),
                              (f"Levqor, {store}, 1 slot", "1 slot")):
            p50 = lat(system, 50)
            targets.append((f"idle external waiting-claim p50, {store}, `Worker` of {slots} "
                            "≤ RQ's and Celery's",
                            f"{p50:.1f} ms (RQ {lat('RQ', 50):.1f}, Celery {lat('Celery', 50):.1f})",
                            "÷ RQ's " + per_round("latency", system, "RQ") + "; ÷ Celery's "
                            + per_round("latency", system, "Celery"),
                            p50 <= min(lat("RQ", 50), lat("Celery", 50))))
    lines += ["", "Targets of issue 19 (each round: the same ratio within that round):", "",
              "| target | this run | each round | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {name} | {figure} | {rounds} | {'✅' if ok else '❌'} |"
              for name, figure, rounds, ok in targets]
    lines += ["", f"Met: {sum(ok for *_, ok in targets)} of {len(targets)}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3, help="of each enqueue pass")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per drain pass")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per pass")
    parser.add_argument("--claim-wait", type=float, default=20,
                        help="seconds a Levqor worker's claim waits at the server")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds for workers to become idle before a latency or drain pass")
    parser.add_argument("--redis-db", type=int, help="the Redis database to use (and flush): 13")
    parser.add_argument("--only", help="comma-separated sections to run: "
                        + ", ".join(name for name, _ in SECTIONS))
    parser.add_argument("--smoke", action="store_true",
                        help="one short round of each, well under a minute; write nothing")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--note", help="a line on the machine for the report (shared? noisy?)")
    # The worker processes this script starts run this same file:
    parser.add_argument("--worker", choices=["levqor", "rq"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workflow", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--burst", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.redis_db is not None:
        os.environ["LEVQOR_BENCH_REDIS_DB"] = str(args.redis_db)
    if args.worker:
        return worker_main(args)
    if args.smoke:
        args.rounds, args.seconds, args.jobs, args.samples, args.settle = 1, 0.3, 200, 5, 0.3
    sections = SECTIONS
    if args.only:
        wanted = set(args.only.split(","))
        sections = [s for s in SECTIONS if s[0] in wanted]
        if not sections:
            raise SystemExit(f"--only: none of {args.only}")
    peer_versions = versions_or_stop()
    exit_on_sigterm()
    load = os.getloadavg()[0]  # before this run adds its own
    conn = redis_conn()
    workdir = tempfile.mkdtemp(prefix="levqor-throughput-")
    results = {}
    try:
        with levqor_host("sqlite", workdir, "probe") as (url, _):
            Features.probe(url)
        print(f"bench: batch intake {'on' if Features.batch else 'absent'}; blocking claims "
              f"{'on' if Features.blocking else 'absent'}", flush=True)
        for round_no in range(args.rounds):
            for section, systems in sections:
                shift = round_no % len(systems)
                for system, fn in systems[shift:] + systems[:shift]:
                    tag = f"r{round_no}-{section}-{system.replace(', ', '-').replace(' ', '')}"
                    flush(conn)
                    try:
                        value = fn(Pass(args, workdir, tag, conn))
                    finally:
                        flush(conn)
                    key = (section, system)
                    if section == "latency":
                        results.setdefault(key, []).append(value)  # the round's samples
                        shown = (f"p50 {percentile(value, 50):.1f} ms  "
                                 f"p99 {percentile(value, 99):.1f} ms")
                    else:
                        results.setdefault(key, []).append(value)
                        shown = f"{value:9,.0f} jobs/s"
                    print(f"round {round_no + 1}/{args.rounds} {section:9} {system:23} {shown}",
                          flush=True)
    finally:
        with contextlib.suppress(Exception):
            flush(conn)
    if args.only:
        shutil.rmtree(workdir, ignore_errors=True)
        return None
    publish(args, HEADING, report(results, args, load, machine(), peer_versions))
    shutil.rmtree(workdir, ignore_errors=True)
    return None


def versions_or_stop():
    """The peers' versions; stops, saying why, without the packages or Redis."""
    redis, _, _ = peers()
    try:
        return versions()
    except redis.RedisError as exc:
        raise SystemExit(f"bench: Redis at {redis_url()} does not answer: {exc}") from None


if __name__ == "__main__":
    main()
