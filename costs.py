"""Cost guardrails: money, per-job caps and daily budgets.

Amounts are integer micro-dollars everywhere inside Levqor (``to_micro``);
the API shows dollars as JSON numbers rounded to six places (``to_usd``).
No binary float ever holds a sum.

The rules: a job's cap (its ``max_cost``, at most MAX_COST_PER_JOB) covers
all its attempts, and is reserved at intake against today's budgets, the
service's MAX_COST_PER_DAY and the managed key's ``daily_budget``. Money
spent is always recorded, in full: a charge spends from the reservation,
and what it takes past it counts against the day budgets at once, even past
a cap (the job then fails). When the job ends the rest of the reservation
is released. The arithmetic and its atomicity live in ``ledger.Ledger``;
this module holds the policy and the conversions.
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
    """A reservation or charge that does not fit: ``state`` says which budget."""

    def __init__(self, state):
        super().__init__(f"the {state['scope']} budget is exhausted")
        self.state = state


def seconds_to_midnight(now):
    return int(86_400 - now % 86_400) or 1


def fits(used, amount, limit):
    """Whether ``amount`` more fits a budget of which ``used`` is taken. A
    job that reserves nothing still needs something left to spend."""
    return used + amount <= limit if amount else used < limit


class Guardrails:
    def __init__(self, ledger, max_per_job, max_per_day, clock=time.time, keys=None):
        self.ledger = ledger
        self.max_per_job = max_per_job  # micro-dollars
        self.max_per_day = max_per_day
        self.clock = clock
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

    def limits(self, key_id, key=None):
        """The day budgets a job of ``key_id`` counts against: the service's,
        and a managed key's daily_budget if it has one."""
        if key is None and self.keys is not None:
            key = self.keys.get(key_id)
        limits = [("service", None, self.max_per_day)]
        if key is not None and key["daily_budget"] is not None:
            limits.append(("key", key_id, key["daily_budget"]))
        return limits

    def reserve(self, job, key=None):
        """Reserve the job's cap against today's budgets (none if the cap is 0)."""
        if not job["max_cost"]:
            return
        self.ledger.reserve(job, job["max_cost"], self.limits(job["key_id"], key))

    def reserve_retry(self, job, key=None):
        """For a retry: reserve what is left of the cap (it covers every
        attempt). The amount reserved, or None, with nothing written, while
        the job still holds a reservation."""
        if not job["max_cost"]:
            return 0
        return self.ledger.reserve_rest(job, job["max_cost"], self.limits(job["key_id"], key))

    def charge(self, job, micro, note=None, total=False):
        """Record money the job spent, always in full (with ``total``,
        ``micro`` is its running total). Returns (what the job has spent in
        all, the state of a day budget the unreserved part passed, or None)."""
        if total:
            spent = self.ledger.spent(job["job_id"])
            if micro <= spent:  # PERF: a repeated running total writes nothing
                return spent, None
        elif micro <= 0:
            return self.ledger.spent(job["job_id"]), None
        return self.ledger.charge(job, micro, self.limits(job["key_id"]), note, total)

    def settle(self, job, note=None):
        """An engine on_finish hook: release what the job did not spend."""
        if job.get("max_cost"):
            self.ledger.settle(job["job_id"], note or f"job {job['status']}")

    def refusal(self, exc):
        """What an intake refused by a daily budget is told (429 body fields)."""
        state = exc.state
        now = self.clock()
        resets_in = seconds_to_midnight(now)
        return resets_in, {
            "scope": state["scope"], "day": state.get("day", utc_day(now)),
            "limit": to_usd(state["limit"]), "used": to_usd(state["used"]),
            "requested": to_usd(state["requested"]), "resets_in": resets_in,
        }

