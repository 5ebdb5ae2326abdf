"""One conformance suite for the store contracts (contracts.py): every
behaviour of each contract, run against every backend that implements it.

Each contract has one fixture whose ``params`` are its backends; a backend is
one class below that opens its stores. Adding a backend is adding that class
and its name to the fixtures' params. Time is a FakeClock; races are real
threads, and for a backend shared between processes, two store objects of
their own on one database.
"""

import contextlib
import inspect
import threading
import time
import types

import pytest

import contracts
import engine
import jobstore
import ledger as ledger_module
import recorder as recorder_module
import storage
from costs import BudgetExceeded, utc_day
from jobstore import JOB_STATUSES, PRIORITIES, IdempotencyMismatch, QueueFull
import support
from support import FakeClock

# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


class Log:
    def __getattr__(self, level):
        return lambda msg, **fields: None


class MemoryBackend:
    """Jobs in this process's memory."""

    def __init__(self, tmp_path, clock):
        self.clock = clock

    def jobs(self, elsewhere=False, **options):
        if elsewhere:
            pytest.skip("a memory store lives in one process: nothing else can open it")
        return jobstore.MemoryJobStore(clock=self.clock, **options)


class SqliteBackend:
    """Every store in one SQLite file, shared between processes as with
    JOB_STORE=sqlite."""

    def __init__(self, tmp_path, clock):
        self.path = str(tmp_path / "stores.db")
        self.clock = clock
        self.db = self.connect()

    def connect(self):
        """A Database object of its own on the file, as another process has."""
        return storage.Database(self.path, shared=True)

    def jobs(self, elsewhere=False, **options):
        return jobstore.SqlJobStore(self.connect() if elsewhere else self.db,
                                    clock=self.clock, **options)

    def users(self):
        return storage.UserStore(self.db)

    def keys(self):
        return storage.KeyStore(self.db, clock=self.clock)

    def ledger(self):
        return ledger_module.Ledger(self.db, clock=self.clock)

    def recorder(self):
        return recorder_module.Recorder(self.db, Log(), clock=self.clock)


class PostgresBackend(SqliteBackend):
    """Every store in one PostgreSQL schema, shared between hosts as with
    DATABASE_URL: "another process" is a database object of its own, with
    its own pool of connections."""

    def __init__(self, tmp_path, clock):
        self.url = support.postgres_url()
        self.clock = clock
        self.db = self.connect()

    def connect(self):
        return support.postgres_database(self.url)


BACKENDS = {"memory": MemoryBackend, "sqlite": SqliteBackend, "postgres": PostgresBackend}
ALL = ["memory", "sqlite", "postgres"]
DATABASES = ["sqlite", "postgres"]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(params=ALL)
def job_backend(request, tmp_path, clock):
    return BACKENDS[request.param](tmp_path, clock)


@pytest.fixture(params=DATABASES)
def user_backend(request, tmp_path, clock):
    return BACKENDS[request.param](tmp_path, clock)


@pytest.fixture(params=DATABASES)
def key_backend(request, tmp_path, clock):
    return BACKENDS[request.param](tmp_path, clock)


@pytest.fixture(params=DATABASES)
def ledger_backend(request, tmp_path, clock):
    return BACKENDS[request.param](tmp_path, clock)


@pytest.fixture(params=DATABASES)
def recorder_backend(request, tmp_path, clock):
    return BACKENDS[request.param](tmp_path, clock)


@pytest.fixture
def jobs(job_backend):
    return job_backend.jobs()


@pytest.fixture
def users(user_backend):
    return user_backend.users()


@pytest.fixture
def keys(key_backend):
    return key_backend.keys()


@pytest.fixture
def ledger(ledger_backend):
    return ledger_backend.ledger()


@pytest.fixture
def recorder(recorder_backend):
    return recorder_backend.recorder()


def known_gap(request, backend, why):
    """Mark this run as failing for ``backend`` until the store is fixed:
    strict, so the fix turns it into a failure that asks for this mark to go."""
    if request.node.callspec.params.get("job_backend") == backend:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True))


def race(n, fn):
    """Run fn(i) on n threads released together; their results, in order."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    return results


# ---------------------------------------------------------------------------
# Each implementation keeps its protocol
# ---------------------------------------------------------------------------


def contract_methods(protocol):
    return {name for name, value in vars(protocol).items()
            if (callable(value) or isinstance(value, property))
            and (not name.startswith("_") or name == "__len__")}


def public_methods(cls):
    return {name for name, value in inspect.getmembers(cls)
            if (callable(value) or isinstance(value, property)) and not name.startswith("_")
            and not inspect.isclass(value)} | ({"__len__"} & set(vars(cls)))


def parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def keeps(protocol, store):
    """Whether ``store`` keeps ``protocol`` to the letter: it is an instance
    of it, its class defines every method, with the protocol's parameters,
    and offers callers nothing more."""
    cls = type(store)
    assert isinstance(store, protocol) and contract_methods(protocol) <= set(vars(cls))
    assert public_methods(cls) == contract_methods(protocol)
    for name in contract_methods(protocol):
        ours = getattr(protocol, name)
        if not isinstance(ours, property):
            assert parameters(getattr(cls, name)) == parameters(ours), name
    return True


def test_job_stores_keep_their_protocol(jobs):
    assert keeps(contracts.JobStore, jobs)


def test_user_stores_keep_their_protocol(users):
    assert keeps(contracts.UserStore, users)


def test_key_stores_keep_their_protocol(keys):
    assert keeps(contracts.KeyStore, keys)


def test_ledgers_keep_their_protocol(ledger):
    assert keeps(contracts.Ledger, ledger)


def test_audit_logs_keep_their_protocol(recorder):
    assert keeps(contracts.AuditLog, recorder)


# ---------------------------------------------------------------------------
# JobStore
# ---------------------------------------------------------------------------


def new_job(clock, workflow="w", priority="normal", key_id="k", delay=0.0, **fields):
    """A job as the engine makes it, at the clock's time."""
    maker = engine.Engine(None, engine.Registry(), Log(), clock=clock)
    job = maker.new_job(workflow, {"n": 1}, priority, None, key_id)
    job["not_before"] += delay
    return dict(job, **fields)


def add(store, clock, **kw):
    return store.add(new_job(clock, **kw))[0]


def running(clock, lease=60.0):
    """What a claimer sets on the job it takes, as the engine does."""
    return {"status": "running", "lease_token": engine.new_token(),
            "lease_expires_at": clock() + lease, "started_at": clock(), "updated_at": clock()}


def claim(store, clock, workflows=None, lease=60.0):
    return store.claim(workflows, running(clock, lease))


def finish(store, clock, job_id, status="succeeded"):
    done = store.update(job_id, expect={"status": "running"}, status=status, updated_at=clock(),
                        finished_at=clock(), lease_token=None, lease_expires_at=None)
    assert done is not None
    return done


def claim_all(store, clock, workflows=None):
    order = []
    for _ in range(len(store) + 1):  # bounded: no store hands out more than it holds
        job = claim(store, clock, workflows)
        if job is None:
            return order
        order.append(job["job_id"])
    raise AssertionError("claimed more jobs than the store holds")


# -- add, get, update ---------------------------------------------------------------


def test_add_then_get_returns_the_job_with_seq_and_queued_at(jobs, clock):
    job = new_job(clock)
    stored, created = jobs.add(job)
    assert created is True and isinstance(stored["seq"], int)
    assert stored["queued_at"] == job["created_at"]
    assert {k: stored[k] for k in job} == job
    assert jobs.get(job["job_id"]) == stored
    assert jobs.get("no-such-job") is None
    later, _ = jobs.add(new_job(clock))
    assert later["seq"] > stored["seq"] and len(jobs) == 2


def test_jobs_handed_out_are_copies(jobs, clock):
    job = new_job(clock)
    stored, _ = jobs.add(job)
    job["status"] = stored["status"] = "tampered"
    jobs.get(stored["job_id"])["status"] = "tampered"
    jobs.update(stored["job_id"], updated_at=clock())["status"] = "tampered"
    claim(jobs, clock)["attempts"] = 99
    got = jobs.get(stored["job_id"])
    assert got["status"] == "running" and got["attempts"] == 1


