"""Token buckets that hold per host: the bucket arithmetic, the bounded table,
sharing across forked processes, and what a client address is keyed by."""

import os
import struct
import time

import pytest

import ratelimit


@pytest.fixture(autouse=True)
def no_shared_table(monkeypatch):
    # Each test starts with no shared table and leaves none behind.
    monkeypatch.setattr(ratelimit, "_shared", None)


def fake_clock(start=1000.0):
    now = [start]
    return now, lambda: now[0]


# -- bucket arithmetic ------------------------------------------------------------


def test_burst_then_refused_with_counts():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(100, clock=clock)
    limits = ((("w", "ip"), 60),)  # one token a second
    assert all(buckets.take(limits) is None for _ in range(60))
    assert buckets.take(limits) == (60, 0, 60, 1)


def test_refill_is_continuous_and_capped():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(100, clock=clock)
    limits = ((("w", "ip"), 60),)
    for _ in range(60):
        buckets.take(limits)
    now[0] += 1.0
    assert buckets.take(limits) is None
    assert buckets.take(limits) is not None
    now[0] += 0.5  # half a token: not enough, and retry_after rounds up
    assert buckets.take(limits) == (60, 0, 60, 1)
    now[0] += 3600.0  # an hour idle refills to the rate, no further
    assert sum(buckets.take(limits) is None for _ in range(100)) == 60


def test_remaining_reset_retry_after_of_a_slow_bucket():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(100, clock=clock)
    limits = ((("key", "k1"), 5),)  # one token every 12 s
    for _ in range(5):
        assert buckets.take(limits) is None
    assert buckets.take(limits) == (5, 0, 60, 12)
    now[0] += 30.0  # 2.5 tokens back
    assert buckets.take(limits) is None
    assert buckets.take(limits) is None
    # 0.5 left: 54 s to full, 6 s to the next whole token.
    assert buckets.take(limits) == (5, 0, 54, 6)


def test_all_or_none_reports_the_emptiest_bucket():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(100, clock=clock)
    ip, limit_global = (("w", "a"), 10), (None, 3)
    assert all(buckets.take((ip, limit_global)) is None for _ in range(3))
    assert buckets.take((ip, limit_global)) == (3, 0, 60, 20)
    # The refused take cost the per-IP bucket nothing: 7 of its 10 are left.
    assert sum(buckets.take((ip,)) is None for _ in range(20)) == 7


def test_evicted_bucket_comes_back_full():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(1, clock=clock)
    a, b = ((("r", "a"), 2),), ((("r", "b"), 2),)
    assert buckets.take(a) is None and buckets.take(a) is None
    assert buckets.take(a) is not None
    now[0] += 0.001
    assert buckets.take(b) is None  # a one-slot table: b evicts a
    assert buckets.take(a) is None  # a is full again


def test_eviction_picks_the_least_recently_used():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(ratelimit.WINDOW, clock=clock)
    keys = [("r", f"ip{i}") for i in range(ratelimit.WINDOW)]
    for key in keys:  # fills the table: every slot is in every window
        now[0] += 1.0
        assert buckets.take(((key, 1),)) is None
    now[0] += 0.001
    for key in keys[1:]:  # all drained but the first become recent again
        assert buckets.take(((key, 1),)) is not None
    assert buckets.take(((("r", "new"), 1),)) is None  # evicts keys[0] only
    for key in keys[1:]:
        assert buckets.take(((key, 1),)) is not None


def test_global_bucket_is_never_evicted():
    now, clock = fake_clock()
    buckets = ratelimit.TokenBuckets(1, clock=clock)
    assert all(buckets.take(((("w", f"ip{i}"), 100), (None, 3))) is None for i in range(3))
    for i in range(100):
        buckets.take(((("r", f"other{i}"), 100),))
    assert buckets.take(((("w", "fresh"), 100), (None, 3))) == (3, 0, 60, 20)


def test_table_is_bounded():
    buckets = ratelimit.TokenBuckets(50)
    for i in range(1000):
        buckets.take(((("r", f"ip{i}"), 10),))
    assert len(buckets.table.mem) == ratelimit.SLOT.size * 51


def test_key_hash_is_stable():
    # The same in every interpreter, whatever PYTHONHASHSEED: pinned here.
    assert ratelimit._hash(("w", "203.0.113.5")) == ratelimit._hash(("w", "203.0.113.5"))
    assert ratelimit._hash(("w", "203.0.113.5")) != ratelimit._hash(("r", "203.0.113.5"))
    assert ratelimit._hash(("w", "203.0.113.5")) == 0xDF5CB23E789D0B6B


