"""Several hosts on one PostgreSQL database (DATABASE_URL): three gunicorn
masters, each on its own port, share one queue, one ledger and one budget.

Jobs submitted anywhere run exactly once wherever they are taken; a host
killed with -9 loses no job (its leases run out and the others take the
jobs over); the day budget holds under a race from every host at once; and
the hosts ride out a restart of PostgreSQL by themselves."""

import collections
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import requests

from support import KEY, Server, free_port, postgres_url, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

HEADERS = {"X-Api-Key": KEY}
HOSTS = 3
# Every request here comes from 127.0.0.1: rate limits out of the way. One
# worker process per host keeps three hosts' connection pools well inside
# PostgreSQL's default max_connections.
FAST = {"API_KEYS": KEY, "RATE_BURST": 100_000, "RATE_GLOBAL": 100_000, "RATE_READ": 100_000,
        "RATE_WORKER": 100_000, "MAX_COST_PER_DAY": 1_000_000, "WEB_CONCURRENCY": 1,
        "THREADS": 8, "CALLBACK_THREADS": 1, "SWEEP_INTERVAL": 0.1}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def hosts(tmp_path, **env):
    """Three gunicorn masters on the same DATABASE_URL, started together (so
    they also race to migrate the schema) and stopped together afterwards."""
    servers = [Server(tmp_path, **{**FAST, **env}) for _ in range(HOSTS)]
    try:
        with concurrent.futures.ThreadPoolExecutor(HOSTS) as pool:
            list(pool.map(lambda srv: srv.start(timeout=30), servers))
        yield servers
    finally:
        with concurrent.futures.ThreadPoolExecutor(HOSTS) as pool:
            list(pool.map(lambda srv: srv.stop(), servers))


_local = threading.local()


def session():
    """A requests.Session for the calling thread (sessions are not thread-safe)."""
    if getattr(_local, "session", None) is None:
        _local.session = requests.Session()
    return _local.session


def intake(url, workflow, payload, timeout=10, **fields):
    return session().post(url + "/api/v1/intake", json={"workflow": workflow, "payload": payload,
                                                        **fields},
                          headers=HEADERS, timeout=timeout)


def submitted(url, workflow, payload):
    """Submit a job; its id. Anything but 202 fails the test."""
    r = intake(url, workflow, payload)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def claim(url, workflows, lease_seconds):
    """The job an external worker is handed, or None (204: nothing to claim)."""
    r = session().post(url + "/api/v1/jobs/claim", json={"workflows": workflows,
                                                         "lease_seconds": lease_seconds},
                       headers=HEADERS, timeout=10)
    if r.status_code == 204:
        return None
    assert r.status_code == 200, r.text
    return r.json()["job"]


def complete(url, job_id, token, result):
    return session().post(url + f"/api/v1/jobs/{job_id}/complete",
                          json={"lease_token": token, "result": result}, headers=HEADERS, timeout=10)


def status(url, job_id):
    r = session().get(url + f"/api/v1/status/{job_id}", timeout=10)
    assert r.status_code == 200, (job_id, r.status_code, r.text)
    return r.json()


def statuses(urls, job_ids):
    """{job_id: status view}, read through all the hosts in turn, in parallel."""
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        views = pool.map(lambda pair: status(urls[pair[0] % len(urls)], pair[1]), enumerate(job_ids))
        return dict(zip(job_ids, views))


def sql(url, query, params=None):
    """Rows of one query, read straight from the database the hosts share."""
    import psycopg
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(query, params).fetchall()


def counts_by_status(url):
    return dict(sql(url, "SELECT status, count(*) FROM jobs GROUP BY status"))


# ---------------------------------------------------------------------------
# 1. One queue, three hosts: every job runs exactly once
# ---------------------------------------------------------------------------