def test_nested_values_handed_out_are_copies_too(request, jobs, clock):
    known_gap(request, "memory", "MemoryJobStore hands out shallow copies: payload, result, "
                                 "progress, error and callback dicts are shared with the stored job")
    stored, _ = jobs.add(new_job(clock))
    jobs.get(stored["job_id"])["payload"]["n"] = 2
    stored["payload"]["n"] = 3
    assert jobs.get(stored["job_id"])["payload"] == {"n": 1}


def test_update_without_expect_applies_and_returns_the_new_copy(jobs, clock):
    job = add(jobs, clock)
    done = jobs.update(job["job_id"], progress={"fraction": 0.5, "note": None}, updated_at=5.0)
    assert done["progress"] == {"fraction": 0.5, "note": None} and done["updated_at"] == 5.0
    assert jobs.get(job["job_id"]) == done
    assert jobs.update("no-such-job", status="canceled") is None


def test_update_is_compare_and_set(jobs, clock):
    job = add(jobs, clock)
    assert jobs.update(job["job_id"], expect={"status": "running"}, status="failed") is None
    assert jobs.update(job["job_id"], expect={"status": "queued", "lease_token": "stale"},
                       status="failed") is None
    assert jobs.get(job["job_id"]) == job  # a lost race changes nothing
    done = jobs.update(job["job_id"], expect={"status": "queued", "lease_token": None},
                       status="canceled", finished_at=clock())
    assert done["status"] == "canceled"
    assert jobs.update(job["job_id"], expect={"status": "queued"}, status="failed") is None


def test_an_update_over_a_known_copy_has_the_outcome_it_would_have_without(jobs, clock):
    job = add(jobs, clock)
    copy = jobs.get(job["job_id"])
    done = jobs.update(job["job_id"], expect={"status": "queued"}, known=copy, error={"n": 1})
    assert done["error"] == {"n": 1} and jobs.get(job["job_id"]) == done
    # The copy is stale now: the change goes over what is stored, not over it.
    again = jobs.update(job["job_id"], expect={"status": "queued"}, known=copy, priority="high")
    assert again["error"] == {"n": 1} and again["priority"] == "high"
    assert jobs.get(job["job_id"]) == again
    # A stale copy that still holds the expected values is no way past them.
    jobs.update(job["job_id"], status="canceled", finished_at=clock())
    assert jobs.update(job["job_id"], expect={"status": "queued"}, known=copy, status="failed") is None
    assert jobs.get(job["job_id"])["status"] == "canceled"


def test_update_many_has_each_updates_outcome_as_if_alone(jobs, clock):
    fresh, stale, lost, ended = (add(jobs, clock) for _ in range(4))
    stale_copy = jobs.get(stale["job_id"])
    jobs.update(stale["job_id"], error={"n": 1})  # the copy is stale now
    jobs.update(ended["job_id"], status="canceled", finished_at=clock())
    done = jobs.update_many([
        (fresh["job_id"], {"status": "queued"}, jobs.get(fresh["job_id"]), {"priority": "high"}),
        (stale["job_id"], {"status": "queued"}, stale_copy, {"priority": "low"}),
        (lost["job_id"], {"lease_token": "not its"}, None, {"status": "failed"}),
        (ended["job_id"], {"status": "queued"}, ended, {"status": "failed"}),  # known, but stale
        ("no-such-job", None, None, {"status": "failed"}),
    ])
    assert done[0]["priority"] == "high" and jobs.get(fresh["job_id"]) == done[0]
    assert (done[1]["priority"], done[1]["error"]) == ("low", {"n": 1})  # over what is stored
    assert jobs.get(stale["job_id"]) == done[1]
    assert done[2:] == [None, None, None]  # refused: each changed nothing
    assert jobs.get(lost["job_id"]) == lost and jobs.get(ended["job_id"])["status"] == "canceled"
    assert jobs.update_many([]) == []


def test_get_many_reads_each_job_in_the_order_asked(jobs, clock):
    a, b = add(jobs, clock), add(jobs, clock)
    jobs.update(b["job_id"], priority="high")
    got = jobs.get_many([b["job_id"], "no-such-job", a["job_id"], b["job_id"]])
    assert got == [jobs.get(b["job_id"]), None, jobs.get(a["job_id"]), jobs.get(b["job_id"])]
    assert got[0]["priority"] == "high" and jobs.get_many([]) == []
    got[2]["priority"] = "low"  # a copy: the store's job is not changed by it
    assert jobs.get(a["job_id"])["priority"] == "normal"


def test_racing_updates_expecting_the_same_values_apply_once(jobs, clock):
    job = add(jobs, clock)
    results = race(16, lambda i: jobs.update(job["job_id"], expect={"status": "queued"},
                                             status="canceled", finished_at=clock(), error=i))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and jobs.get(job["job_id"])["error"] == winners[0]["error"]


# -- claim ----------------------------------------------------------------------------


def test_claim_applies_the_claimers_changes(jobs, clock):
    job = add(jobs, clock)
    got = jobs.claim(None, running(clock, lease=30))
    assert got["job_id"] == job["job_id"]
    assert got["status"] == "running" and got["attempts"] == 1
    assert got["lease_expires_at"] == clock() + 30
    assert jobs.get(job["job_id"]) == got
    assert claim(jobs, clock) is None


def test_claim_adds_the_changes_of_the_jobs_workflow(jobs, clock):
    """An in-process claim over several workflows: each has its own deadline."""
    add(jobs, clock, workflow="short")
    add(jobs, clock, workflow="long")
    per_workflow = {"short": {"deadline_at": clock() + 5, "lease_expires_at": clock() + 5},
                    "long": {"deadline_at": clock() + 500, "lease_expires_at": clock() + 30}}
    first = jobs.claim(["short", "long"], running(clock, lease=60), per_workflow)
    second = jobs.claim(["short", "long"], running(clock, lease=60), per_workflow)
    assert (first["workflow"], first["deadline_at"], first["lease_expires_at"]) == \
        ("short", clock() + 5, clock() + 5)
    assert (second["workflow"], second["deadline_at"], second["lease_expires_at"]) == \
        ("long", clock() + 500, clock() + 30)
    # The lease the store searches by is the one the job holds.
    clock.advance(6)
    assert [j["job_id"] for j in jobs.expired(clock())] == [first["job_id"]]


def test_a_claim_keeps_every_digit_and_any_workflow_name(jobs, clock):
    # Times to the last bit of a double, and a workflow with dots and a quote in its name.
    job = add(jobs, clock, workflow='a.b "c"')
    at = 1795982455.1234567
    changes = dict(running(clock), started_at=at, lease_expires_at=at + 60, progress=None)
    per_workflow = {'a.b "c"': {"deadline_at": at + 0.1, "lease_expires_at": at + 0.2}}
    got = jobs.claim(['a.b "c"'], changes, per_workflow)
    assert got["job_id"] == job["job_id"] and got["started_at"] == at
    assert (got["deadline_at"], got["lease_expires_at"], got["progress"]) == (at + 0.1, at + 0.2, None)
    assert jobs.get(job["job_id"]) == got
    assert [j["job_id"] for j in jobs.expired(at + 0.25)] == [job["job_id"]]


def test_claim_order_is_priority_then_first_in_first_out(jobs, clock):
    names = {}
    for name, priority in [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"),
                           ("h2", "high"), ("l2", "low")]:
        names[add(jobs, clock, priority=priority)["job_id"]] = name
        clock.advance(0.001)
    assert [names[i] for i in claim_all(jobs, clock)] == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_same_time_same_priority_goes_by_seq(jobs, clock):
    ids = [add(jobs, clock)["job_id"] for _ in range(5)]
    assert claim_all(jobs, clock) == ids


