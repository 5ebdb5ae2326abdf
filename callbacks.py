"""Callbacks: signed, retried, SSRF-safe notifications when a job finishes.

When a job with a ``callback_url`` reaches succeeded, failed or canceled,
Levqor POSTs ``{"type": "job.<status>", "timestamp", "data": <status view>}``
to it, signed as the Standard Webhooks specification says
(https://www.standardwebhooks.com/), so receivers can verify it with
off-the-shelf libraries or with ``verify_webhook`` below.

Deliveries run on this module's own threads, never on a request thread or a
job worker. Each attempt resolves the host, refuses unless every address is
public, and connects to the address it checked (no second lookup, so DNS
rebinding gains nothing), with the original Host header and TLS server name.
Redirects are never followed; at most 64 KiB of an answer is read; an
attempt has 10 seconds in all. This module owns delivery, signing and the
address rules; the job store keeps each job's delivery state.
"""

import base64
import binascii
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import json
import math
import os
import socket
import ssl
import threading
import time
import traceback
from urllib.parse import urlsplit

from web import whole_number

# Seconds to wait before each attempt: at once, then 5 s, 30 s, 2 min,
# 10 min, 30 min, 1 h; then give up.
SCHEDULE = (0, 5, 30, 120, 600, 1800, 3600)
# What the status view says of every failure to resolve or connect, whatever
# it was: the cause (a name that does not resolve, or resolves to a forbidden
# address, a closed port) would tell a client about DNS and networks it
# cannot see. The log line has the cause.
UNREACHABLE = "unreachable: the callback URL could not be resolved or connected to"
TIMEOUT = 10.0
MAX_RESPONSE = 64 * 1024
TOLERANCE = 5 * 60

# ---------------------------------------------------------------------------
# Signing and verifying (Standard Webhooks)
# ---------------------------------------------------------------------------


class WebhookVerificationError(Exception):
    pass


def parse_secret(secret):
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError if malformed."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes of key")
    return key


def sign(key, msg_id, timestamp, body):
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_webhook(secret, headers, body, tolerance=TOLERANCE, now=None):
    """Check a delivery as a receiver should; returns the parsed body.

    ``headers`` maps header names (any case) to values; ``body`` is the raw
    bytes as received. Raises WebhookVerificationError if a header is
    missing, the timestamp is more than ``tolerance`` seconds away from now
    (a replay), or no signature matches.
    """
    key = parse_secret(secret)
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, stamp, signatures = (lower[h] for h in ("webhook-id", "webhook-timestamp",
                                                         "webhook-signature"))
        timestamp = int(stamp)
    except (KeyError, ValueError):
        raise WebhookVerificationError("missing or malformed webhook headers") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise WebhookVerificationError("timestamp outside the tolerance window")
    expected = sign(key, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in signatures.split(" ")):
        raise WebhookVerificationError("no matching signature")
    return json.loads(body)


# ---------------------------------------------------------------------------
# Which addresses a callback may reach
# ---------------------------------------------------------------------------


def forbidden(address):
    """True for anything but a public unicast address. IPv4-mapped IPv6 is
    judged as the IPv4 address it carries."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified


def literal_address(host):
    """The IP address a host name spells, in any of the forms C's
    inet_aton accepts (2130706433, 0x7f000001, 0177.0.0.1, 127.1, 0), or
    None for a real name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def url_problem(url, allow_private=False):
    """Why intake must refuse this callback URL, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if port == 0:
        return "has no usable port"
    address = literal_address(parts.hostname)
    if address is not None and not allow_private and forbidden(address):
        return "points at a private or reserved address"
    return None


class Refused(Exception):
    """The callback's host resolved to an address it may not reach."""


def resolve(host, port, allow_private, getaddrinfo=socket.getaddrinfo):
    """Every address of host, all checked: Refused unless each is allowed."""
    infos = getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"no address for {host}")
    if not allow_private and any(forbidden(a) for a in addresses):
        raise Refused(f"{host} resolves to a forbidden address")
    return addresses


# ---------------------------------------------------------------------------
# One attempt
# ---------------------------------------------------------------------------