def test_2000_jobs_across_three_hosts_each_run_exactly_once(tmp_path):
    url = postgres_url()
    with hosts(tmp_path, DATABASE_URL=url) as servers:
        urls = [s.url for s in servers]
        total = 2000
        # Even numbers run in-process (every host's pool takes "echo"), odd
        # ones on external workers.
        plan = {i: ("echo" if i % 2 == 0 else "ext.work") for i in range(total)}
        claims = collections.Counter()   # job id -> times handed out, over all hosts
        claimed_via = collections.Counter()  # host index -> claims it answered
        completed = set()
        lock = threading.Lock()
        stop = threading.Event()

        def external_worker(host):
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                job = claim(urls[host], ["ext.work"], 60)
                if job is None:
                    time.sleep(0.05)
                    continue
                with lock:
                    claims[job["job_id"]] += 1
                    claimed_via[host] += 1
                r = complete(urls[host], job["job_id"], job["lease_token"],
                             {"i": job["payload"]["i"], "host": host})
                assert r.status_code == 200, r.text
                with lock:
                    completed.add(job["job_id"])

        with concurrent.futures.ThreadPoolExecutor(2 * HOSTS) as workers, \
                concurrent.futures.ThreadPoolExecutor(12) as writers:
            running = [workers.submit(external_worker, h % HOSTS) for h in range(2 * HOSTS)]
            try:
                ids = list(writers.map(lambda i: submitted(urls[i % HOSTS], plan[i], {"i": i}),
                                       range(total)))
                wait_until(lambda: len(completed) >= total // 2 or any(f.done() for f in running),
                           90, 0.1)
            finally:
                stop.set()
            for f in running:
                f.result()  # a worker's failed assertion fails the test here
        job_of = dict(zip(ids, range(total)))
        external = {j for j, i in job_of.items() if plan[i] == "ext.work"}

        # Each external job was handed out once, and only once, over all hosts.
        assert len(ids) == len(set(ids)) == total
        assert len(completed) == len(external), f"{len(completed)} of {len(external)} completed"
        assert set(claims) == external and set(claims.values()) == {1}
        assert sorted(claimed_via) == list(range(HOSTS)), claimed_via

        # The in-process ones finish on whichever host's pool took them.
        wait_until(lambda: counts_by_status(url).get("succeeded") == total, 60, 0.2)
        assert counts_by_status(url) == {"succeeded": total}
        for job_id, view in statuses(urls, ids).items():
            i = job_of[job_id]
            assert view["status"] == "succeeded" and view["attempts"] == 1, view
            if plan[i] == "echo":
                assert view["result"] == {"i": i}, view
            else:
                assert view["result"]["i"] == i, view


# ---------------------------------------------------------------------------
# 2. kill -9 one host: its leased jobs come back and finish elsewhere, once
# ---------------------------------------------------------------------------