def test_a_job_that_waited_overtakes_fresher_higher_ones(jobs, clock):
    # aging is 60 s: a low job two steps older outranks a fresh high one,
    # a normal one step older outranks a fresh high one.
    old_low = add(jobs, clock, priority="low")["job_id"]
    clock.advance(60.5)
    normal = add(jobs, clock, priority="normal")["job_id"]
    clock.advance(60.5)
    high = add(jobs, clock, priority="high")["job_id"]
    assert claim_all(jobs, clock) == [old_low, normal, high]
    young_low = add(jobs, clock, priority="low")["job_id"]
    clock.advance(119)  # not quite two steps
    high = add(jobs, clock, priority="high")["job_id"]
    assert claim_all(jobs, clock) == [high, young_low]


def test_not_before_delays_a_job_and_ranks_it_from_when_it_is_ready(jobs, clock):
    delayed = add(jobs, clock, delay=10)["job_id"]
    assert claim(jobs, clock) is None
    clock.advance(5)
    ready_earlier = add(jobs, clock)["job_id"]  # added later, ready sooner
    clock.advance(5)
    assert claim_all(jobs, clock) == [ready_earlier, delayed]


def test_a_job_queued_again_waits_out_its_not_before(jobs, clock):
    job = add(jobs, clock)
    claim(jobs, clock)
    jobs.update(job["job_id"], expect={"status": "running"}, status="queued",
                not_before=clock() + 30, queued_at=clock(), lease_token=None, lease_expires_at=None)
    assert claim(jobs, clock) is None and jobs.next_due() == clock() + 30
    clock.advance(30)
    assert claim(jobs, clock)["attempts"] == 2


def test_claim_takes_only_the_workflows_named(jobs, clock):
    a = add(jobs, clock, workflow="a")["job_id"]
    clock.advance(1)
    b = add(jobs, clock, workflow="b")["job_id"]
    assert claim(jobs, clock, ["c"]) is None
    assert claim(jobs, clock, []) is None
    assert claim(jobs, clock, ["b"])["job_id"] == b
    assert claim(jobs, clock, ["c", "a"])["job_id"] == a
    assert claim(jobs, clock, None) is None


def test_canceled_jobs_are_never_claimed(jobs, clock):
    job = add(jobs, clock)
    jobs.update(job["job_id"], expect={"status": "queued"}, status="canceled", finished_at=clock())
    assert claim(jobs, clock) is None


def racing_claimers(stores, clock, n_jobs=120, n_threads=8):
    ids = [add(stores[0], clock, workflow=f"w{i % 3}", priority=PRIORITIES[i % 3])["job_id"]
           for i in range(n_jobs)]
    taken = race(n_threads, lambda i: claim_all(stores[i % len(stores)], clock))
    claimed = [job_id for mine in taken for job_id in mine]
    assert len(claimed) == len(set(claimed)), "two claimers got the same job"
    assert sorted(claimed) == sorted(ids), "every job is claimed exactly once"
    assert all(stores[0].get(i)["attempts"] == 1 for i in ids)


def test_two_claimers_racing_in_one_process_never_get_the_same_job(jobs, clock):
    racing_claimers([jobs], clock)


def test_two_claimers_racing_from_two_processes_never_get_the_same_job(job_backend, clock):
    racing_claimers([job_backend.jobs(), job_backend.jobs(elsewhere=True)], clock)


# -- expired, next_due, counts ------------------------------------------------------------


def test_expired_lists_running_jobs_whose_lease_ran_out(jobs, clock):
    short = add(jobs, clock)["job_id"]
    long = add(jobs, clock)["job_id"]
    add(jobs, clock)  # queued: never expired
    claim(jobs, clock, lease=10)
    claim(jobs, clock, lease=30)
    assert jobs.expired(clock() + 9.9) == []
    assert [j["job_id"] for j in jobs.expired(clock() + 10)] == [short]
    assert sorted(j["job_id"] for j in jobs.expired(clock() + 30)) == sorted([short, long])
    finish(jobs, clock, short)
    assert [j["job_id"] for j in jobs.expired(clock() + 30)] == [long]
    jobs.expired(clock() + 30)[0]["status"] = "tampered"
    assert jobs.get(long)["status"] == "running"


def test_next_due_is_the_next_delayed_job_still_in_the_future(jobs, clock):
    assert jobs.next_due() is None
    add(jobs, clock)  # ready now: nothing to wait for
    assert jobs.next_due() is None
    later = add(jobs, clock, delay=20)["job_id"]
    add(jobs, clock, delay=10)
    assert jobs.next_due() == clock() + 10
    clock.advance(10)  # the first is ready now, claimed or not
    assert jobs.next_due() == clock() + 10
    jobs.update(later, expect={"status": "queued"}, status="canceled", finished_at=clock())
    assert jobs.next_due() is None


def test_counts_by_status_by_priority_and_by_workflow(jobs, clock):
    empty = jobs.counts()
    assert empty == {"by_status": dict.fromkeys(JOB_STATUSES, 0),
                     "queued_by_priority": dict.fromkeys(PRIORITIES, 0), "by_workflow": {}}
    for priority in ("high", "high", "low", "normal", "normal"):
        add(jobs, clock, priority=priority)
    add(jobs, clock, workflow="later", status="scheduled", delay=60)
    finish(jobs, clock, claim(jobs, clock)["job_id"], "failed")  # a high one
    claim(jobs, clock)  # the other high one
    zero = dict.fromkeys(JOB_STATUSES, 0)
    assert jobs.counts() == {
        "by_status": dict(zero, scheduled=1, queued=3, running=1, failed=1),
        "queued_by_priority": {"high": 0, "normal": 2, "low": 1},
        "by_workflow": {"w": dict(zero, queued=3, running=1, failed=1),
                        "later": dict(zero, scheduled=1)}}


# -- page ----------------------------------------------------------------------------------


def test_page_is_newest_first_by_cursor_with_filters_and_only_the_keys_own(jobs, clock):
    mine = [add(jobs, clock, workflow="ext" if i % 2 else "w")["job_id"] for i in range(7)]
    add(jobs, clock, key_id="other")
    seen, cursor = [], None
    for _ in range(5):
        page, more = jobs.page("k", limit=3, before_seq=cursor)
        seen += [j["job_id"] for j in page]
        if not more:
            break
        cursor = page[-1]["seq"]
    assert seen == mine[::-1]
    page, more = jobs.page("k", limit=7)
    assert len(page) == 7 and more is False
    page, more = jobs.page("k", {"workflow": "ext"})
    assert [j["job_id"] for j in page] == [mine[5], mine[3], mine[1]] and more is False
    claim(jobs, clock, ["w"])
    assert [j["job_id"] for j in jobs.page("k", {"status": ["running"]})[0]] == [mine[0]]
    assert jobs.page("k", {"status": ["running"], "workflow": "ext"}) == ([], False)
    assert len(jobs.page("k", {"status": ["running", "queued"]})[0]) == 7
    assert [j["key_id"] for j in jobs.page("other")[0]] == ["other"]
    assert jobs.page("nobody") == ([], False)


def test_page_filters_by_schedule_concurrency_key_and_creation_time(jobs, clock):
    first = add(jobs, clock, schedule="nightly", concurrency_key="acme")["job_id"]
    clock.advance(10)
    second = add(jobs, clock, concurrency_key="acme")["job_id"]
    clock.advance(10)
    third = add(jobs, clock)["job_id"]
    ids = lambda filters: [j["job_id"] for j in jobs.page("k", filters)[0]]  # noqa: E731
    assert ids({"schedule": "nightly"}) == [first]
    assert ids({"concurrency_key": "acme"}) == [second, first]
    assert ids({"created_after": clock() - 15}) == [third, second]
    assert ids({"created_before": clock() - 5, "created_after": clock() - 15}) == [second]


# -- scheduled and waiting -----------------------------------------------------------------


def test_due_lists_scheduled_jobs_whose_time_has_come(jobs, clock):
    soon = add(jobs, clock, status="scheduled", delay=10)["job_id"]
    add(jobs, clock, status="scheduled", delay=100)
    assert jobs.due(clock()) == [] and claim(jobs, clock) is None
    clock.advance(10)
    assert [j["job_id"] for j in jobs.due(clock())] == [soon]
    assert claim(jobs, clock) is None, "a scheduled job is claimed only once queued"
    jobs.update(soon, expect={"status": "scheduled"}, status="queued")
    assert jobs.due(clock()) == [] and claim(jobs, clock)["job_id"] == soon


