"""Rate-limit token buckets that hold per host, not per process.

This module owns the table behind Levqor's rate limits (per client address,
per API key, and the global bucket) and the rule for which client addresses
share a bucket. Gunicorn runs several worker processes, and buckets kept in
each one's memory would multiply every limit by their number. Here the table
is a fixed-size array in an anonymous shared memory map. The master process
creates it (prepare_shared), every worker it forks inherits it, and one lock
that works across processes guards it. A take() is a few struct reads and
writes under that lock: microseconds, with no database round trip.
"""

import functools
import hashlib
import ipaddress
import math
import mmap
import multiprocessing
import struct
import threading
import time

# A slot: 64-bit key hash (0: empty), tokens, time of the last refill. Every
# take refills the buckets it touches, so the last refill is also the last
# use: the clock by which a full probe window picks the bucket to evict.
SLOT = struct.Struct("<Qdd")
# How many slots from a key's home slot are probed. Kept small so a take
# stays cheap whatever the table size.
WINDOW = 8
# The lock is held for microseconds. If it is held this long, the process
# holding it died (SIGKILL, the OOM killer) and will never release it, so the
# waiter takes it over instead of stalling every worker forever.
LOCK_TIMEOUT = 1.0

_GLOBAL = 1  # the hash field of the global bucket's slot once it is in use


class Table:
    """``size`` bucket slots after one slot for the global bucket, and the
    lock that guards them. A shared table is visible to processes forked
    after it is made; a private one only to its own process."""

    def __init__(self, size, shared=False):
        self.size = max(1, int(size))
        nbytes = SLOT.size * (self.size + 1)
        if shared:
            # mmap(-1) is MAP_SHARED on Linux, so forked children write to the
            # same pages. The fork context's lock is a POSIX semaphore, which
            # is also shared across fork.
            self.mem = mmap.mmap(-1, nbytes)
            self.lock = multiprocessing.get_context("fork").Lock()
        else:
            # A bytearray: after a fork, each process has its own copy.
            self.mem = bytearray(nbytes)
            self.lock = threading.Lock()


@functools.lru_cache(maxsize=4096)  # a hit is several times cheaper than blake2b
def _hash(key):
    # Python's hash() of a str differs between interpreters (PYTHONHASHSEED).
    # repr() of str, tuple and None is canonical, and blake2b is the same in
    # every process.
    data = repr(key).encode("utf-8", "backslashreplace")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class TokenBuckets:
    """Token buckets, refilled continuously at ``rate`` tokens a minute.

    The table keeps about the ``size`` most recently used buckets; one evicted
    is simply full again when it comes back, which costs an abuser nothing it
    did not already have. The global bucket (key None) has a slot of its own
    and is never evicted; it is one per table, shared by every TokenBuckets on
    that table.
    """

    def __init__(self, size, clock=time.monotonic, table=None):
        self.table = table if table is not None else Table(size)
        self.size = self.table.size
        self.clock = clock

    def _slot(self, h, used):
        """Offset of the slot for hash ``h``: its own, else the first empty
        one in its window, else the window's least recently used one (not
        one this take already uses)."""
        mem, size = self.table.mem, self.table.size
        home = h % size
        free = oldest = None
        for i in range(min(WINDOW, size)):
            off = SLOT.size * (1 + (home + i) % size)
            held, _, last = SLOT.unpack_from(mem, off)
            if held == h:
                return off
            if held == 0:
                if free is None:
                    free = off
            elif (oldest is None or last < oldest[1]) and off not in used:
                oldest = (off, last)
        if free is not None:
            return free
        # More keys in one take than slots in a window: they would have to
        # share a slot. No caller comes near that.
        return oldest[0] if oldest is not None else SLOT.size * (1 + home)

    def take(self, limits):
        """Take one token from each (key, rate) bucket, all or none.

        Returns None when allowed; otherwise (limit, remaining, reset,
        retry_after) of the emptiest bucket, times in whole seconds.
        """
        mem, lock = self.table.mem, self.table.lock
        # On a timeout the holder is presumed dead: carry on as the owner,
        # and the release below frees the lock for everyone else.
        lock.acquire(timeout=LOCK_TIMEOUT)
        try:
            # The clock is read under the lock, so that no process writes an
            # older time over one that another has just written.
            now = self.clock()
            low = None
            used = []
            for key, rate in limits:
                if key is None:
                    h, off = _GLOBAL, 0
                else:
                    h = _hash(key)
                    off = self._slot(h, used)
                held, tokens, last = SLOT.unpack_from(mem, off)
                if held != h:  # new, or evicted since: full
                    tokens, last = float(rate), now
                elapsed = now - last if now > last else 0.0
                tokens = tokens + elapsed * rate / 60.0
                tokens = tokens if tokens < rate else float(rate)
                SLOT.pack_into(mem, off, h, tokens, now)
                used.append(off)
                if low is None or tokens < low[0]:
                    low = (tokens, rate)
            if low[0] >= 1.0:
                for off in used:
                    held, tokens, last = SLOT.unpack_from(mem, off)
                    SLOT.pack_into(mem, off, held, tokens - 1.0, last)
                return None
        finally:
            try:
                lock.release()
            except (ValueError, RuntimeError):
                pass  # already released by a process that took it over
        tokens, rate = low
        per_second = rate / 60.0
        return (rate, int(tokens), math.ceil((rate - tokens) / per_second),
                math.ceil((1.0 - tokens) / per_second))


_shared = None


def prepare_shared(size):
    """Make this process's shared table, which processes forked from it
    afterwards inherit. Call it in gunicorn's master, before the workers
    fork. Calling it again with the same size keeps the same table."""
    global _shared
    if _shared is None or _shared.size != max(1, int(size)):
        _shared = Table(size, shared=True)
    return _shared


def buckets(size, clock=time.monotonic):
    """TokenBuckets on the shared table if prepare_shared ran in this process
    or one it was forked from (the table's own size then applies), otherwise
    on a private table of ``size`` slots."""
    return TokenBuckets(size, clock, _shared)


@functools.lru_cache(maxsize=4096)  # parsing an IPv6 address costs ~15 us
def client_key(ip):
    """The string a per-address bucket is keyed by.

    An IPv6 client is its /64: one subscriber gets a whole /64 and could
    otherwise hop between its addresses to multiply its limit. An
    IPv4-mapped address is the IPv4 client it stands for.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        # Integer arithmetic: an IPv6Network would cost three times as much.
        return f"{ipaddress.IPv6Address(int(addr) >> 64 << 64)}/64"
    return str(addr)