def post(url, headers, body, allow_private, getaddrinfo=socket.getaddrinfo,
         connect=socket.create_connection, timeout=TIMEOUT):
    """POST body to url once; returns (status, retry_after header or None).

    The host is resolved once and every address checked; the connection
    goes to a checked address, and the whole attempt is cut off after
    ``timeout`` seconds however slowly the other side answers.
    """
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    addresses = resolve(parts.hostname, port, allow_private, getaddrinfo)
    for i, address in enumerate(addresses):  # every one of them was checked
        try:
            sock = connect((address, port), timeout)
            break
        except OSError:
            if i == len(addresses) - 1:
                raise
    # A deadline for the whole attempt: per-read timeouts alone would let a
    # server that drips a byte at a time hold a delivery thread for ever.
    watchdog = threading.Timer(timeout, _shut, args=(sock,))
    watchdog.start()
    try:
        if https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        conn.sock = sock  # already connected, to the address we checked
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body, headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE)  # enough to be polite; the rest is not read
        return response.status, response.getheader("Retry-After")
    finally:
        watchdog.cancel()
        sock.close()


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _retry_after(value):
    """A receiver's Retry-After in seconds (at most an hour), if it is ASCII digits."""
    seconds = whole_number(value.strip()) if isinstance(value, str) else None
    return None if seconds is None else min(3600, seconds)


# ---------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------