def test_waiting_lists_the_jobs_waiting_for_their_parents(jobs, clock):
    parent = add(jobs, clock)["job_id"]
    child = add(jobs, clock, status="waiting", depends_on=[parent])["job_id"]
    assert [j["job_id"] for j in jobs.waiting()] == [child]
    assert claim(jobs, clock)["job_id"] == parent and claim(jobs, clock) is None
    jobs.update(child, expect={"status": "waiting"}, status="queued")
    assert jobs.waiting() == [] and claim(jobs, clock)["job_id"] == child


# -- limits ----------------------------------------------------------------------------------


def test_limits_are_kept_and_replaced(job_backend, clock):
    jobs = job_backend.jobs()
    assert jobs.limits() == {}
    jobs.set_limits("w", {"max_concurrency": 2})
    jobs.set_limits("v", {"rate": {"count": 5, "per": 2}})
    jobs.set_limits("w", {"max_concurrency_per_key": 1})
    assert jobs.limits() == {"w": {"max_concurrency_per_key": 1}, "v": {"rate": {"count": 5, "per": 2}}}
    jobs.set_limits("v", None)
    assert jobs.limits() == {"w": {"max_concurrency_per_key": 1}}
    if job_backend.__class__ is not MemoryBackend:  # every process sees them
        assert job_backend.jobs(elsewhere=True).limits() == jobs.limits()


def test_max_concurrency_holds_back_the_workflow_and_no_other(jobs, clock):
    jobs.set_limits("w", {"max_concurrency": 2})
    limited = [add(jobs, clock, workflow="w", priority="high")["job_id"] for _ in range(4)]
    other = add(jobs, clock, workflow="v", priority="low")["job_id"]
    first, second = claim(jobs, clock), claim(jobs, clock)
    assert {first["job_id"], second["job_id"]} == set(limited[:2])
    assert claim(jobs, clock)["job_id"] == other, "the limited ones wait; the next may start"
    assert claim(jobs, clock) is None
    finish(jobs, clock, first["job_id"])
    assert claim(jobs, clock)["job_id"] == limited[2]


def test_max_concurrency_per_key_lets_other_keys_pass(jobs, clock):
    jobs.set_limits("w", {"max_concurrency_per_key": 1})
    a1, a2 = (add(jobs, clock, concurrency_key="a")["job_id"] for _ in range(2))
    b1 = add(jobs, clock, concurrency_key="b")["job_id"]
    free = [add(jobs, clock)["job_id"] for _ in range(2)]  # no key: not limited per key
    taken = [claim(jobs, clock)["job_id"] for _ in range(4)]
    assert taken == [a1, b1, *free] and claim(jobs, clock) is None
    finish(jobs, clock, a1)
    assert claim(jobs, clock)["job_id"] == a2


def test_a_rate_holds_starts_within_its_window(jobs, clock):
    jobs.set_limits("w", {"rate": {"count": 2, "per": 10}})
    ids = [add(jobs, clock)["job_id"] for _ in range(5)]
    assert [claim(jobs, clock)["job_id"] for _ in range(2)] == ids[:2]
    assert claim(jobs, clock) is None
    clock.advance(9)
    assert claim(jobs, clock) is None
    clock.advance(1.5)
    assert [claim(jobs, clock)["job_id"] for _ in range(2)] == ids[2:4]
    assert claim(jobs, clock) is None


def test_racing_claimers_never_pass_a_limit(job_backend, clock):
    stores = [job_backend.jobs()]
    if job_backend.__class__ is not MemoryBackend:
        stores.append(job_backend.jobs(elsewhere=True))
    stores[0].set_limits("w", {"max_concurrency": 3})
    for _ in range(20):
        add(stores[0], clock)
    taken = race(8, lambda i: claim(stores[i % len(stores)], clock))
    assert sum(t is not None for t in taken) == 3


# -- purge -----------------------------------------------------------------------------------


def test_purge_deletes_finished_jobs_past_ttl_and_returns_the_count(job_backend, clock):
    store = job_backend.jobs(ttl=60)
    done = [add(store, clock)["job_id"] for _ in range(7)]
    assert claim_all(store, clock) == done
    for job_id in done:
        finish(store, clock, job_id)
    still_running = add(store, clock)["job_id"]
    claim(store, clock)
    waiting = add(store, clock)["job_id"]
    assert store.purge(clock() + 59.9) == 0
    if hasattr(store, "PURGE_BATCH"):
        store.PURGE_BATCH = 3  # a backend that deletes in batches keeps to its size
    counts = []
    for _ in range(10):
        counts.append(store.purge(clock() + 60))
        if counts[-1] == 0:
            break
    assert sum(counts) == 7 and counts[-1] == 0
    assert all(0 < n <= getattr(store, "PURGE_BATCH", 7) for n in counts[:-1])
    assert all(store.get(i) is None for i in done)
    assert store.get(waiting)["status"] == "queued" and store.get(still_running) is not None
    assert len(store) == 2 and store.counts()["by_status"]["succeeded"] == 0
    assert store.purge(clock() + 10_000) == 0  # unfinished jobs are never dropped by age


def test_a_retried_job_is_not_purged_by_its_old_finish_time(job_backend, clock):
    store = job_backend.jobs(ttl=60)
    job_id = add(store, clock)["job_id"]
    claim(store, clock)
    finish(store, clock, job_id, "failed")
    clock.advance(30)
    store.update(job_id, expect={"status": "failed"}, status="queued", finished_at=None,
                 not_before=clock(), queued_at=clock(), attempts=0)
    assert store.purge(clock() + 3600) == 0 and store.get(job_id)["status"] == "queued"
    claim(store, clock)
    clock.advance(40)  # 70 s after its first finish
    finish(store, clock, job_id)
    assert store.purge(clock()) == 0 and store.get(job_id) is not None
    assert store.purge(clock() + 60) == 1 and store.get(job_id) is None


# -- idempotency -----------------------------------------------------------------------------


def test_one_key_and_body_make_one_job_another_body_is_refused(jobs, clock):
    first, created = jobs.add(new_job(clock), ("k", "order-42", "body-1", 3600))
    again, created_again = jobs.add(new_job(clock), ("k", "order-42", "body-1", 3600))
    assert created is True and created_again is False and again == first
    with pytest.raises(IdempotencyMismatch):
        jobs.add(new_job(clock), ("k", "order-42", "body-2", 3600))
    other_key, created = jobs.add(new_job(clock), ("other", "order-42", "body-2", 3600))
    assert created is True and other_key["job_id"] != first["job_id"]
    assert len(jobs) == 2
    clock.advance(3600)  # the key's lifetime is over: it is free again
    later, created = jobs.add(new_job(clock), ("k", "order-42", "body-2", 3600))
    assert created is True and later["job_id"] != first["job_id"]


def test_concurrent_duplicates_make_one_job(jobs, clock):
    results = race(16, lambda i: jobs.add(new_job(clock), ("k", "race", "body", 3600)))
    assert sorted(created for _, created in results) == [False] * 15 + [True]
    assert len({job["job_id"] for job, _ in results}) == 1 and len(jobs) == 1


# -- max_jobs ---------------------------------------------------------------------------------


def test_queue_full_at_max_jobs(job_backend, clock):
    store = job_backend.jobs(max_jobs=3, ttl=60)
    ids = [add(store, clock)["job_id"] for _ in range(3)]
    with pytest.raises(QueueFull):
        add(store, clock)
    assert len(store) == 3
    claim(store, clock)
    finish(store, clock, ids[0])
    clock.advance(60)  # purged (add purges when it must): room for one more
    add(store, clock)
    with pytest.raises(QueueFull):
        add(store, clock)
    assert len(store) == 3


def test_a_replay_is_answered_even_when_the_store_is_full(job_backend, clock):
    store = job_backend.jobs(max_jobs=2)
    first, _ = store.add(new_job(clock), ("k", "order-1", "body", 3600))
    add(store, clock)
    clock.advance(2)
    again, created = store.add(new_job(clock), ("k", "order-1", "body", 3600))
    assert created is False and again["job_id"] == first["job_id"]


