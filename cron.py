"""Cron expressions, read as Vixie cron reads them, in any IANA time zone.

    Cron("*/15 9-17 * * mon-fri", "Europe/Paris").next_after(time.time())

Five fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
jan-dec) and day of week (0-7 or sun-sat; 0 and 7 are Sunday), each ``*``, a
number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a list of those
separated by commas; or one of the macros ``@hourly``, ``@daily``
(``@midnight``), ``@weekly``, ``@monthly``, ``@yearly`` (``@annually``).

As in Vixie cron, when both day fields are restricted (neither starts with
``*``) a day matches either; otherwise it must match both. Across daylight
saving changes, also as Vixie cron: a job at a fixed time (no ``*`` in its
minute or hour field) that falls in the hour skipped in spring runs at the
change, and in the hour repeated in autumn runs once, the first time;
a job with ``*`` in its minute or hour runs by the wall clock, so skipped
times do not happen and repeated ones happen twice.
"""

import datetime
import zoneinfo

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
          ("day of week", 0, 7))
NAMES = {
    3: {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                    "sep", "oct", "nov", "dec"), start=1)},
    4: {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
MINUTE = datetime.timedelta(minutes=1)
SEARCH_DAYS = 5 * 366 + 1  # a schedule that fires at all fires within this (Feb 29 in 4 years)


class CronError(ValueError):
    """An expression or time zone that cannot be read; the message says which part."""


def _value(text, index):
    name, low, high = FIELDS[index]
    number = NAMES.get(index, {}).get(text.lower())
    if number is None:
        if not (text.isascii() and text.isdigit()):
            raise CronError(f"{name}: {text!r} is not a number" + (" or a name" if index in NAMES else ""))
        number = int(text)
    if not low <= number <= high:
        raise CronError(f"{name}: {number} is not between {low} and {high}")
    return number


def _field(text, index):
    """The set of values one field allows."""
    name, low, high = FIELDS[index]
    values = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step:
            if not (step.isascii() and step.isdigit()) or int(step) == 0:
                raise CronError(f"{name}: the step {step!r} must be a whole number above 0")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = _value(a, index), _value(b, index)
            if first > last:
                raise CronError(f"{name}: the range {span!r} runs backwards")
        else:
            first = _value(span, index)
            last = high if step else first  # "5/15": from 5 on, every 15
        values.update(range(first, last + 1, int(step or 1)))
    return values


class Cron:
    def __init__(self, expression, timezone="UTC"):
        if not isinstance(expression, str) or not expression.strip():
            raise CronError("cron: an expression is required")
        text = MACROS.get(expression.strip().lower(), expression.strip())
        if text.startswith("@"):
            raise CronError(f"cron: unknown macro {expression!r}")
        parts = text.split()
        if len(parts) != 5:
            raise CronError(f"cron: five fields are needed (minute hour day month weekday), not {len(parts)}")
        self.expression = expression
        self.minutes, self.hours, self.days, self.months, weekdays = (
            _field(p, i) for i, p in enumerate(parts))
        self.weekdays = {d % 7 for d in weekdays}  # 7 is Sunday too
        self.day_star, self.weekday_star = parts[2].startswith("*"), parts[4].startswith("*")
        self.wild = parts[0].startswith("*") or parts[1].startswith("*")
        try:
            self.zone = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
            raise CronError(f"timezone: {timezone!r} is not an IANA time zone name") from None
        if self.next_after(0) is None:
            raise CronError(f"cron: {expression!r} never fires")

    def _day_matches(self, day):
        in_month = day.day in self.days
        in_week = day.isoweekday() % 7 in self.weekdays
        if self.day_star or self.weekday_star:
            return in_month and in_week
        return in_month or in_week

    def _next_match(self, wall, until):
        """The first wall-clock minute at or after ``wall`` that the fields
        allow (naive, in the zone), or None before ``until``."""
        while wall < until:
            if wall.month not in self.months:
                wall = (wall.replace(day=1, hour=0, minute=0) + datetime.timedelta(days=32)).replace(day=1)
            elif not self._day_matches(wall):
                wall = wall.replace(hour=0, minute=0) + datetime.timedelta(days=1)
            elif wall.hour not in self.hours:
                wall = wall.replace(minute=0) + datetime.timedelta(hours=1)
            elif wall.minute not in self.minutes:
                later = [m for m in self.minutes if m > wall.minute]
                wall = wall.replace(minute=min(later)) if later else \
                    wall.replace(minute=0) + datetime.timedelta(hours=1)
            else:
                return wall
        return None

    def _instants(self, wall):
        """The moments (Unix seconds) at which wall-clock time ``wall`` fires."""
        first = wall.replace(tzinfo=self.zone, fold=0).timestamp()
        second = wall.replace(tzinfo=self.zone, fold=1).timestamp()
        if first == second:
            return [first]
        if datetime.datetime.fromtimestamp(first, self.zone).replace(tzinfo=None) == wall:
            return [first, second] if self.wild else [first]  # the repeated hour
        if self.wild:
            return []  # skipped by the clock
        after = wall + MINUTE  # a fixed time in the skipped hour: at the change
        while datetime.datetime.fromtimestamp(after.replace(tzinfo=self.zone).timestamp(),
                                              self.zone).replace(tzinfo=None) != after:
            after += MINUTE
        return [after.replace(tzinfo=self.zone).timestamp()]

    def next_after(self, t):
        """The first moment after Unix time ``t`` at which this fires; None if
        it never does (such as "0 0 30 2 *")."""
        local = datetime.datetime.fromtimestamp(t, self.zone)
        wall = local.replace(tzinfo=None, second=0, microsecond=0)
        until = wall + datetime.timedelta(days=SEARCH_DAYS)
        while True:
            wall = self._next_match(wall, until)
            if wall is None:
                return None
            later = [i for i in self._instants(wall) if i > t]
            if later:
                return min(later)
            wall += MINUTE
