"""Cost guardrails: money, per-job caps and daily budgets.

Amounts are integer micro-dollars everywhere inside Levqor (``to_micro``);
the API shows dollars as JSON numbers rounded to six places (``to_usd``).
No binary float ever holds a sum.

The rules: a job's cap (its ``max_cost``, at most MAX_COST_PER_JOB) is
reserved at intake against today's budgets, the service's MAX_COST_PER_DAY
and the managed key's ``daily_budget``; a charge spends from that
reservation and is refused if it would pass the cap; when the job ends the
rest of the reservation is released. The arithmetic and its atomicity live
in ``storage.Ledger``; this module holds the policy and the conversions.
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


class Guardrails:
    def __init__(self, ledger, max_per_job, max_per_day, clock=time.time):
        self.ledger = ledger
        self.max_per_job = max_per_job  # micro-dollars
        self.max_per_day = max_per_day
        self.clock = clock

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

    def reserve(self, job, key=None):
        """Reserve the job's cap against today's budgets (none if the cap is 0)."""
        if not job["max_cost"]:
            return
        limits = [("service", None, self.max_per_day)]
        if key is not None and key.get("daily_budget") is not None:
            limits.append(("key", job["key_id"], key["daily_budget"]))
        self.ledger.reserve(job, job["max_cost"], limits)

    def charge(self, job_id, micro, note=None):
        """Spend from the job's reservation; BudgetExceeded if past its cap."""
        if micro <= 0:
            return self.ledger.spent(job_id)
        return self.ledger.charge(job_id, micro, note)

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