# -- batches ----------------------------------------------------------------------------------


def test_add_many_stores_every_job_in_order(job_backend, clock):
    store = job_backend.jobs()
    jobs = [new_job(clock, priority=p) for p in ("low", "normal", "high")]
    added = store.add_many(jobs)
    assert [(j["job_id"], created) for j, created in added] == [(j["job_id"], True) for j in jobs]
    seqs = [j["seq"] for j, _ in added]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [store.get(j["job_id"])["priority"] for j in jobs] == ["low", "normal", "high"]
    # the seq each job was answered with is the one stored (a page cursor), after a first batch too
    more = store.add_many([new_job(clock) for _ in range(3)])
    assert [store.get(j["job_id"])["seq"] for j, _ in added + more] == seqs + [j["seq"] for j, _ in more]


def test_add_many_over_max_jobs_stores_none(job_backend, clock):
    store = job_backend.jobs(max_jobs=4)
    add(store, clock)
    with pytest.raises(QueueFull):
        store.add_many([new_job(clock) for _ in range(4)])
    assert len(store) == 1  # all or none
    store.add_many([new_job(clock) for _ in range(3)])
    assert len(store) == 4


def test_add_many_replays_and_refuses_by_idempotency_key(job_backend, clock):
    store = job_backend.jobs()
    first, _ = store.add(new_job(clock), ("k", "order-1", "body-1", 3600))
    fresh = new_job(clock)
    added = store.add_many([fresh, new_job(clock)], [("k", "order-2", "body-2", 3600),
                                                      ("k", "order-1", "body-1", 3600)])
    assert [created for _, created in added] == [True, False]
    assert added[1][0]["job_id"] == first["job_id"] and len(store) == 2
    # The key it recorded answers a later replay too.
    again, created = store.add(new_job(clock), ("k", "order-2", "body-2", 3600))
    assert created is False and again["job_id"] == fresh["job_id"]
    with pytest.raises(IdempotencyMismatch) as refused:
        store.add_many([new_job(clock), new_job(clock)], [None, ("k", "order-1", "other", 3600)])
    assert refused.value.index == 1 and len(store) == 2  # the first job was not kept either


def test_add_many_writes_also_with_the_jobs_or_not_at_all(job_backend, clock):
    """``also``'s statements (the request's audit rows) are committed with
    the jobs, after seeing the answer; a refusal, or a statement that fails,
    leaves neither. A store in memory has no transaction to put them in."""
    store = job_backend.jobs(max_jobs=3)
    asked = []

    def also(answer):
        asked.append([(job["job_id"], created) for job, created in answer])
        return job_backend.recorder().statements("k", "POST", [f"/in#{job['job_id']}" for job, _ in answer],
                                                 202, "req-1")

    batch = ("k", "batch-1", "body-1", 3600)
    made = store.add_many([new_job(clock), new_job(clock)], batch_key=batch, also=also)
    if not store.carries_also:
        assert asked == [] and len(store) == 2
        return

    def audited():
        return sorted(row["path"] for row in job_backend.db.query("SELECT path FROM audit_log"))

    first = sorted(f"/in#{job['job_id']}" for job, _ in made)
    assert asked == [[(job["job_id"], True) for job, _ in made]] and audited() == first
    with pytest.raises(QueueFull):
        store.add_many([new_job(clock), new_job(clock)], also=also)
    with pytest.raises(IdempotencyMismatch):
        store.add_many([new_job(clock)], batch_key=("k", "batch-1", "other", 3600), also=also)
    assert audited() == first and len(store) == 2  # refused: nothing of either
    # A replay writes its own rows, for the jobs it answers with.
    again = store.add_many([new_job(clock), new_job(clock)], batch_key=batch, also=also)
    assert [job["job_id"] for job, _ in again] == [job["job_id"] for job, _ in made]
    assert audited() == sorted(first * 2)
    with pytest.raises(Exception):
        store.add_many([new_job(clock)], also=lambda answer: [("INSERT INTO no_such_table VALUES (1)", [{}])])
    assert len(store) == 2 and audited() == sorted(first * 2)  # the job went with the failed statement


def test_claim_many_writes_also_with_the_jobs_it_claims_where_it_can(job_backend, clock):
    """A claim that takes jobs commits ``also``'s statements (its audit row)
    in its own transaction where it has one (SQLite, no limits): one commit
    before the worker's answer, not two. An empty claim calls it not; a
    store or a claim that cannot carry it never calls it, and the caller
    writes the row itself."""
    store = job_backend.jobs()
    asked = []

    def also(jobs):
        asked.append([job["job_id"] for job in jobs])
        return job_backend.recorder().statements("k", "POST", ["/claim"], 200, f"req-{len(asked)}")

    def audited():
        return [row["request_id"] for row in job_backend.db.query("SELECT request_id FROM audit_log")]

    assert store.claim_many(["w"], running(clock), None, [engine.new_token()], also) == []
    assert asked == []
    made = [store.add(new_job(clock))[0]["job_id"] for _ in range(3)]
    one = store.claim_many(["w"], running(clock), None, [engine.new_token()], also)
    two = store.claim_many(["w"], running(clock), None, [engine.new_token() for _ in range(5)], also)
    assert [job["job_id"] for job in one + two] == made
    carried = store.carries_also
    assert asked == ([[made[0]], made[1:]] if carried else [])
    if carried:
        assert audited() == ["req-1", "req-2"]
        store.add(new_job(clock))
        with pytest.raises(Exception):
            store.claim_many(["w"], running(clock), None, [engine.new_token()],
                             lambda jobs: [("INSERT INTO no_such_table VALUES (1)", [{}])])
        assert claim(store, clock, ["w"]) is not None  # the claim went with the failed statement
    store.set_limits("w", {"max_concurrency": 10})
    store.add(new_job(clock))
    asked.clear()
    assert len(store.claim_many(["w"], running(clock), None, [engine.new_token()], also)) == 1
    assert asked == []  # claims under limits carry nothing


def test_a_batch_key_answers_its_jobs_again_and_refuses_another_body(job_backend, clock):
    store = job_backend.jobs(max_jobs=5)
    batch = ("k", "batch-1", "body-1", 3600)
    made = store.add_many([new_job(clock) for _ in range(3)], batch_key=batch)
    assert [created for _, created in made] == [True] * 3 and len(store) == 3
    clock.advance(1)
    again = store.add_many([new_job(clock) for _ in range(3)], batch_key=batch)
    assert [(j["job_id"], created) for j, created in again] == [(j["job_id"], False) for j, _ in made]
    assert len(store) == 3
    with pytest.raises(IdempotencyMismatch) as refused:
        store.add_many([new_job(clock) for _ in range(3)], batch_key=("k", "batch-1", "body-2", 3600))
    assert refused.value.index is None and len(store) == 3
    # Jobs' keys and batches' share one namespace (their bodies always differ).
    with pytest.raises(IdempotencyMismatch):
        store.add(new_job(clock), ("k", "batch-1", "body-x", 3600))
    store.add(new_job(clock), ("k", "one", "body-1", 3600))
    with pytest.raises(IdempotencyMismatch):
        store.add_many([new_job(clock)], batch_key=("k", "one", "body-9", 3600))
    # Another caller's key of the same name is another key; a full store refuses it whole.
    with pytest.raises(QueueFull):
        store.add_many([new_job(clock) for _ in range(2)], batch_key=("other", "batch-1", "body-1", 3600))
    assert len(store) == 4
    clock.advance(3600)  # past its lifetime the key is free again
    fresh = store.add_many([new_job(clock)], batch_key=("k", "batch-1", "body-2", 3600))
    assert fresh[0][1] is True and len(store) == 5


def test_a_batch_key_is_free_again_once_a_job_it_made_is_gone(job_backend, clock):
    store = job_backend.jobs(ttl=60)
    batch = ("k", "batch-2", "body", 86_400)
    store.add_many([new_job(clock) for _ in range(2)], batch_key=batch)
    finish(store, clock, claim(store, clock)["job_id"])
    clock.advance(61)
    assert store.purge(clock()) == 1
    again = store.add_many([new_job(clock) for _ in range(2)], batch_key=batch)
    assert [created for _, created in again] == [True, True]