def test_a_killed_hosts_leases_run_out_and_other_hosts_finish_its_jobs_once(tmp_path):
    url = postgres_url()
    with hosts(tmp_path, DATABASE_URL=url) as (a, b, c):
        total, held_count, short_lease = 150, 15, 3
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(lambda i: submitted((a, b, c)[i % HOSTS].url, "ext.work", {"i": i}),
                                range(total)))

        # Host A hands out leases that nobody completes...
        held = {}
        for _ in range(held_count):
            job = claim(a.url, ["ext.work"], short_lease)
            assert job is not None and job["attempt"] == 1
            held[job["job_id"]] = job

        handed_out = collections.defaultdict(list)  # job id -> [(attempt, lease_expires_at)]
        seen_running = {}  # held job id -> its status between re-claim and completion
        finished = collections.Counter()  # job id -> completions that were accepted
        lock = threading.Lock()

        def worker(srv):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    if len(finished) == total:
                        return
                job = claim(srv.url, ["ext.work"], 30)
                if job is None:
                    time.sleep(0.05)
                    continue
                with lock:
                    handed_out[job["job_id"]].append((job["attempt"], job["lease_expires_at"]))
                if job["job_id"] in held:
                    seen_running[job["job_id"]] = status(srv.url, job["job_id"])
                r = complete(srv.url, job["job_id"], job["lease_token"], {"by": srv.url})
                assert r.status_code == 200, r.text
                with lock:
                    finished[job["job_id"]] += 1

        # ...and dies while the other hosts are busy with the rest of the queue.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(worker, srv) for srv in (b, c, b, c)]
            a.kill()
            with pytest.raises(requests.ConnectionError):
                requests.get(a.url + "/health", timeout=2)
            for f in running:
                f.result()  # each returns once every job has finished, or fails

        assert sorted(finished) == sorted(ids) and set(finished.values()) == {1}
        for job_id in ids:
            if job_id not in held:
                assert [attempt for attempt, _ in handed_out[job_id]] == [1]
                continue
            # A's job was handed out again once, as its second attempt, when
            # its lease had run out and within seconds of it (every host reads
            # the database's clock, so these times compare)...
            (attempt, expires), = handed_out[job_id]
            came_back_after = (expires - 30) - held[job_id]["lease_expires_at"]
            assert attempt == 2 and -0.1 <= came_back_after < 10, (attempt, came_back_after)
            # ...after the sweep of a live host had queued it again, saying why.
            again = seen_running[job_id]
            assert again["status"] == "running" and again["attempts"] == 2
            assert again["error"]["type"] == "lease_expired" and again["error"]["attempts"] == 1

        # The dead host's lease is worth nothing now: its result is refused
        # and the job keeps the one it has.
        for n, (job_id, job) in enumerate(held.items()):
            r = complete((b, c)[n % 2].url, job_id, job["lease_token"], {"by": "a"})
            assert r.status_code == 409 and r.json()["error"] == "lease_lost", r.text
        views = statuses([b.url, c.url], ids)
        for job_id, view in views.items():
            assert view["status"] == "succeeded" and view["result"]["by"] in (b.url, c.url), view
            assert view["attempts"] == (2 if job_id in held else 1), view


# ---------------------------------------------------------------------------
# 3. One day budget for all hosts, under a 300-way race
# ---------------------------------------------------------------------------


def test_the_day_budget_holds_under_concurrent_intakes_on_every_host(tmp_path):
    url = postgres_url()  # a schema of its own: no other test's spend counts here
    with hosts(tmp_path, DATABASE_URL=url, MAX_COST_PER_DAY="1.00") as servers:
        urls = [s.url for s in servers]
        start = threading.Barrier(30, timeout=30)

        def attempt(n):
            if n < 30:
                start.wait()  # the first wave leaves together
            r = intake(urls[n % HOSTS], "ext.x", {}, max_cost=0.1)
            return r.status_code, r.json().get("error")

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(attempt, range(300)))

        # $1.00 holds ten jobs capped at $0.10: ten accepted, every other refused.
        assert collections.Counter(answers) == {(202, None): 10, (429, "budget_exceeded"): 290}
        service = sql(url, "SELECT day, used FROM ledger_days WHERE key_id = '*'")
        assert [used for _, used in service] == [1_000_000], service
        held = sql(url, "SELECT CAST(COALESCE(SUM(reserved + spent), 0) AS bigint), count(*)"
                        " FROM ledger_jobs")
        assert held == [(1_000_000, 10)]
        assert sql(url, "SELECT count(*) FROM jobs") == [(10,)]


