"""Prometheus metrics: the counters and histograms this host keeps, the
figures read from the stores, and ``GET /metrics`` in the text exposition
format 0.0.4.

Two kinds of number, kept two ways, so that whichever gunicorn worker
answers a scrape, two scrapes in a row never go backwards:

- **Events** (requests, their durations, jobs enqueued and finished, run and
  queue-wait times, callback deliveries) are counted in one table in shared
  memory, made by gunicorn's master before it forks (``prepare_shared``, as
  ``ratelimit`` does for its buckets), so every worker adds to the same
  numbers and reads them all. Not the database: a write per request would
  put a round trip on every request's path, and a counter is per host in
  Prometheus anyway (each host is a target; ``sum`` across them). Not
  prometheus_client's multiprocess mode: it needs a directory of files per
  process, cleaned up by hand, and the package as a runtime dependency. The
  counters start again at zero when the host restarts, which ``rate()``
  expects of any counter.
- **State** (jobs by status and workflow, money spent, budget left, the
  oldest queued job) is read from the stores at each scrape, so every worker
  and every host of a shared database says the same.

No label takes unbounded values: routes are route templates (``unmatched``
for paths no route has), methods the HTTP ones (else ``other``), statuses
three digits, callback outcomes three words. Workflow names come from
clients, so each host names at most ``MAX_WORKFLOWS`` of them besides its
in-process ones, first come first named, and counts the rest as ``_other``.
"""

import bisect
import collections
import hmac
import math
import mmap
import multiprocessing
import struct
import threading
import time

import costs
from web import VERSION, HTTPError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_WORKFLOWS = 50
OTHER = "_other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# Every family this host counts: name -> (type, help, label names, buckets).
FAMILIES = {
    "levqor_http_requests_total": ("counter", "HTTP requests answered, by route template.",
                                   ("route", "method", "status"), None),
    "levqor_http_request_duration_seconds": ("histogram", "Time to answer a request, by route template.",
                                             ("route",), HTTP_BUCKETS),
    "levqor_jobs_enqueued_total": ("counter", "Jobs accepted at intake.", ("workflow",), None),
    "levqor_jobs_finished_total": ("counter", "Jobs that reached a final status.",
                                   ("workflow", "status"), None),
    "levqor_job_run_seconds": ("histogram", "Run time of each finished job's last attempt.",
                               ("workflow",), JOB_BUCKETS),
    "levqor_job_queue_wait_seconds": ("histogram", "Time a finished job's last attempt waited in "
                                      "the queue before it started.", ("workflow",), JOB_BUCKETS),
    "levqor_callback_deliveries_total": ("counter", "Callback delivery attempts by outcome "
                                         "(delivered, http_error, unreachable).", ("outcome",), None),
}

# ---------------------------------------------------------------------------
# The table: series in shared memory
# ---------------------------------------------------------------------------

# A slot: 64-bit hash of the series (0: empty), its value, and the series
# itself (family, label values, part) as text, so that any process can list
# every series without knowing who made it. Slots are never freed: the
# labels are bounded, so the series are too.
SLOT = struct.Struct("<Qd240s")
VALUE = struct.Struct("<d")  # PERF: a slot's value alone, at offset 8: no 240-byte unpack per add
SIZE = 8192  # slots: 2 MiB, several times what the bounded labels can fill
LOCK_TIMEOUT = 1.0  # as in ratelimit: a holder this slow died holding it
_SEP, _PART = "\x1f", "\x1e"


def _hash(text):
    # Python's hash() differs between processes; FNV-1a does not.
    h = 0xcbf29ce484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h or 1