def test_replayed_answers_only_when_every_job_would_be_a_replay(job_backend, clock):
    store = job_backend.jobs()
    one, _ = store.add(new_job(clock), ("k", "one", "body-1", 3600))
    made = store.add_many([new_job(clock) for _ in range(2)], batch_key=("k", "b", "body-b", 3600))
    assert [j["job_id"] for j in store.replayed([("k", "one", "body-1", 3600)])] == [one["job_id"]]
    assert store.replayed([("k", "one", "body-1", 3600), ("k", "new", "body", 3600)]) is None
    assert store.replayed([("k", "one", "body-1", 3600), None]) is None
    assert store.replayed([None]) is None and store.replayed() is None
    assert [j["job_id"] for j in store.replayed(batch_key=("k", "b", "body-b", 3600))] == \
        [j["job_id"] for j, _ in made]
    assert store.replayed(batch_key=("k", "other", "body-b", 3600)) is None
    with pytest.raises(IdempotencyMismatch):
        store.replayed(batch_key=("k", "b", "body-c", 3600))
    assert len(store) == 3  # it stores nothing


def test_concurrent_batches_with_one_key_make_one_batch(job_backend, clock):
    store = job_backend.jobs()
    results = race(8, lambda i: store.add_many([new_job(clock) for _ in range(3)],
                                               batch_key=("k", "race", "body", 3600)))
    assert sorted(all(created for _, created in r) for r in results) == [False] * 7 + [True]
    assert len({tuple(j["job_id"] for j, _ in r) for r in results}) == 1 and len(store) == 3


def test_claim_many_takes_jobs_in_queue_order_each_with_its_token(jobs, clock):
    ids = [add(jobs, clock, priority=p)["job_id"] for p in ("low", "normal", "high", "normal")]
    add(jobs, clock, workflow="other")
    tokens = [engine.new_token() for _ in range(3)]
    got = jobs.claim_many(["w"], running(clock), None, tokens)
    assert [j["job_id"] for j in got] == [ids[2], ids[1], ids[3]]
    assert [j["lease_token"] for j in got] == tokens
    assert all(j["status"] == "running" and j["attempts"] == 1 for j in got)
    assert jobs.get(ids[2])["lease_token"] == tokens[0]
    rest = jobs.claim_many(["w"], running(clock), None, [engine.new_token() for _ in range(5)])
    assert [j["job_id"] for j in rest] == [ids[0]]
    assert jobs.claim_many(["w"], running(clock), None, [engine.new_token()]) == []


def test_claim_many_keeps_the_limits(jobs, clock):
    jobs.set_limits("w", {"max_concurrency": 2})
    for _ in range(4):
        add(jobs, clock)
    got = jobs.claim_many(None, running(clock), None, [engine.new_token() for _ in range(4)])
    assert len(got) == 2


def test_add_many_with_take_stores_a_lone_new_job_claimed(jobs, clock):
    """``take`` (the engine's, for a claim waiting when the job comes): the
    new job is stored as that claim would have left it, and no other claim
    finds it; a replay is answered as ever and changes nothing; under its
    workflow's limits the job is queued, for the claims to count."""
    changes = dict(running(clock), claimed_by="worker-key")
    (job, created), = jobs.add_many([new_job(clock)], [("k", "once", "body", 3600)], take=changes)
    assert created and job["status"] == "running" and job["attempts"] == 1
    stored = jobs.get(job["job_id"])
    assert (stored["status"], stored["lease_token"], stored["claimed_by"], stored["attempts"]) == \
        ("running", changes["lease_token"], "worker-key", 1)
    assert jobs.claim_many(["w"], running(clock), None, [engine.new_token()]) == []
    assert [j["job_id"] for j in jobs.expired(clock() + 61)] == [job["job_id"]]  # leased as any claim
    (again, created), = jobs.add_many([new_job(clock)], [("k", "once", "body", 3600)],
                                      take=running(clock))
    assert not created and again["job_id"] == job["job_id"] and len(jobs) == 1
    assert jobs.get(job["job_id"])["lease_token"] == changes["lease_token"]
    with pytest.raises(ValueError):
        jobs.add_many([new_job(clock), new_job(clock)], take=running(clock))
    jobs.set_limits("w", {"max_concurrency": 5})
    (held, created), = jobs.add_many([new_job(clock)], take=running(clock))
    assert created and held["status"] == "queued" and jobs.get(held["job_id"])["status"] == "queued"
    assert claim(jobs, clock, ["w"])["job_id"] == held["job_id"]
    assert len(jobs) == 2


def test_racing_batch_claims_never_share_a_job(jobs, clock):
    for _ in range(60):
        add(jobs, clock)
    got = race(6, lambda i: jobs.claim_many(
        None, running(clock), None, [engine.new_token() for _ in range(7)]))
    ids = [j["job_id"] for batch in got for j in batch]
    assert len(ids) == len(set(ids)) == 42


# -- the callback outbox ----------------------------------------------------------------------


def test_pending_callbacks_are_the_finished_jobs_still_to_deliver(jobs, clock):
    def finished_with(state):
        job_id = add(jobs, clock)["job_id"]
        claim(jobs, clock)
        finish(jobs, clock, job_id)
        if state is not None:
            jobs.update(job_id, callback_id=f"msg_{job_id}", callback_body="{}", callback={
                "state": state, "attempts": 1, "last_status": None, "last_error": None,
                "next_attempt_at": clock() + 5 if state == "pending" else None})
        return job_id

    assert jobs.pending_callbacks() == []
    pending = finished_with("pending")
    finished_with("delivered")
    finished_with("failed")
    finished_with(None)
    add(jobs, clock)
    assert jobs.pending_callbacks() == [(pending, f"msg_{pending}", clock() + 5)]
    # Taking an attempt is a compare-and-set on the delivery state: one taker wins.
    state = jobs.get(pending)["callback"]
    taken = race(8, lambda i: jobs.update(
        pending, expect={"callback_id": f"msg_{pending}", "callback": state,
                         "callback_sending_until": None}, callback_sending_until=clock() + 15))
    assert sum(t is not None for t in taken) == 1
    jobs.update(pending, expect={"callback_id": f"msg_{pending}"}, callback_sending_until=None,
                callback=dict(state, state="delivered", next_attempt_at=None))
    assert jobs.pending_callbacks() == []


# ---------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------

LOTS = 10**12


def money_job(job_id, key_id="k", workflow="w"):
    return {"job_id": job_id, "key_id": key_id, "workflow": workflow}


def test_reserve_charge_settle_arithmetic(ledger, clock):
    a = money_job("a")
    day = ledger.reserve(a, 100, [("service", None, LOTS), ("key", "k", LOTS)])
    assert day == utc_day(clock())
    assert ledger.used_today() == ledger.used_today("k") == 100 and ledger.spent("a") == 0
    assert ledger.charge(a, 30, note="first") == (30, None)
    assert ledger.charge(a, 70) == (100, None)
    assert ledger.used_today() == 100  # a charge turns reservation into spend
    # Money spent past the reservation is recorded in full, and counts at once.
    assert ledger.charge(a, 5, [("service", None, LOTS)]) == (105, None)
    assert ledger.spent("a") == 105 and ledger.used_today() == 105
    assert ledger.settle("a", "done") == 105 and ledger.used_today() == 105
    b = money_job("b", key_id="other")
    ledger.reserve(b, 100, [("service", None, LOTS)])
    ledger.charge(b, 40)
    assert ledger.settle("b", "done") == 40
    assert ledger.settle("b", "again") == 40  # settling again releases nothing more
    assert ledger.used_today() == 145 and ledger.used_today("other") == 40
    assert ledger.settle("nobody", "x") == 0 and ledger.spent("nobody") == 0


def test_a_charged_total_counts_once_however_often_it_is_reported(ledger):
    job = money_job("t")
    ledger.reserve(job, 100, [("service", None, LOTS)])
    results = race(16, lambda i: ledger.charge(job, 10, total=True))
    assert sorted(spent for spent, _ in results) == [10] * 16
    assert ledger.charge(job, 8, total=True) == (10, None)  # a lower total charges nothing
    assert ledger.spent("t") == 10 and ledger.used_today() == 100


