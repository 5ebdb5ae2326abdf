"""Cost guardrails: money, per-job caps and daily budgets.

Amounts are integer micro-dollars everywhere inside Levqor (``to_micro``);
the API shows dollars as JSON numbers rounded to six places (``to_usd``).
No binary float ever holds a sum.

The rules: a job's cap (its ``max_cost``, at most MAX_COST_PER_JOB) covers
all its attempts. A declared cap (intake's ``max_cost`` or the workflow's)
is reserved at intake against today's budgets, the service's
MAX_COST_PER_DAY and a managed key's own (its ``daily_budget``, else
KEY_DAILY_BUDGET); a job with no declared cost reserves nothing and is
charged as it spends. Money spent is always recorded, in full: a charge
spends from the reservation, and what it takes past it counts against the
day budgets at once, even past a cap (the job then fails). When the job
ends the rest of the reservation is released. The arithmetic and its
atomicity live in ``ledger.Ledger``; this module holds the policy and the
conversions.
"""

import decimal
import time

MICRO = decimal.Decimal(1_000_000)


def to_micro(usd, rounding=decimal.ROUND_HALF_UP):
    """Dollars (a JSON number or a string) as integer micro-dollars.

    Through Decimal(str()), so 0.35 is exactly 350000. Charges round up
    (``decimal.ROUND_CEILING``) so spend is never under-counted.
    """
    value = decimal.Decimal(str(usd))
    if not value.is_finite() or value < 0:
        raise ValueError("an amount of money is a finite number, not negative")
    return int((value * MICRO).to_integral_value(rounding))


def to_usd(micro):
    return round(micro / 1_000_000, 6) if micro is not None else None


def utc_day(ts):
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class BudgetExceeded(Exception):
    """A reservation or charge that does not fit: ``state`` says which budget,
    ``index`` which job of a batch."""

    def __init__(self, state, index=0):
        super().__init__(f"the {state['scope']} budget is exhausted")
        self.state = state
        self.index = index


def seconds_to_midnight(now):
    return int(86_400 - now % 86_400) or 1


def fits(used, amount, limit):
    """Whether ``amount`` more fits a budget of which ``used`` is taken. A
    job that reserves nothing still needs something left to spend."""
    return used + amount <= limit if amount else used < limit


# Seconds a refused request is told to wait when reservations outstanding in
# the refusing budget would make room once released: jobs end (and release
# what they did not spend) in seconds to minutes, not at midnight.
RETRY_SOON = 30


class Guardrails:
    def __init__(self, ledger, max_per_job, max_per_day, clock=time.time, key_budget=None,
                 keys=None):
        self.ledger = ledger
        self.max_per_job = max_per_job  # micro-dollars
        self.max_per_day = max_per_day
        self.clock = clock
        # A managed key without a daily_budget of its own gets a quarter of
        # the service's day by default: no one tenant can lock out the rest.
        self.key_budget = max_per_day // 4 if key_budget is None else key_budget
        self.keys = keys  # managed keys by id (storage.KeyStore)

    def cap(self, requested, default):
        """The job's cap in micro-dollars: what intake asked for (ValueError
        if over MAX_COST_PER_JOB), else the workflow's default, else the
        global one."""
        if requested is not None:
            cap = to_micro(requested)
            if cap > self.max_per_job:
                raise ValueError(f"max_cost may be at most {to_usd(self.max_per_job)}")
            return cap
        return self.max_per_job if default is None else min(default, self.max_per_job)

    def daily_budget(self, key):
        """A managed key's effective daily budget in micro-dollars."""
        return self.key_budget if key["daily_budget"] is None else key["daily_budget"]

    def limits(self, key_id, key=None):
        """The day budgets a job of ``key_id`` counts against: the service's,
        and a managed key's own. The operator's keys (and open development
        mode) answer to the service's alone."""
        if key is None and self.keys is not None:
            key = self.keys.get(key_id)
        limits = [("service", None, self.max_per_day)]
        if key is not None:
            limits.append(("key", key_id, self.daily_budget(key)))
        return limits

    def reserve(self, job, key=None):
        """At intake: reserve the job's declared cap against today's budgets
        (nothing if it is 0). A job with no declared cost reserves nothing,
        but is refused too when a budget has nothing left."""
        self.reserve_many([job], key)

    def reserve_many(self, jobs, key=None):
        """``reserve`` for jobs of one caller, all or none (a batch intake):
        BudgetExceeded's ``index`` names the first that does not fit."""
        items = [(i, job, job["max_cost"] if job.get("cost_declared", True) else 0)
                 for i, job in enumerate(jobs)
                 if job["max_cost"] or not job.get("cost_declared", True)]
        if not items:
            return
        try:
            self.ledger.reserve_many([(job, amount) for _, job, amount in items],
                                     self.limits(jobs[0]["key_id"], key))
        except BudgetExceeded as exc:
            exc.index = items[exc.index][0]
            raise

    def reserve_retry(self, job, key=None):
        """For a retry: reserve what is left of a declared cap (the cap
        covers every attempt). The amount reserved, or None, with nothing
        written, while the job still holds a reservation."""
        declared = job.get("cost_declared", True)
        if declared and not job["max_cost"]:
            return 0
        limits = self.limits(job["key_id"], key)
        if not declared:
            self.ledger.reserve(job, 0, limits)
            return 0
        return self.ledger.reserve_rest(job, job["max_cost"], limits)

    def top_up(self, job, micro):
        """Raise a running job's reservation to at least ``micro`` against
        today's budgets; BudgetExceeded if one would be passed."""
        self.ledger.top_up(job, micro, self.limits(job["key_id"]))

    def charge(self, job, micro, note=None, total=False, step=None):
        """Record money the job spent, always in full (with ``total``,
        ``micro`` is its running total). Returns (what the job has spent in
        all, the state of a day budget the unreserved part passed, or None)."""
        if total:
            spent = self.ledger.spent(job["job_id"])
            if micro <= spent:  # PERF: a repeated running total writes nothing
                return spent, None
        elif micro <= 0:
            return self.ledger.spent(job["job_id"]), None
        return self.ledger.charge(job, micro, self.limits(job["key_id"]), note, total, step)

    def settle(self, job, note=None):
        """An engine on_finish hook: release what the job did not spend."""
        if job.get("max_cost"):
            self.ledger.settle(job["job_id"], note or f"job {job['status']}")

    def refusal(self, exc, full=True):
        """What a request refused by a daily budget is told: (Retry-After,
        the 429 body's ``budget``). Without ``full`` (a managed key), a
        refusal by the service's budget shows only its scope and reset."""
        state = exc.state
        now = self.clock()
        resets_in = seconds_to_midnight(now)
        retry_after = resets_in
        if fits(state["used"] - state.get("reserved", 0), state["requested"], state["limit"]):
            retry_after = min(RETRY_SOON, resets_in)
        if not full and state["scope"] == "service":
            return retry_after, {"scope": "service", "resets_in": resets_in}
        return retry_after, {
            "scope": state["scope"], "day": state.get("day", utc_day(now)),
            "limit": to_usd(state["limit"]), "used": to_usd(state["used"]),
            "requested": to_usd(state["requested"]), "resets_in": resets_in,
        }