class Callbacks:
    """Schedules and delivers job notifications on its own threads.

    ``on_finish`` (an engine hook) and ``redeliver`` create an event: a new
    webhook-id and the body, fixed for all its attempts. The state lives on
    the job (``callback``: state, attempts, last_status, last_error,
    next_attempt_at, shown in the status view; ``callback_id`` and
    ``callback_body``, not shown); the schedule is a heap in this process.
    Every ``scan_interval`` seconds each process also looks in the store for
    deliveries that are due and that no sender holds, so one whose sender
    died is sent by a process that lives. ``run_due()`` delivers what is due
    now, and ``scan()`` looks once, for tests.
    """

    def __init__(self, store, log, secrets, allow_private=False, clock=time.time, threads=2,
                 schedule=SCHEDULE, post=post, view=None, scan_interval=30.0):
        self.store = store
        self.log = log
        self.keys = [parse_secret(s) for s in secrets]
        self.allow_private = allow_private
        self.clock = clock
        self.threads = threads
        self.schedule = schedule
        self.post = post
        self.view = view  # job -> the dict sent as "data"
        self.scan_interval = scan_interval
        self._heap = []   # (due, seq, job_id, event_id)
        self._queued = {}  # (job_id, event_id) -> the earliest due it has in the heap
        self._seq = 0
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._workers = []

    @property
    def enabled(self):
        return bool(self.keys)

    # -- events --------------------------------------------------------------------

    def on_finish(self, job):
        if job.get("callback_url"):
            self._new_event(job)

    def redeliver(self, job):
        """Send a finished job's notification again, as a new event."""
        return self._new_event(job)

    def _new_event(self, job):
        now = self.clock()
        event_id = "msg_" + os.urandom(12).hex()
        body = json.dumps({
            "type": f"job.{job['status']}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "data": self.view(job),
        }, separators=(",", ":"), allow_nan=False).encode()  # receivers' parsers refuse NaN
        if not self.enabled:
            state = {"state": "disabled", "attempts": 0, "last_status": None,
                     "last_error": "no CALLBACK_SECRET is configured", "next_attempt_at": None}
            return self.store.update(job["job_id"], callback=state, callback_id=event_id)
        state = {"state": "pending", "attempts": 0, "last_status": None, "last_error": None,
                 "next_attempt_at": now}
        done = self.store.update(job["job_id"], callback=state, callback_id=event_id,
                                 callback_body=body.decode())
        if done is not None:  # None: the job is gone (purged) meanwhile
            self._schedule(now, job["job_id"], event_id)
        return done

    def _schedule(self, due, job_id, event_id):
        with self._lock:
            if self._queued.get((job_id, event_id), math.inf) <= due:
                return  # already waiting here, as soon or sooner: scans repeat themselves
            self._queued[job_id, event_id] = due
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, job_id, event_id))
            self._lock.notify()

    # -- attempts ----------------------------------------------------------------------

    def attempt(self, job_id, event_id):
        """One delivery attempt of one event; updates the job's callback state."""
        job = self.store.get(job_id)
        if job is None or job.get("callback_id") != event_id:
            return  # the job is gone, or a newer event replaced this one
        state = job["callback"]
        now = self.clock()
        if state["state"] != "pending":
            return  # done already
        held = job.get("callback_sending_until") or 0
        due = max(held, state["next_attempt_at"] or 0)
        if due > now:
            # Another process is sending it, or this is an early copy: look
            # again when its hold ends, in case that sender died meanwhile.
            self._schedule(due, job_id, event_id)
            return
        # Take the attempt: with a shared store, two processes may both have
        # it scheduled; the compare-and-set lets one of them send.
        taken = self.store.update(job_id, expect={"callback_id": event_id, "callback": state,
                                                  "callback_sending_until": job.get("callback_sending_until")},
                                  callback_sending_until=now + TIMEOUT + 5)
        if taken is None:
            return
        state = dict(state)
        body = job["callback_body"].encode()
        stamp = int(now)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Levqor-Webhooks/1.0",
            "webhook-id": event_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": " ".join(sign(k, event_id, stamp, body) for k in self.keys),
        }
        if job.get("traceparent"):  # the submitter's trace goes on to its receiver
            headers["traceparent"] = job["traceparent"]
        state["attempts"] += 1
        retry_after = detail = None
        try:
            status, retry_after = self.post(job["callback_url"], headers, body, self.allow_private)
        except (Refused, OSError) as exc:  # ssl.SSLError is an OSError too
            # A forbidden address is retried like any other: a final answer
            # would single it out.
            status, error, final = None, UNREACHABLE, False
            detail = f"{type(exc).__name__}: {exc}"[:300]
        except http.client.HTTPException as exc:
            status, error, final = None, f"{type(exc).__name__}: {exc}"[:300], False
        else:
            error = None if 200 <= status < 300 else f"HTTP {status}"
            final = error is None or status == 410  # 410 Gone: the receiver asks us to stop
        state["last_status"], state["last_error"] = status, error
        if error is None:
            state.update(state="delivered", next_attempt_at=None)
        elif status == 410:
            state.update(state="disabled", next_attempt_at=None)
        elif final or state["attempts"] >= len(self.schedule):
            state.update(state="failed", next_attempt_at=None)
        else:
            delay = self.schedule[state["attempts"]]
            if status in (429, 503) and _retry_after(retry_after) is not None:
                delay = max(delay, _retry_after(retry_after))
            state["next_attempt_at"] = self.clock() + delay
        if self.store.update(job_id, expect={"callback_id": event_id}, callback=state,
                             callback_sending_until=None) is None:
            return
        if state["next_attempt_at"] is not None:
            self._schedule(state["next_attempt_at"], job_id, event_id)
        self.log.info("callback attempt", job_id=job_id, webhook_id=event_id,
                      attempt=state["attempts"], state=state["state"], status=status, error=error,
                      detail=detail)

    def _pop_due(self):
        with self._lock:
            if self._heap and self._heap[0][0] <= self.clock():
                item = heapq.heappop(self._heap)
                if self._queued.get(item[2:]) == item[0]:
                    del self._queued[item[2:]]
                return item
            return None

    def run_due(self):
        """Deliver every attempt that is due now; returns how many ran."""
        ran = 0
        while (item := self._pop_due()) is not None:
            self.attempt(item[2], item[3])
            ran += 1
        return ran

    def scan(self):
        """Schedule here every delivery that is due and held by no sender."""
        try:
            for job_id, event_id, due in self.store.pending_callbacks(self.clock()):
                self._schedule(due, job_id, event_id)
        except Exception:  # a bad moment (or row) must not end the scans
            self.log.error("callback scan failed", traceback=traceback.format_exc())

    # -- threads ----------------------------------------------------------------------------

    def _worker(self):
        while not self._stopping.is_set():
            item = self._pop_due()
            if item is None:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    wait = 1.0 if not self._heap else max(0.0, min(1.0, self._heap[0][0] - self.clock()))
                    self._lock.wait(wait)
                continue
            try:
                self.attempt(item[2], item[3])
            except Exception:
                self.log.error("callback delivery error", job_id=item[2],
                               traceback=traceback.format_exc())

    def _scanner(self):
        while not self._stopping.wait(self.scan_interval):
            self.scan()

    def start(self):
        if self._workers or not self.enabled:
            return
        try:
            for job_id, event_id, due in self.store.pending_callbacks():
                self._schedule(due or self.clock(), job_id, event_id)
        except Exception:  # a bad row must not keep the process from serving
            self.log.error("callback start-up scan failed", traceback=traceback.format_exc())
        self._stopping.clear()
        self._workers = [threading.Thread(target=self._worker, name=f"levqor-callback-{i}",
                                          daemon=True) for i in range(self.threads)]
        self._workers.append(threading.Thread(target=self._scanner, name="levqor-callback-scan",
                                              daemon=True))
        for t in self._workers:
            t.start()

    def stop(self, grace=5.0):
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + grace
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._workers = []