def test_spend_past_a_day_budget_is_recorded_and_named(ledger, clock):
    limits = [("service", None, 50)]
    unreserved = money_job("u")
    spent, passed = ledger.charge(unreserved, 70, limits)
    assert spent == 70 and passed["scope"] == "service" and passed["limit"] == 50
    assert ledger.used_today() == 70  # recorded in full: the excess blocks new work
    with pytest.raises(BudgetExceeded):
        ledger.reserve(money_job("next"), 1, limits)


def test_a_retry_reserves_what_is_left_of_the_cap_once(ledger):
    job = money_job("r")
    ledger.reserve(job, 35, [("service", None, LOTS)])
    ledger.charge(job, 30)
    ledger.settle("r", "failed")
    results = race(8, lambda i: ledger.reserve_rest(job, 35, [("service", None, LOTS)]))
    assert sorted(results, key=lambda r: r is None) == [5] + [None] * 7
    assert ledger.used_today() == 35  # 30 spent and 5 held, whatever the retries


def test_top_up_raises_a_reservation_within_the_limits(ledger):
    job = money_job("w")
    ledger.top_up(job, 40, [("service", None, 100)])
    ledger.top_up(job, 30, [("service", None, 100)])  # already holds more: nothing
    assert ledger.used_today() == 40
    with pytest.raises(BudgetExceeded):
        ledger.top_up(job, 101, [("service", None, 100)])
    assert ledger.used_today() == 40


def test_a_reservation_past_a_limit_raises_and_writes_nothing(ledger, clock):
    limits = [("service", None, 300), ("key", "k", 250)]
    ledger.reserve(money_job("a"), 100, limits)
    ledger.reserve(money_job("b"), 150, limits)  # exactly at the key's limit: allowed
    with pytest.raises(BudgetExceeded) as err:
        ledger.reserve(money_job("c"), 1, limits)
    assert err.value.state == {"scope": "key", "limit": 250, "used": 250, "requested": 1,
                               "day": utc_day(clock()), "reserved": 250}
    with pytest.raises(BudgetExceeded) as err:
        ledger.reserve(money_job("d", key_id="k2"), 51, [("service", None, 300)])
    assert err.value.state["scope"] == "service" and err.value.state["used"] == 250
    assert ledger.used_today() == 250 and ledger.used_today("k") == 250
    assert ledger.used_today("k2") == 0 and ledger.spent("c") == 0
    day = utc_day(clock())
    assert ledger.usage(day, day, "key") == {"k": {"spend": 0, "reserved": 250, "jobs": {}}}


def test_a_batch_reservation_is_all_or_nothing(ledger):
    limits = [("service", None, 100)]
    ledger.reserve_many([(money_job("a"), 30), (money_job("b"), 0), (money_job("c"), 40)], limits)
    assert ledger.used_today() == 70 and ledger.spent("b") == 0
    with pytest.raises(BudgetExceeded) as err:
        ledger.reserve_many([(money_job("d"), 20), (money_job("e"), 20)], limits)
    assert err.value.index == 1 and err.value.state["used"] == 90  # counting d, not kept
    assert ledger.used_today() == 70  # d's reservation went with the refusal
    ledger.reserve_many([(money_job("f"), 30)], limits)  # exactly at the limit
    assert ledger.used_today() == 100
    # Jobs that reserve nothing still need something left: refused, as the first.
    with pytest.raises(BudgetExceeded) as err:
        ledger.reserve_many([(money_job("g"), 0), (money_job("h"), 0)], limits)
    assert err.value.index == 0 and err.value.state["used"] == 100 and err.value.state["reserved"] == 100
    ledger.reserve_many([(money_job("i"), 0)], [("service", None, 101)])  # 1 left: accepted
    assert ledger.used_today() == 100


def test_concurrent_reservations_at_the_cap_never_pass_it(ledger):
    def reserve(i):
        try:
            return ledger.reserve(money_job(f"j{i}"), 10, [("service", None, 100)])
        except BudgetExceeded:
            return None

    results = race(30, reserve)
    assert sum(r is not None for r in results) == 10 and ledger.used_today() == 100


def test_usage_groups_spend_reservations_and_outcomes(ledger_backend, clock):
    book, rec = ledger_backend.ledger(), ledger_backend.recorder()
    first_day = utc_day(clock())
    for job_id, key_id, workflow, cap, spend in [("a", "k1", "x", 100, 60), ("b", "k1", "y", 50, 50),
                                                 ("c", "k2", "x", 80, 0)]:
        book.reserve(money_job(job_id, key_id, workflow), cap, [("service", None, LOTS)])
        if spend:
            book.charge(money_job(job_id, key_id, workflow), spend)
    book.settle("a", "succeeded")
    rec.outcome({"workflow": "x", "key_id": "k1", "status": "succeeded"})
    clock.advance(86_400)
    second_day = utc_day(clock())
    book.reserve(money_job("d", "k2", "y"), 30, [("service", None, LOTS)])
    book.charge(money_job("d", "k2", "y"), 10)
    rec.outcome({"workflow": "y", "key_id": "k2", "status": "failed"})
    rec.flush()
    assert book.usage(first_day, second_day, "day") == {
        first_day: {"spend": 110, "reserved": 80, "jobs": {"succeeded": 1}},
        second_day: {"spend": 10, "reserved": 20, "jobs": {"failed": 1}}}
    assert book.usage(first_day, second_day, "workflow") == {
        "x": {"spend": 60, "reserved": 80, "jobs": {"succeeded": 1}},
        "y": {"spend": 60, "reserved": 20, "jobs": {"failed": 1}}}
    assert book.usage(first_day, first_day, "key") == {
        "k1": {"spend": 110, "reserved": 0, "jobs": {"succeeded": 1}},
        "k2": {"spend": 0, "reserved": 80, "jobs": {}}}
    assert book.usage(first_day, second_day, "key", key_id="k2") == {
        "k2": {"spend": 10, "reserved": 100, "jobs": {"failed": 1}}}
    assert book.usage(second_day, first_day, "day") == {}


# ---------------------------------------------------------------------------
# UserStore
# ---------------------------------------------------------------------------


def test_upsert_creates_then_updates_the_fields_given(users):
    created, user = users.upsert("o", "ada@example.com", {"name": "Ada", "locale": "en-GB"})
    assert created is True and user["email"] == "ada@example.com"
    assert (user["name"], user["locale"], user["currency"], user["meta"]) == \
           ("Ada", "en-GB", None, {})
    created, again = users.upsert("o", "ada@example.com", {"name": "Ada L.", "currency": "GBP"})
    assert created is False and again["id"] == user["id"]
    assert (again["name"], again["locale"], again["currency"]) == ("Ada L.", "en-GB", "GBP")
    assert again["created_at"] == user["created_at"] and again["updated_at"] >= user["updated_at"]


def test_concurrent_upserts_of_one_new_email_make_one_user(users):
    results = race(16, lambda i: users.upsert("o", "race@example.com", {"name": f"n{i}"}))
    assert sorted(created for created, _ in results) == [False] * 15 + [True]
    assert len({user["id"] for _, user in results}) == 1


def test_get_and_get_by_email(users):
    _, user = users.upsert("o", "bob@example.com", {"name": "Bob"})
    assert users.get(user["id"]) == user == users.get_by_email("bob@example.com", "o")
    assert users.get("0" * 32) is None and users.get_by_email("nobody@example.com", "o") is None


def test_patch_changes_the_fields_given_of_an_existing_user(users):
    _, user = users.upsert("o", "cy@example.com", {"name": "Cy", "locale": "fr"})
    patched = users.patch(user["id"], {"name": "Cyril"})
    assert (patched["name"], patched["locale"], patched["email"]) == ("Cyril", "fr", "cy@example.com")
    assert users.get(user["id"]) == patched
    assert users.patch("0" * 32, {"name": "Nobody"}) is None