# ---------------------------------------------------------------------------
# 4. PostgreSQL restarts under load: 503s meanwhile, then the hosts recover
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def private_postgres():
    """A PostgreSQL server of the test's own: initdb in a fresh directory, on a
    free loopback port; yields (url, restart). The machine's server is shared
    with the tests running alongside on the other xdist worker, and restarting
    it failed one of theirs mid-run, so this test restarts only its own."""
    bindir = f"/usr/lib/postgresql/{sorted(os.listdir('/etc/postgresql'))[-1]}/bin"
    top = tempfile.mkdtemp(prefix="levqor-pg-")  # /tmp: tmp_path is closed to other users
    data, port = os.path.join(top, "data"), free_port()
    shutil.chown(top, "postgres", "postgres")

    def pg_ctl(*args):
        done = subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir}/pg_ctl", "-D", data,
                               "-l", os.path.join(top, "log"), "-w", "-t", "60", *args],
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
    try:
        made = subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir}/initdb", "-D", data,
                               "-U", "postgres", "--auth=trust", "--no-sync"],
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        pg_ctl("-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={top}",
               "start")
        yield (f"postgresql://postgres@127.0.0.1:{port}/postgres",
               lambda: pg_ctl("-m", "fast", "restart"))  # drops every connection
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(top, ignore_errors=True)


def test_hosts_answer_503_while_postgres_restarts_and_recover_by_themselves(tmp_path):
    if not os.path.isdir("/etc/postgresql") or shutil.which("runuser") is None:
        pytest.skip("a PostgreSQL server of the test's own needs its binaries and runuser")
    if os.geteuid() != 0:
        pytest.skip("running a PostgreSQL server as its own user needs root")
    with private_postgres() as (url, restart_postgres):
        with hosts(tmp_path, DATABASE_URL=url) as servers:
            urls = [s.url for s in servers]
            acknowledged = []
            refusals = collections.Counter()  # (status, error, Retry-After), or what was raised
            stop = threading.Event()

            def writer(n):
                for i in range(100_000):  # bounded; stopped long before
                    if stop.is_set():
                        return
                    try:
                        r = intake(urls[n % HOSTS], "ext.pg", {"w": n, "i": i}, timeout=15)
                    except requests.ConnectionError:
                        refusals["connection error"] += 1
                        time.sleep(0.05)
                        continue
                    except requests.RequestException as exc:  # a hang is not an answer
                        refusals[type(exc).__name__] += 1
                        continue
                    if r.status_code == 202:
                        acknowledged.append(r.json()["job_id"])
                        continue
                    json_body = r.headers.get("Content-Type") == "application/json"
                    refusals[r.status_code, r.json().get("error") if json_body else r.text[:80],
                             r.headers.get("Retry-After")] += 1
                    time.sleep(0.02)  # do not spin while the database is away

            threads = [threading.Thread(target=writer, args=(n,)) for n in range(2 * HOSTS)]
            for t in threads:
                t.start()
            try:
                assert wait_until(lambda: len(acknowledged) >= 150, 30, 0.05)
                restart_postgres()
                back = time.monotonic()
                time.sleep(2)  # the writers go on against the server that is back
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            assert not any(t.is_alive() for t in threads)

            # Every host comes back by itself, unrestarted, within 15 s of
            # PostgreSQL: /health, and a new intake each.
            def recovered(srv):
                try:
                    return (session().get(srv.url + "/health", timeout=5).status_code == 200
                            and intake(srv.url, "ext.pg", {"after": True}, timeout=5).status_code == 202)
                except requests.RequestException:
                    return False

            for srv in servers:
                left = max(0.0, back + 15 - time.monotonic())
                assert wait_until(lambda: recovered(srv), left, 0.2), srv.log()[-3000:]

            # The outage was seen, and it was never worse than "the database
            # is unavailable, retry in 5 s" (or a refused connection).
            assert refusals, "the restart went unnoticed: nothing was refused"
            assert set(refusals) <= {(503, "storage_unavailable", "5"), "connection error"}, refusals
            for srv in servers:
                assert '"unhandled exception"' not in srv.log()

            # No acknowledged intake was lost with the connections, and none was half-written.
            views = statuses(urls, acknowledged)
            assert all(v["status"] == "queued" for v in views.values())
            assert set(acknowledged) <= {row[0] for row in sql(url, "SELECT job_id FROM jobs")}
            held, rows = sql(url, "SELECT (SELECT n FROM job_count), (SELECT count(*) FROM jobs)")[0]
            assert held == rows