def test_two_limiters_share_a_table_without_sharing_buckets():
    table = ratelimit.Table(100)
    by_ip = ratelimit.TokenBuckets(100, table=table)
    by_key = ratelimit.TokenBuckets(100, table=table)
    assert all(by_ip.take(((("w", "x"), 3),)) is None for _ in range(3))
    assert by_ip.take(((("w", "x"), 3),)) is not None
    assert by_key.take(((("key", "x"), 3),)) is None


# -- across processes -------------------------------------------------------------


def run_children(n, work):
    """Fork n children that wait for one start signal, run work() and report
    the number it returns; return the numbers."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(go_w)
                os.close(out_r)
                os.read(go_r, 1)
                os.write(out_w, struct.pack("<i", work()))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(out_w)
    os.write(go_w, b"x" * n)
    os.close(go_w)
    data = b""
    while chunk := os.read(out_r, 4096):
        data += chunk
    os.close(out_r)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert len(data) == 4 * n
    return [struct.unpack_from("<i", data, 4 * i)[0] for i in range(n)]


def test_burst_holds_across_four_processes():
    ratelimit.prepare_shared(1000)
    limits = ((("w", "203.0.113.5"), 20),)
    # A frozen clock, so no token comes back however slow the machine: the
    # total is exact.
    buckets = ratelimit.buckets(1000, clock=lambda: 5000.0)

    def work():
        return sum(buckets.take(limits) is None for _ in range(200))

    allowed = run_children(4, work)
    assert sum(allowed) == 20, allowed


def test_per_key_rate_holds_across_two_processes():
    ratelimit.prepare_shared(1000)

    def work():
        # Made in the child, as a gunicorn worker makes it after the fork.
        key_buckets = ratelimit.buckets(1000)
        return sum(key_buckets.take(((("key", "k1"), 5),)) is None for _ in range(50))

    # Rate 5 a minute brings a token back every 12 s; the children take
    # milliseconds.
    assert sum(run_children(2, work)) == 5


def test_without_prepare_shared_each_process_has_its_own():
    buckets = ratelimit.buckets(100)
    limits = ((("w", "x"), 3),)
    assert run_children(1, lambda: sum(buckets.take(limits) is None for _ in range(10))) == [3]
    assert sum(buckets.take(limits) is None for _ in range(10)) == 3


def test_prepare_shared_is_idempotent():
    table = ratelimit.prepare_shared(100)
    assert ratelimit.prepare_shared(100) is table
    assert ratelimit.buckets(5).table is table


def test_lock_left_by_a_dead_process_is_taken_over(monkeypatch):
    monkeypatch.setattr(ratelimit, "LOCK_TIMEOUT", 0.05)
    table = ratelimit.prepare_shared(100)
    pid = os.fork()
    if pid == 0:
        table.lock.acquire()
        os._exit(0)  # dies holding the lock
    os.waitpid(pid, 0)
    buckets = ratelimit.buckets(100)
    started = time.monotonic()
    assert buckets.take(((("w", "x"), 3),)) is None
    assert time.monotonic() - started < 5.0
    # Taken over once, the lock is free again.
    assert table.lock.acquire(block=False)
    table.lock.release()


# -- client addresses -------------------------------------------------------------


def test_client_key_ipv4_is_itself():
    assert ratelimit.client_key("203.0.113.5") == "203.0.113.5"


def test_client_key_ipv6_is_its_slash_64():
    a = ratelimit.client_key("2001:db8:1:2::5")
    b = ratelimit.client_key("2001:db8:1:2:ffff:eeee:dddd:cccc")
    assert a == b == "2001:db8:1:2::/64"
    assert ratelimit.client_key("2001:db8:1:3::5") == "2001:db8:1:3::/64"
    assert ratelimit.client_key("::1") == "::/64"


def test_client_key_ipv4_mapped_is_the_ipv4_address():
    assert ratelimit.client_key("::ffff:203.0.113.5") == "203.0.113.5"


@pytest.mark.parametrize("garbage", ["", "unknown", "999.1.1.1", "2001:db8::g", "1.2.3.4:80"])
def test_client_key_of_garbage_is_unchanged(garbage):
    assert ratelimit.client_key(garbage) == garbage