def test_meta_is_merged_not_replaced(users):
    _, user = users.upsert("o", "di@example.com", {"meta": {"a": 1, "b": {"c": 1}, "gone": True}})
    assert user["meta"] == {"a": 1, "b": {"c": 1}, "gone": True}
    _, user = users.upsert("o", "di@example.com", {"meta": {"b": {"d": 2}, "gone": None}})
    assert user["meta"] == {"a": 1, "b": {"c": 1, "d": 2}}
    user = users.patch(user["id"], {"meta": {"a": None, "e": [1]}})
    assert user["meta"] == {"b": {"c": 1, "d": 2}, "e": [1]}
    _, user = users.upsert("o", "di@example.com", {"name": "Di"})  # no meta given: left as it is
    assert user["meta"] == {"b": {"c": 1, "d": 2}, "e": [1]}


def test_profiles_belong_to_their_owner(users):
    _, mine = users.upsert("o", "eve@example.com", {"name": "Mine"})
    created, theirs = users.upsert("p", "eve@example.com", {"name": "Theirs"})
    assert created is True and theirs["id"] != mine["id"]
    assert users.get_by_email("eve@example.com", "o")["name"] == "Mine"
    assert users.get(mine["id"], "p") is None and users.get(mine["id"]) == mine
    assert users.patch(mine["id"], {"name": "Stolen"}, "p") is None
    assert users.get(mine["id"])["name"] == "Mine"


def test_meta_limits_hold_for_the_merged_result(users):
    _, user = users.upsert("o", "fay@example.com", {"meta": {f"k{i}": i for i in range(100)}})
    with pytest.raises(storage.MetaTooLarge):
        users.patch(user["id"], {"meta": {"one-more": 1}})
    with pytest.raises(storage.MetaTooLarge):
        users.upsert("o", "fay@example.com", {"name": "Fay", "meta": {"x" * 20: "y" * 16_000}})
    assert users.get(user["id"]) == user  # nothing written
    assert len(users.patch(user["id"], {"meta": {"k0": None, "new": 1}})["meta"]) == 100


# ---------------------------------------------------------------------------
# KeyStore
# ---------------------------------------------------------------------------


def test_create_lookup_list_revoke(keys, clock):
    record, secret = keys.create("ci", "worker", daily_budget=5_000_000, rate_per_minute=60)
    assert secret.startswith("lq_") and record["prefix"] == secret[:11]
    assert secret not in str(record) and record["revoked_at"] is None
    assert (record["name"], record["role"], record["daily_budget"], record["rate_per_minute"]) == \
           ("ci", "worker", 5_000_000, 60)
    clock.advance(1)
    other, other_secret = keys.create("app", "client")
    found = keys.lookup(secret)
    assert found["id"] == record["id"] and found["role"] == "worker"
    assert keys.lookup(secret + "x") is None and keys.lookup("lq_nothing") is None
    listed = keys.list()
    assert [k["id"] for k in listed] == [record["id"], other["id"]]
    assert listed[0]["last_used_at"] == clock()  # the lookup was noted
    assert all(secret not in str(k) for k in listed)
    clock.advance(1)
    revoked = keys.revoke(record["id"])
    assert revoked["id"] == record["id"] and revoked["revoked_at"] == clock()
    assert keys.lookup(secret) is None and keys.lookup(other_secret)["id"] == other["id"]
    clock.advance(1)
    assert keys.revoke(record["id"])["revoked_at"] == revoked["revoked_at"]
    assert keys.revoke("key_nosuchkey") is None
    assert [k["revoked_at"] is not None for k in keys.list()] == [True, False]
    assert keys.get(record["id"])["revoked_at"] == revoked["revoked_at"]  # revoked or not
    assert keys.get(other["id"])["name"] == "app" and keys.get("key_nosuchkey") is None


# ---------------------------------------------------------------------------
# AuditLog
# ---------------------------------------------------------------------------


def test_audit_rows_and_counters_are_written_by_flush_and_counted(recorder_backend, clock):
    rec = recorder_backend.recorder()
    for status in (403, 429):  # refusals ride along with the next batch
        rec.audit("k", "POST", "/api/v1/intake", status, "req-1")
    rec.count("jobs")
    rec.count("jobs")
    rec.count("finished")
    assert rec.pending() == 2
    before = rec.metrics()  # not flushed yet, already counted
    assert (before["jobs_today"], before["finished_today"], before["audit_coverage"]) == (2, 1, 100.0)
    rec.flush()
    assert rec.pending() == 0
    after = recorder_backend.recorder().metrics()  # another process reads what was written
    assert (after["jobs_today"], after["finished_today"], after["audit_coverage"]) == (2, 1, 100.0)
    assert after["uptime_rolling_7d"] == 100.0 and after["last_updated"] == int(clock())


def test_an_accepted_change_returns_once_its_audit_row_is_written(recorder_backend):
    rec = recorder_backend.recorder()
    rec.audit("k", "POST", "/api/v1/intake", 202, "no-writer")  # no writer thread: written here
    assert rec.pending() == 0
    rec.start()
    try:
        results = race(8, lambda i: rec.audit("k", "POST", "/api/v1/intake", 201, f"req-{i}"))
        assert results == [None] * 8 and rec.pending() == 0  # every row on disk on return
    finally:
        rec.stop()
    assert recorder_backend.recorder().metrics()["audit_coverage"] == 100.0


def test_changes_accepted_while_a_batch_is_written_share_the_next(recorder_backend):
    # Group commit: a caller writes its own row when nothing is being
    # written; the ones that arrive meanwhile go together in one more.
    rec = recorder_backend.recorder()
    db, writes = rec.db, []

    @contextlib.contextmanager
    def slow_write():
        writes.append(1)
        with db.write() as conn:
            yield conn
            time.sleep(0.05)  # a slow disk: everyone else arrives meanwhile

    def slow_write_one(sql, params=()):
        with slow_write() as conn:
            conn.execute(sql, params)

    rec.db = types.SimpleNamespace(write=slow_write, write_one=slow_write_one, checkpoint=db.checkpoint,
                                   query=db.query)
    rec.start()
    try:
        results = race(16, lambda i: rec.audit("k", "POST", "/api/v1/intake", 202, f"req-{i}"))
    finally:
        rec.stop()
    assert results == [None] * 16 and rec.pending() == 0
    assert db.query("SELECT COUNT(*) AS n FROM audit_log")[0]["n"] == 16
    assert len(writes) <= 4  # not one transaction per change


def test_a_waiting_change_writes_its_audit_row_and_the_writer_the_counters(recorder_backend):
    # The request waits for its audit row only; the minute's counters are
    # the writer thread's, every interval (a transaction per request less).
    rec = recorder_backend.recorder()
    rec.count("jobs")
    rec.audit("k", "POST", "/api/v1/intake", 202, "req-c")
    assert rec.pending() == 0  # the row is on disk
    other = recorder_backend.recorder()  # what another process reads
    assert other.metrics()["jobs_today"] == 0 and rec.metrics()["jobs_today"] == 1
    rec.interval = 0.02
    rec.start()
    try:
        deadline = time.monotonic() + 10
        while other.metrics()["jobs_today"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert other.metrics()["jobs_today"] == 1
    finally:
        rec.stop()


def test_a_batch_writes_a_row_per_path_together(recorder_backend):
    rec = recorder_backend.recorder()
    rec.audit_many("k", "POST", [f"/api/v1/intake/batch#{i}" for i in range(3)], 202, "req-b")
    assert rec.pending() == 0  # accepted: on disk on return
    rec.audit_many("k", "POST", [], 200, "req-empty")  # nothing changed: no row
    assert recorder_backend.recorder().metrics()["audit_coverage"] == 100.0
    rows = recorder_backend.db.query("SELECT path FROM audit_log WHERE request_id = 'req-b' ORDER BY path")
    assert [r["path"] for r in rows] == [f"/api/v1/intake/batch#{i}" for i in range(3)]


def test_the_background_writer_starts_and_stop_flushes(recorder):
    recorder.count("jobs")
    recorder.start()
    assert recorder.running is True
    recorder.stop()
    assert recorder.running is False and recorder.pending() == 0
    assert recorder.metrics()["jobs_today"] == 1