class Table:
    """``size`` slots and a lock. Shared: visible to processes forked after
    it is made (an anonymous MAP_SHARED map and a POSIX semaphore); private:
    this process's own."""

    def __init__(self, size=SIZE, shared=False):
        self.size = size
        if shared:
            self.mem = mmap.mmap(-1, SLOT.size * size)
            self.lock = multiprocessing.get_context("fork").Lock()
        else:
            self.mem = bytearray(SLOT.size * size)
            self.lock = threading.Lock()
        self._offsets = {}  # series -> offset, per process (slots never move)

    def _find(self, series, create):
        """The offset of ``series``' slot (under the lock), or None when
        it has none and ``create`` is false, or the table is full."""
        off = self._offsets.get(series)
        if off is not None:
            return off
        h = _hash(series)
        raw = series.encode()
        for i in range(self.size):
            off = SLOT.size * ((h + i) % self.size)
            held, _, text = SLOT.unpack_from(self.mem, off)
            if held == h and text.rstrip(b"\0") == raw:
                self._offsets[series] = off
                return off
            if held == 0:
                if not create:
                    return None
                SLOT.pack_into(self.mem, off, h, 0.0, raw)
                self._offsets[series] = off
                return off
        return None

    def _locked(self):
        # On a timeout the holder is presumed dead: carry on as the owner.
        self.lock.acquire(timeout=LOCK_TIMEOUT)

    def _unlock(self):
        try:
            self.lock.release()
        except (ValueError, RuntimeError):
            pass  # already released by a process that took it over

    def add(self, changes):
        """Add each (series, amount) as one step: a reader sees all or none."""
        mem = self.mem
        self._locked()
        try:
            for series, amount in changes:
                off = self._offsets.get(series)
                if off is None:
                    off = self._find(series, create=True)
                    if off is None:  # the table is full: the labels' bounds say it never is
                        continue
                off += 8
                VALUE.pack_into(mem, off, VALUE.unpack_from(mem, off)[0] + amount)
        finally:
            self._unlock()

    def claim(self, series, limit_series, limit):
        """Whether ``series`` exists, or could be made while the count kept
        in ``limit_series`` is under ``limit`` (and then it is made)."""
        self._locked()
        try:
            if self._find(series, create=False) is not None:
                return True
            count = self._find(limit_series, create=True)
            held, value, text = SLOT.unpack_from(self.mem, count)
            if value >= limit or self._find(series, create=True) is None:
                return False
            SLOT.pack_into(self.mem, count, held, value + 1, text)
            return True
        finally:
            self._unlock()

    def snapshot(self):
        """{series: value} of every slot, read as one step."""
        self._locked()
        try:
            found = {}
            for i in range(self.size):
                held, value, text = SLOT.unpack_from(self.mem, SLOT.size * i)
                if held:
                    found[text.rstrip(b"\0").decode()] = value
            return found
        finally:
            self._unlock()


_shared = None


def prepare_shared():
    """Make this host's table in gunicorn's master, before the workers fork."""
    global _shared
    if _shared is None:
        _shared = Table(shared=True)
    return _shared


def _series(family, labels, part=""):
    return family + _PART + _SEP.join(labels) + _PART + part


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


