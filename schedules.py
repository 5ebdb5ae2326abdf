"""Recurring schedules: each makes a job at every fire time of its ``cron``
expression or ``every`` so many seconds, as the key that made it.

A schedule is a row in the database every process shares (the SQLite file,
or PostgreSQL), with ``next_fire``, when it next makes a job. Every process
runs a Scheduler that looks for due schedules twice a second. Making one
fire's job is idempotent (the job carries an idempotency key naming the
schedule and the fire time), and moving ``next_fire`` on is a
compare-and-set: however many processes and hosts find a schedule due at
once, each fire time makes exactly one job. After downtime, the fires
missed collapse into one, at the latest fire time that has passed.
"""

import json
import time
import traceback

from background import Background
from costs import BudgetExceeded
from cron import Cron
from jobstore import IdempotencyMismatch, QueueFull

# The fields of a schedule's definition, beside its name.
SPEC_FIELDS = ("workflow", "payload", "priority", "max_cost", "callback_url", "cron", "timezone",
               "every")
SCHEDULE_COLUMNS = "key_id, name, spec, paused, next_fire, last_fire, last_job, created_at, updated_at"
# Named statements, the same on SQLite and PostgreSQL.
SQL = {
    "create": f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES (:key_id, :name, :spec, :paused,"
              " :next_fire, NULL, NULL, :now, :now) ON CONFLICT (key_id, name) DO NOTHING"
              f" RETURNING {SCHEDULE_COLUMNS}",
    "get": f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE key_id = :key_id AND name = :name",
    "list": f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE key_id = :key_id ORDER BY name",
    "change": "UPDATE schedules SET spec = :spec, paused = :paused, next_fire = :next_fire,"
              f" updated_at = :now WHERE key_id = :key_id AND name = :name RETURNING {SCHEDULE_COLUMNS}",
    "delete": "DELETE FROM schedules WHERE key_id = :key_id AND name = :name RETURNING name",
    "due": f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE paused = 0 AND next_fire <= :now"
           " ORDER BY next_fire LIMIT 100",
    # The compare-and-set: only the process that saw this next_fire moves it.
    "advance": "UPDATE schedules SET next_fire = :next_fire, last_fire = :fired, last_job = :job_id"
               " WHERE key_id = :key_id AND name = :name AND next_fire = :was",
}


def timing(spec):
    """The spec's clock: a Cron, or the whole seconds of ``every``."""
    if spec.get("cron") is not None:
        return Cron(spec["cron"], spec.get("timezone") or "UTC")
    return spec["every"]


def next_fire(spec, after):
    """The first fire time after ``after`` (Unix seconds); None if never."""
    clock = timing(spec)
    if isinstance(clock, Cron):
        return clock.next_after(after)
    return after + clock


def latest_fire(spec, due, now):
    """The latest fire time at or before ``now``, counting on from ``due``
    (a fire time at or before it): the one fire that missed ones collapse into."""
    clock = timing(spec)
    if not isinstance(clock, Cron):
        return due + (now - due) // clock * clock
    for window in (None, 86_400, 8 * 86_400, 32 * 86_400, 367 * 86_400):
        if window is not None:  # too many fires since due: count on from a fire nearer now
            start = clock.next_after(now - window)
            if start is None or start > now:
                continue
            due = start
        for _ in range(10_000):
            after = clock.next_after(due)
            if after is None or after > now:
                return due
            due = after
    return due


def schedule_out(row):
    if row is None:
        return None
    spec = json.loads(row["spec"])
    return {"name": row["name"], **{k: spec.get(k) for k in SPEC_FIELDS},
            "paused": bool(row["paused"]), "next_fire": row["next_fire"],
            "last_fire": row["last_fire"], "last_job": row["last_job"],
            "created_at": row["created_at"], "updated_at": row["updated_at"], "key_id": row["key_id"]}


class ScheduleStore:
    """Schedules, each its owner's (``key_id``) by name: another key's
    schedules are invisible, and names are unique per owner."""

    def __init__(self, db, clock=time.time):
        self.db = db
        self.clock = clock

    def _write(self, statement, key_id, name, spec, paused):
        """Write a definition (its next fire counted from now); the row, or None."""
        now = self.clock()
        rows = self.db.write_one(SQL[statement], {
            "key_id": key_id, "name": name, "spec": json.dumps(spec, allow_nan=False),
            "paused": int(paused), "next_fire": next_fire(spec, now), "now": now})
        return schedule_out(rows[0]) if rows else None

    def create(self, key_id, name, spec, paused=False):
        """The new schedule, or None if the owner has one of that name."""
        return self._write("create", key_id, name, spec, paused)

    def get(self, key_id, name):
        rows = self.db.query(SQL["get"], {"key_id": key_id, "name": name})
        return schedule_out(rows[0]) if rows else None

    def list(self, key_id):
        return [schedule_out(r) for r in self.db.query(SQL["list"], {"key_id": key_id})]

    def change(self, key_id, name, spec, paused):
        """Replace the definition; the next fire is counted from now. None if
        there is no such schedule."""
        return self._write("change", key_id, name, spec, paused)

    def delete(self, key_id, name):
        return bool(self.db.write_one(SQL["delete"], {"key_id": key_id, "name": name}))

    def due(self, now):
        return [schedule_out(r) for r in self.db.query(SQL["due"], {"now": now})]

    def advance(self, schedule, next_at, fired, job_id):
        """Move the schedule on from the ``next_fire`` it was read with;
        False if another process did first."""
        with self.db.write() as conn:
            return conn.execute(SQL["advance"], {
                "key_id": schedule["key_id"], "name": schedule["name"], "was": schedule["next_fire"],
                "next_fire": next_at, "fired": fired, "job_id": job_id}).rowcount == 1


class Scheduler(Background):
    """Makes the jobs of due schedules, in every process (see the module's
    docstring for why that makes each fire once)."""

    IDEMPOTENCY_TTL = 86_400
    NAME = "levqor-scheduler"

    def __init__(self, store, engine, keys, log, interval=0.5, clock=time.time):
        self.store = store
        self.engine = engine
        self.keys = keys  # storage.KeyStore: a managed key's budget applies to its schedules
        self.log = log
        self.interval = interval
        self.clock = clock
        super().__init__()

    def tick(self):
        now = self.clock()
        for schedule in self.store.due(now):
            try:
                self._fire(schedule, now)
            except Exception:  # one schedule's fault must not stop the others
                self.log.error("schedule fire failed", schedule=schedule["name"],
                               traceback=traceback.format_exc())

    def _fire(self, schedule, now):
        fired = latest_fire(schedule, schedule["next_fire"], now)
        job_id = self._make_job(schedule, fired)
        self.store.advance(schedule, next_fire(schedule, fired), fired, job_id)

    def _make_job(self, schedule, fired):
        """The fire's job id, or None if no job could be made (logged)."""
        key_id = schedule["key_id"]
        key = self.keys.get(key_id) if key_id.startswith("key_") else None
        if key is not None and key["revoked_at"] is not None:
            self.log.warning("schedule skipped: its key is revoked", schedule=schedule["name"])
            return None
        engine = self.engine
        cap = engine.guardrails.cap(schedule["max_cost"], engine.default_cap(schedule["workflow"]))
        declared = schedule["max_cost"] is not None or engine.default_cap(schedule["workflow"]) is not None
        job = engine.new_job(schedule["workflow"], schedule["payload"], schedule["priority"] or "normal",
                             schedule["callback_url"], key_id, cap, declared, schedule=schedule["name"])
        fire_key = f"{schedule['name']}@{fired:.3f}"
        try:
            made, _ = engine.accept(job, key, (f"schedule:{key_id}", fire_key, "fire",
                                               self.IDEMPOTENCY_TTL))
        except (BudgetExceeded, QueueFull, IdempotencyMismatch) as exc:
            self.log.warning("schedule fire skipped", schedule=schedule["name"],
                             reason=type(exc).__name__)
            return None
        return made["job_id"]

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the database may be away: try again next time
                self.log.error("scheduler tick failed", traceback=traceback.format_exc())
