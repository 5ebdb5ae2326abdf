"""Real gunicorn on loopback, driven the way a user would drive it."""

import contextlib
import os
import queue
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

import storage
from support import KEY, ROOT, Server, store_env, wait_until

pytestmark = pytest.mark.server


def run_script(args, env, timeout=60):
    return subprocess.run(args, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_validation_script_goes_green_against_gunicorn(server):
    result = run_script([sys.executable, "scripts/validate_levqor.py"],
                        {"BASE_URL": server.url, "API_KEY": KEY})
    assert result.returncode == 0, result.stdout + result.stderr + server.log()
    assert "🟢 COCKPIT GREEN — Levqor backend validated" in result.stdout


def test_validation_script_names_the_failing_check(server):
    result = run_script([sys.executable, "scripts/validate_levqor.py"],
                        {"BASE_URL": server.url, "API_KEY": "not-the-key-000000000"})
    assert result.returncode == 1
    assert "FAILED — ops health: expected 200, got 403" in result.stdout


def test_gunicorn_serves_head_options_and_json_errors(server):
    head = requests.head(server.url + "/health", timeout=5)
    assert head.status_code == 200 and head.content == b""
    r = requests.get(server.url + "/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = requests.post(server.url + "/api/v1/intake", data=b"x" * 600_000,
                      headers={"X-Api-Key": KEY, "Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    wait_until(lambda: '"path":"/nope"' in server.log(), 5)  # access lines go out every 0.25 s
    log = server.log()
    assert '"path":"/nope"' in log and KEY not in log


def test_kill_9_loses_no_acknowledged_upsert(tmp_path):
    """Upserts race against a SIGKILL; every one acknowledged is there after restart."""
    server = Server(tmp_path, API_KEYS=KEY, RATE_BURST=100000, RATE_GLOBAL=100000).start()
    acknowledged = []
    stop = threading.Event()

    def writer(n):
        session = requests.Session()
        i = 0
        while not stop.is_set() and i < 2000:  # bounded even if the kill never lands
            email = f"w{n}-{i}@example.com"
            try:
                r = session.post(server.url + "/api/v1/users/upsert", json={"email": email},
                                 headers={"X-Api-Key": KEY}, timeout=5)
            except requests.RequestException:
                return
            if r.status_code == 201:
                acknowledged.append((email, r.json()["user"]["id"]))
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 200, 20, 0.02)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acknowledged) >= 200, server.log()

    db_path = tmp_path / "levqor.db"
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    restarted = Server(tmp_path, API_KEYS=KEY).start()
    try:
        conn = sqlite3.connect(db_path)
        stored = dict(conn.execute("SELECT email, id FROM users"))
        missing = [email for email, uid in acknowledged if stored.get(email) != uid]
        assert missing == []
        email, uid = acknowledged[-1]
        r = requests.get(restarted.url + f"/api/v1/users/{uid}", headers={"X-Api-Key": KEY}, timeout=5)
        assert r.status_code == 200 and r.json()["email"] == email
    finally:
        restarted.stop()


def test_backup_is_consistent_while_the_service_writes(server, tmp_path):
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 5000:
            requests.post(server.url + "/api/v1/users/upsert", json={"email": f"b{i}@example.com"},
                          headers={"X-Api-Key": KEY}, timeout=5)
            i += 1

    for _ in range(20):  # a few rows before the backup starts
        requests.post(server.url + "/api/v1/users/upsert", json={"email": f"pre{_}@example.com"},
                      headers={"X-Api-Key": KEY}, timeout=5)
    t = threading.Thread(target=writer)
    t.start()
    try:
        result = run_script(["bash", "scripts/backup_db.sh", str(tmp_path / "levqor.db")],
                            {"BACKUP_DIR": str(tmp_path / "backups"), "PYTHON": sys.executable})
    finally:
        stop.set()
        t.join(timeout=30)
    assert result.returncode == 0, result.stderr
    backup = result.stdout.strip().splitlines()[-1]
    assert os.path.basename(backup).startswith("levqor-") and backup.endswith(".db")
    conn = sqlite3.connect(backup)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM users WHERE email LIKE 'pre%'").fetchone()[0] == 20


def test_backup_of_a_missing_database_fails_clearly(tmp_path):
    result = run_script(["bash", "scripts/backup_db.sh", str(tmp_path / "nope.db")],
                        {"BACKUP_DIR": str(tmp_path / "b")})
    assert result.returncode == 1 and "no database" in result.stderr


def test_production_without_keys_does_not_start(tmp_path):
    srv = Server(tmp_path, LEVQOR_ENV="production")
    try:
        srv.start(timeout=15)
    except RuntimeError as exc:
        assert "API_KEYS" in str(exc)
    else:
        srv.stop()
        raise AssertionError("gunicorn served without API keys in production")


def test_external_worker_and_in_process_workflows_side_by_side(tmp_path):
    """Through real gunicorn: scripts/example_worker.py claims, heartbeats and
    completes 'uppercase' jobs while the pool runs demo.flow jobs beside it."""
    srv = Server(tmp_path, API_KEYS=KEY, RATE_BURST=1000, RATE_GLOBAL=1000).start()
    try:
        session = requests.Session()
        session.headers["X-Api-Key"] = KEY

        def submit(workflow, payload):
            r = session.post(srv.url + "/api/v1/intake", json={"workflow": workflow,
                                                               "payload": payload}, timeout=5)
            assert r.status_code == 202, r.text
            return r.json()["job_id"]

        external = [submit("uppercase", {"word": f"hello {i}"}) for i in range(8)]
        failing = submit("uppercase", {"fail": True})
        local = [submit("demo.flow", {"text": f"some words number {i}"}) for i in range(8)]
        worker = subprocess.Popen(
            [sys.executable, "scripts/example_worker.py", "uppercase", "--lease", "3",
             "--idle-exit", "2"], cwd=ROOT, env={**os.environ, "BASE_URL": srv.url, "API_KEY": KEY},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, out

        def status(job_id):
            return session.get(srv.url + f"/api/v1/status/{job_id}", timeout=5).json()

        wait_until(lambda: all(status(j)["status"] == "succeeded" for j in local), 20, 0.1)
        for i, job_id in enumerate(external):
            s = status(job_id)
            assert s["status"] == "succeeded" and s["result"] == {"word": f"HELLO {i}"}, s
        s = status(failing)
        assert s["status"] == "failed" and "asked to fail" in s["error"]["message"]
        for job_id in local:
            s = status(job_id)
            assert s["status"] == "succeeded" and s["result"]["total_words"] == 4, s
        assert "worker stopped after 9 jobs" in out
    finally:
        srv.stop()


def test_sigterm_lets_a_running_job_finish(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY).start()
    r = requests.post(srv.url + "/api/v1/intake", json={"workflow": "sleep", "payload": {"seconds": 1}},
                      headers={"X-Api-Key": KEY}, timeout=5)
    job_id = r.json()["job_id"]
    assert wait_until(lambda: requests.get(srv.url + f"/api/v1/status/{job_id}",
                                           timeout=5).json()["status"] == "running", 10, 0.02)
    srv.stop()  # SIGTERM
    log = srv.log()
    assert '"msg":"job engine stopped"' in log and '"running_abandoned":[]' in log, log


# -- waiting claims across processes ----------------------------------------------------------


@contextlib.contextmanager
def _watching(tmp_path):
    """Two connections to one SQLite file, the first one's watch on:
    (the other, an Event its wake sets, the first)."""
    woken = threading.Event()
    path = str(tmp_path / "w.db")
    mine, other = storage.Database(path, shared=True), storage.Database(path, shared=True)
    mine.query("SELECT 1")
    mine.watch(lambda workflow, ended=False: woken.set())
    try:
        yield other, woken, mine
    finally:
        mine.close()


@contextlib.contextmanager
def _hearing(tmp_path):
    """As _watching, with what the watch is told put in a queue, as
    (workflow, ended): (the other, that queue, the first)."""
    heard = queue.Queue()
    path = str(tmp_path / "w.db")
    mine, other = storage.Database(path, shared=True), storage.Database(path, shared=True)
    mine.query("SELECT 1")
    mine.watch(lambda workflow, ended=False: heard.put((workflow, ended)))
    try:
        yield other, heard, mine
    finally:
        other.close()
        mine.close()


def test_a_commit_by_another_connection_wakes_the_sqlite_watch(tmp_path):
    with _watching(tmp_path) as (other, woken, _):
        time.sleep(0.1)
        assert not woken.is_set()
        with other.write() as conn:
            conn.execute("CREATE TABLE t (x)")
        assert woken.wait(5)


def _bound(folder, limit=5.0, count=1):
    """The wake sockets in ``folder``, once there are ``count`` (or [] at ``limit``)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = list(folder.glob("*")) if folder.exists() else []
        if len(found) >= count:
            return found
        time.sleep(0.01)
    return []


def test_an_announce_wakes_the_sqlite_watch_before_its_next_look(tmp_path, monkeypatch):
    # The watch looks at data_version only every 60 s here: what wakes it
    # within the test's bound can only be the announce's datagram.
    monkeypatch.setattr(storage.Changes, "EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "IDLE_EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "DOUBT_EVERY", 60.0)
    with _watching(tmp_path) as (other, woken, _):
        assert len(_bound(tmp_path / "w.db-wake")) == 1
        assert not woken.wait(0.1)
        other.announce()
        assert woken.wait(5)
        started = time.monotonic()
    assert time.monotonic() - started < 2  # its stop ends the wait at once
    assert not list((tmp_path / "w.db-wake").glob("*"))  # and its socket is gone


def test_an_announce_tells_the_watch_whose_jobs_were_queued_or_ended(tmp_path, monkeypatch):
    """The datagram names the workflow of each job queued, or ended, so
    the process that hears it wakes only what waits for that workflow.
    What is held back (within ANNOUNCE_EVERY of the last) goes in the next
    datagram; more than NEWS_MAX names, or an announce of no workflow,
    is news of anything (``wake(None)``)."""
    monkeypatch.setattr(storage.Changes, "EVERY", 60.0)  # only datagrams wake it here
    monkeypatch.setattr(storage.Changes, "IDLE_EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "DOUBT_EVERY", 60.0)
    monkeypatch.setattr(storage.Database, "ANNOUNCE_EVERY", 0.3)

    def one_datagram(heard):
        got = [heard.get(timeout=5)]
        time.sleep(0.05)
        while not heard.empty():
            got.append(heard.get())
        return got

    with _hearing(tmp_path) as (other, heard, _):
        assert len(_bound(tmp_path / "w.db-wake")) == 1
        other.announce("reports.daily")
        assert one_datagram(heard) == [("reports.daily", False)]
        other.announce("reports.daily", ended=True)  # held back, as are the next two
        other.announce("mail.send")
        other.announce("mail.send")
        assert other.owes_announce and heard.empty()
        time.sleep(0.35)
        other.announce("images.resize")
        assert one_datagram(heard) == [("reports.daily", True), ("images.resize", False), ("mail.send", False)]
        for i in range(storage.NEWS_MAX + 1):
            other.announce(f"w{i}")
        time.sleep(0.35)
        other.send_news()
        assert one_datagram(heard) == [(None, False)]  # too many to name: anything
        time.sleep(0.35)
        other.announce()
        assert one_datagram(heard) == [(None, False)]


def test_news_explains_the_commit_it_comes_with(tmp_path, monkeypatch):
    """A process commits, then tells: the watch that hears it sees the
    commit too, and wakes only what waits for the workflow named, not
    everything (it did both for every announce, so the selective wake
    saved nothing on a host that was not busy). A commit that comes with
    no news still wakes everything."""
    monkeypatch.setattr(storage.Changes, "EVERY", 60.0)  # it looks when a datagram comes
    monkeypatch.setattr(storage.Changes, "IDLE_EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "DOUBT_EVERY", 60.0)
    with _hearing(tmp_path) as (other, heard, _):
        assert len(_bound(tmp_path / "w.db-wake")) == 1
        with other.write() as conn:
            conn.execute("CREATE TABLE t (x)")
        for _ in range(3):
            with other.write() as conn:
                conn.execute("INSERT INTO t VALUES (1)")
            other.announce("mail.send")
            assert heard.get(timeout=5) == ("mail.send", False)
            time.sleep(other.ANNOUNCE_EVERY + 0.05)
        assert heard.empty()  # no wake of everything
        with other.write() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
        other.announce()  # no workflow named: anything
        assert heard.get(timeout=5) == (None, False)


def test_a_datagram_cut_short_is_news_of_anything(tmp_path, monkeypatch):
    """A datagram longer than the watch reads loses its end unseen, and its
    last line, cut, would name another workflow: it is taken for news of
    anything."""
    monkeypatch.setattr(storage.Changes, "EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "IDLE_EVERY", 60.0)
    monkeypatch.setattr(storage.Changes, "DOUBT_EVERY", 60.0)
    with _hearing(tmp_path) as (_, heard, _):
        (wake,) = _bound(tmp_path / "w.db-wake")
        lines = [storage.NEWS_HEAD] + [f"q reports.w{i:06d}" for i in range(400)]  # cut mid-name
        message = "\n".join(lines).encode()
        assert len(message) > storage.NEWS_BYTES
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(message, str(wake))
        assert heard.get(timeout=5) == (None, False)
        time.sleep(0.1)
        assert heard.empty()


def test_news_a_full_queue_refused_goes_again(tmp_path):
    """A watcher's socket queues only a few datagrams; news that found it
    full is kept and sent again, not lost."""
    folder = tmp_path / "w.db-wake"
    folder.mkdir(mode=0o700)
    full = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    full.bind(str(folder / "1-full"))
    full.setblocking(False)
    db = storage.Database(str(tmp_path / "w.db"), shared=True)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            with pytest.raises(BlockingIOError):
                for _ in range(10_000):
                    filler.sendto(b"!", str(folder / "1-full"))
        db.announce("mail.send")
        assert db.owes_announce
        with contextlib.suppress(BlockingIOError):
            while True:
                full.recv(storage.NEWS_BYTES)
        time.sleep(db.ANNOUNCE_EVERY * 2)
        db.send_news()
        assert storage.news_heard(full.recv(storage.NEWS_BYTES)) == {("q", "mail.send")}
        assert not db.owes_announce
    finally:
        full.close()


def test_a_datagram_that_is_not_news_in_levqors_words_is_news_of_anything():
    news = {("q", "a.b"), ("e", "c-d:e")}
    assert storage.news_heard(storage.news_message(news)) == news
    for message in (b"!", b"", b"levqor-news 1\nx a", b"levqor-news 1\nq", b"levqor-news 2\nq a",
                    "levqor-news 1\nq a\n\u00ff".encode("latin-1")):
        assert storage.news_heard(message) is None, message


def _version_reads(monkeypatch):
    """When each watch read data_version from now on (a list that grows)."""
    reads = []
    real_query = storage.Database.query

    def query(self, sql, *args, **kwargs):
        if "data_version" in sql:
            reads.append(time.monotonic())
        return real_query(self, sql, *args, **kwargs)

    monkeypatch.setattr(storage.Database, "query", query)
    return reads


def test_a_quiet_sqlite_watch_reads_seldom_and_still_sees_a_commit(tmp_path, monkeypatch):
    """Once nothing changed for QUIET seconds, the watch reads data_version
    every IDLE_EVERY (an idle process spent 3-4 % of a core reading it every
    5 ms); a commit by another connection, which sends no datagram, still
    wakes it, and the quick reads start again."""
    monkeypatch.setattr(storage.Changes, "QUIET", 0.2)
    monkeypatch.setattr(storage.Database, "PEERS_EVERY", 0.2)  # a new watch's quick reads end
    reads = _version_reads(monkeypatch)

    def reads_within(seconds):
        start = time.monotonic()
        time.sleep(seconds)
        return len([t for t in reads if t >= start])

    with _watching(tmp_path) as (other, woken, _):
        time.sleep(0.4)  # past QUIET
        assert reads_within(0.5) <= 0.5 / storage.Changes.IDLE_EVERY + 2  # not 100
        with other.write() as conn:
            conn.execute("CREATE TABLE t (x)")
        assert woken.wait(5)
        assert reads_within(0.15) > 0.15 / storage.Changes.IDLE_EVERY + 2


def test_an_announce_held_back_is_sent_by_the_senders_own_watch(tmp_path, monkeypatch):
    """A second announce within ANNOUNCE_EVERY (3 s here) of the first is
    not dropped: the sender's watch sends it once that time has passed.
    (The receiver here reads data_version only every 60 s: only a datagram
    wakes it.)"""
    monkeypatch.setattr(storage.Database, "ANNOUNCE_EVERY", 3.0)
    with _watching(tmp_path) as (other, woken, mine):
        assert len(_bound(tmp_path / "w.db-wake")) == 1
        mine._changes.EVERY = mine._changes.IDLE_EVERY = mine._changes.DOUBT_EVERY = 60.0  # from its next wait on
        other.watch(lambda workflow, ended=False: None)  # the sender's own watch
        assert len(_bound(tmp_path / "w.db-wake", count=2)) == 2
        other.announce()
        assert woken.wait(5)
        woken.clear()
        other.announce()  # held back: within ANNOUNCE_EVERY of the first
        assert other.owes_announce and not woken.wait(0.1)
        assert woken.wait(10)  # sent by the sender's watch once the 3 s had passed
        assert not other.owes_announce
        other.close()


def test_news_held_back_goes_out_when_it_may_not_at_the_watchs_next_read(tmp_path, monkeypatch):
    """A process tells its own watch (reading every DOUBT_EVERY, or
    IDLE_EVERY when quiet: 60 s here) of news it holds back, so the news
    goes out once ANNOUNCE_EVERY (0.3 s) has passed, not at that watch's
    next read."""
    monkeypatch.setattr(storage.Database, "ANNOUNCE_EVERY", 0.3)
    with _hearing(tmp_path) as (other, heard, mine):
        assert len(_bound(tmp_path / "w.db-wake")) == 1
        mine._changes.EVERY = mine._changes.IDLE_EVERY = mine._changes.DOUBT_EVERY = 60.0  # the receiver: datagrams alone
        other.watch(lambda workflow, ended=False: None)
        assert len(_bound(tmp_path / "w.db-wake", count=2)) == 2
        other._changes.IDLE_EVERY = other._changes.DOUBT_EVERY = 60.0
        time.sleep(0.1)  # into its 60 s wait
        other.announce("mail.send")
        assert heard.get(timeout=5) == ("mail.send", False)
        sent = time.monotonic()
        other.announce("mail.send", ended=True)  # held back: within ANNOUNCE_EVERY
        assert other.owes_announce
        assert heard.get(timeout=5) == ("mail.send", True)
        assert 0.25 < time.monotonic() - sent < 3
        assert not other.owes_announce


def test_a_watch_whose_process_keeps_announcing_reads_once_a_window_not_twice(tmp_path, monkeypatch):
    """Announces every half millisecond: each window of ANNOUNCE_EVERY
    holds news back, and its process nudges its watch; the nudge sends
    nothing and reads nothing (the news goes at the watch's next look), so
    the watch reads data_version about once a window. It read twice (372
    reads a second against 193 before the nudges)."""
    reads = _version_reads(monkeypatch)
    with _hearing(tmp_path) as (other, heard, mine):
        other.watch(lambda workflow, ended=False: None)  # the announcing process's own watch
        assert len(_bound(tmp_path / "w.db-wake", count=2)) == 2
        time.sleep(1.1)  # past the new watches' quick reads
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            other.announce("mail.send")
            time.sleep(0.0005)
        took = time.monotonic() - start
        during = len([t for t in reads if t >= start])
        assert heard.get(timeout=5) == ("mail.send", False)
        # Two watches (the sender's and the receiver's): about one read a window each.
        assert during <= 2 * 1.25 * took / storage.Database.ANNOUNCE_EVERY, (during, took)
        other.close()


def test_a_watch_is_not_woken_by_each_of_its_own_processs_commits(tmp_path):
    """data_version moves for this process's own commits as for anyone's:
    a move over which this process wrote wakes the waiters at most every
    DOUBT_EVERY (each wake sent a waiter to look again, about 200 a second
    on a process taking intakes); another's commit, made while this
    process keeps writing, is still seen."""
    wakes = []
    path = str(tmp_path / "w.db")
    mine, other = storage.Database(path, shared=True), storage.Database(path, shared=True)
    with mine.write() as conn:
        conn.execute("CREATE TABLE t (x)")
    mine.watch(lambda workflow, ended=False: wakes.append(time.monotonic()))
    try:
        time.sleep(0.1)
        start, deadline = time.monotonic(), time.monotonic() + 0.6
        while time.monotonic() < deadline:  # this process writing, every 2 ms
            mine.write_one("INSERT INTO t VALUES (1)")
            time.sleep(0.002)
        took = time.monotonic() - start
        own = [t for t in wakes if t >= start]
        assert len(own) <= took / storage.Changes.DOUBT_EVERY + 3, (len(own), took)  # not about 120
        time.sleep(0.2)
        seen = len(wakes)
        mine.writes += 1  # as if a write of this process's own began meanwhile
        with other.write() as conn:  # another process's commit, no datagram
            conn.execute("INSERT INTO t VALUES (2)")
        assert wait_until(lambda: len(wakes) > seen, 5)  # in doubt, but woken all the same
    finally:
        mine.close()
        other.close()


def test_an_announce_clears_a_dead_watchers_socket_and_follows_no_symlink(tmp_path):
    folder = tmp_path / "w.db-wake"
    folder.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "1-dead"))
    dead.close()  # its path stays, bound to nothing: a process killed
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    elsewhere.bind(str(tmp_path / "elsewhere"))
    elsewhere.setblocking(False)
    (folder / "2-link").symlink_to(tmp_path / "elsewhere")
    (folder / "3-file").write_text("not a socket")
    try:
        storage.Database(str(tmp_path / "w.db"), shared=True).announce()
        assert not (folder / "1-dead").exists()
        with pytest.raises(BlockingIOError):
            elsewhere.recv(16)  # nothing was sent through the link
        assert (folder / "3-file").read_text() == "not a socket"
    finally:
        elsewhere.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_waiting_claim_on_one_process_gets_a_job_queued_on_another(tmp_path, kind):
    # SQLite: one host of two processes (the kernel picks which one takes
    # each connection); PostgreSQL: two hosts.
    common = dict(API_KEYS=KEY, RATE_WORKER=100000, **store_env(kind))
    if kind == "sqlite":
        hosts = [Server(tmp_path, WEB_CONCURRENCY=2, **common)]
    else:
        hosts = [Server(tmp_path, WEB_CONCURRENCY=1, **common)]
        hosts.append(Server(tmp_path, WEB_CONCURRENCY=1,
                            **dict(common, DATABASE_URL=hosts[0].env["DATABASE_URL"])))
    for host in hosts:
        host.start()
    try:
        out = {}

        def wait_for_job():
            started = time.monotonic()
            out["r"] = requests.post(hosts[0].url + "/api/v1/jobs/claim", headers={"X-Api-Key": KEY},
                                     json={"workflows": ["ext.work"], "wait": 25, "max_jobs": 10},
                                     timeout=40)
            out["took"] = time.monotonic() - started

        thread = threading.Thread(target=wait_for_job)
        thread.start()
        time.sleep(0.5)
        r = requests.post(hosts[-1].url + "/api/v1/intake/batch", headers={"X-Api-Key": KEY},
                          json={"jobs": [{"workflow": "ext.work", "payload": {}}] * 2}, timeout=10)
        assert r.status_code == 202
        thread.join(35)
        assert out["r"].status_code == 200 and len(out["r"].json()["jobs"]) >= 1
        assert out["took"] < 20  # woken by the other process's job, not by the end of its wait
    finally:
        for host in hosts:
            host.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_waiting_status_read_on_one_process_sees_the_job_end_on_another(tmp_path, kind):
    common = dict(API_KEYS=KEY, RATE_WORKER=100000, **store_env(kind))
    if kind == "sqlite":  # one host of two processes
        hosts = [Server(tmp_path, WEB_CONCURRENCY=2, **common)]
    else:  # two hosts
        hosts = [Server(tmp_path, WEB_CONCURRENCY=1, **common)]
        hosts.append(Server(tmp_path, WEB_CONCURRENCY=1,
                            **dict(common, DATABASE_URL=hosts[0].env["DATABASE_URL"])))
    for host in hosts:
        host.start()
    headers = {"X-Api-Key": KEY}
    try:
        job_id = requests.post(hosts[0].url + "/api/v1/intake", headers=headers, timeout=10,
                               json={"workflow": "ext.work", "payload": {}}).json()["job_id"]
        out = {}

        def wait_for_end():
            started = time.monotonic()
            out["r"] = requests.get(f"{hosts[0].url}/api/v1/status/{job_id}?wait=25", headers=headers,
                                    timeout=40)
            out["took"] = time.monotonic() - started

        thread = threading.Thread(target=wait_for_end)
        thread.start()
        time.sleep(0.5)
        taken = requests.post(hosts[-1].url + "/api/v1/jobs/claim", headers=headers, timeout=10,
                              json={"workflows": ["ext.work"]}).json()["job"]
        requests.post(f"{hosts[-1].url}/api/v1/jobs/{job_id}/complete", headers=headers, timeout=10,
                      json={"lease_token": taken["lease_token"], "result": {"ok": True}}).raise_for_status()
        thread.join(35)
        assert out["r"].status_code == 200 and out["r"].json()["status"] == "succeeded"
        assert out["took"] < 20  # it saw the end, not the end of its wait
    finally:
        for host in hosts:
            host.stop()


def test_sigterm_ends_a_waiting_claim_at_once(tmp_path):
    srv = Server(tmp_path, API_KEYS=KEY).start()
    out = {}

    def wait_for_job():
        try:
            out["status"] = requests.post(srv.url + "/api/v1/jobs/claim", headers={"X-Api-Key": KEY},
                                          json={"workflows": ["ext.work"], "wait": 25},
                                          timeout=40).status_code
        except requests.RequestException as exc:  # the connection closed with the server
            out["status"] = type(exc).__name__

    thread = threading.Thread(target=wait_for_job)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    srv.proc.terminate()
    srv.proc.wait(timeout=30)
    thread.join(30)
    assert time.monotonic() - started < 10  # not the 25 s the claim would have waited
    assert out["status"] == 204


def test_a_waiting_claim_whose_client_hung_up_takes_no_job(tmp_path):
    import socket
    srv = Server(tmp_path, API_KEYS=KEY).start()
    try:
        body = b'{"workflows": ["ext.work"], "wait": 20}'
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /api/v1/jobs/claim HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.5)  # it waits at the server
        time.sleep(0.2)  # and has hung up
        headers = {"X-Api-Key": KEY}
        job_id = requests.post(srv.url + "/api/v1/intake", headers=headers, timeout=10,
                               json={"workflow": "ext.work", "payload": {}}).json()["job_id"]
        time.sleep(0.3)
        r = requests.post(srv.url + "/api/v1/jobs/claim", headers=headers, timeout=10,
                          json={"workflows": ["ext.work"]})
        assert r.status_code == 200 and r.json()["job"]["job_id"] == job_id  # not stranded
    finally:
        srv.stop()