class Metrics:
    """This host's counters and histograms (the shared table when
    ``prepare_shared`` ran in this process or its parent, else a private
    one), and the scrape, which adds the stores' figures."""

    def __init__(self, services, table=None):
        self.services = services
        self.table = table or _shared or Table()
        self._named = set()  # workflows this process knows to have their own label
        # PERF: the series a request or a histogram's labels add to, built once
        # per label set (bounded, as the labels are).
        self._requests = {}
        self._histograms = {}

    def workflow(self, name):
        """The label for a workflow: its name while the host names fewer
        than MAX_WORKFLOWS (in-process workflows always), else ``_other``."""
        if name in self._named or self.services.engine.registry.get(name) is not None:
            return name
        if self.table.claim(_series("workflow", (name,)), _series("workflows", ()), MAX_WORKFLOWS):
            self._named.add(name)
            return name
        return OTHER

    def _observe(self, family, labels, seconds):
        """The changes one observation makes to a histogram: its bucket (the
        first whose bound holds it; counts are made cumulative when read),
        its sum and its count."""
        series = self._histograms.get((family, labels))
        if series is None:
            series = self._histograms[family, labels] = (
                FAMILIES[family][3], [_series(family, labels, str(i)) for i in range(len(FAMILIES[family][3]) + 1)],
                _series(family, labels, "sum"), _series(family, labels, "count"))
        bounds, buckets, total, count = series
        return [(buckets[bisect.bisect_left(bounds, seconds)], 1), (total, seconds), (count, 1)]

    def request(self, route, method, status, seconds):
        key = (route, method if method in METHODS else "other", status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = _series("levqor_http_requests_total", (*key[:2], str(status)))
        self.table.add([(counter, 1), *self._observe("levqor_http_request_duration_seconds", (route,), seconds)])

    def jobs_enqueued(self, jobs):
        """Count new ``jobs``: one update for a batch's each workflow."""
        by_workflow = collections.Counter(self.workflow(job["workflow"]) for job in jobs)
        self.table.add([(_series("levqor_jobs_enqueued_total", (workflow,)), n)
                        for workflow, n in by_workflow.items()])

    def on_finish(self, job):
        """An engine on_finish hook: the job's outcome, and its last attempt's
        run time and queue wait (none for a job canceled while queued)."""
        workflow = self.workflow(job["workflow"])
        changes = [(_series("levqor_jobs_finished_total", (workflow, job["status"])), 1)]
        started = job.get("started_at")
        if started is not None and job.get("finished_at") is not None:
            changes += self._observe("levqor_job_run_seconds", (workflow,),
                                     max(0.0, job["finished_at"] - started))
            queued = job.get("queued_at", job["created_at"])
            changes += self._observe("levqor_job_queue_wait_seconds", (workflow,),
                                     max(0.0, started - queued))
        self.table.add(changes)

    def counted(self, post):
        """``callbacks.post``, counting each attempt's outcome."""
        def counting_post(*args, **kwargs):
            outcome = "unreachable"
            try:
                status, retry_after = post(*args, **kwargs)
                outcome = "delivered" if 200 <= status < 300 else "http_error"
                return status, retry_after
            finally:
                self.table.add([(_series("levqor_callback_deliveries_total", (outcome,)), 1)])
        return counting_post

    # -- the exposition -------------------------------------------------------------

    def exposition(self):
        """Every family in the text format 0.0.4, as bytes."""
        lines = []

        def family(name, kind, text, samples):
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{suffix}{_labels(names, values)} {_number(v)}"
                         for suffix, names, values, v in samples)

        # Read from the stores: the same whichever worker, or host, answers.
        services = self.services
        insights = services.insights
        family("levqor_build_info", "gauge", "The running version.", [("", ("version",), (VERSION,), 1)])
        jobs = {}
        for (status, workflow), n in insights.by_status_workflow().items():
            key = (status, self.workflow(workflow))
            jobs[key] = jobs.get(key, 0) + n
        family("levqor_jobs", "gauge", "Jobs held, by status and workflow (from the job store).",
               [("", ("status", "workflow"), key, n) for key, n in sorted(jobs.items())])
        oldest = insights.oldest_queued()
        family("levqor_oldest_queued_job_age_seconds", "gauge",
               "How long the job waiting longest has waited (0: none waits).",
               [("", (), (), 0 if oldest is None else max(0.0, services.clock() - oldest))])
        family("levqor_spend_dollars_total", "counter", "Dollars spent by every job, ever (the ledger).",
               [("", (), (), costs.to_usd(insights.spent_ever()))])
        left = services.settings.max_cost_per_day - services.ledger.used_today()
        family("levqor_budget_remaining_dollars", "gauge",
               "What is left of today's MAX_COST_PER_DAY (UTC), reservations counted as used.",
               [("", (), (), costs.to_usd(max(0, left)))])

        # This host's counters, from the shared table.
        series = {}
        for text, value in self.table.snapshot().items():
            name, labels, part = text.split(_PART)
            if name in FAMILIES:
                series.setdefault(name, {}).setdefault(tuple(labels.split(_SEP)), {})[part] = value
        for name, (kind, text, label_names, buckets) in FAMILIES.items():
            samples = []
            for labels, parts in sorted(series.get(name, {}).items()):
                if buckets is None:
                    samples.append(("", label_names, labels, parts[""]))
                    continue
                cumulative = 0
                for i, bound in enumerate((*buckets, math.inf)):
                    cumulative += parts.get(str(i), 0)
                    samples.append(("_bucket", (*label_names, "le"), (*labels, _number(bound)),
                                    cumulative))
                samples.append(("_sum", label_names, labels, parts.get("sum", 0)))
                samples.append(("_count", label_names, labels, parts.get("count", 0)))
            family(name, kind, text, samples)
        return ("\n".join(lines) + "\n").encode()


def _escape(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values):
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)) + "}"


def _number(value):
    if value == math.inf:
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# ---------------------------------------------------------------------------
# HTTP: the middleware that counts, and the endpoint
# ---------------------------------------------------------------------------


class HttpMetrics:
    """Counts every answered request by its route template (the innermost
    app and the dashboard set ``levqor.route``) and times it. It sits
    outside ErrorGuard, so refusals and errors are counted with their status."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        status = []

        def capture(line, headers, exc_info=None):
            status.append(line)
            return start_response(line, headers, exc_info)

        body = self.app(environ, capture)
        self.metrics.request(environ.get("levqor.route", "unmatched"), environ["REQUEST_METHOD"],
                             int(status[-1][:3]) if status else 0, time.perf_counter() - started)
        return body


def scrape(req):
    """GET /metrics: for an admin key (X-Api-Key), or the METRICS_TOKEN as
    ``Authorization: Bearer``, compared in constant time; for anyone in open
    development mode (no API_KEYS), as every endpoint is."""
    if req.role != "admin" and req.services.keys:
        token = req.services.settings.metrics_token
        presented = req.environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = presented.partition(" ")
        if not token or scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.strip().encode("utf-8", "surrogatepass"), token.encode()):
            if req.role is None and not presented and "HTTP_X_API_KEY" not in req.environ:
                raise HTTPError(401, "unauthorized", "an admin API key (X-Api-Key) or the "
                                "METRICS_TOKEN (Authorization: Bearer) is required",
                                [("WWW-Authenticate", 'Bearer realm="metrics"')])
            raise HTTPError(403, "forbidden", "only an admin key or the METRICS_TOKEN may read metrics")
    body = req.services.metrics.exposition()
    return 200, [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body))),
                 ("Cache-Control", "no-store")], body
