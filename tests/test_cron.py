"""The cron parser: a table of known next-fire times, daylight saving in
both directions as Vixie cron handles it, refusals naming their field, and
croniter (a test dependency only) as a second opinion on thousands of
random expressions."""

import datetime
import random
import zoneinfo

import pytest
from croniter import croniter

from cron import Cron, CronError


def at(text):
    return datetime.datetime.fromisoformat(text).timestamp()


def local(t, zone):
    return datetime.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(zone)).isoformat()


# (expression, time zone, after, the next fire)
KNOWN = [
    ("* * * * *", "UTC", "2026-03-01T10:00:30+00:00", "2026-03-01T10:01:00+00:00"),
    ("*/15 * * * *", "UTC", "2026-03-01T10:00:00+00:00", "2026-03-01T10:15:00+00:00"),
    ("0 9 * * mon-fri", "UTC", "2026-02-27T09:00:00+00:00", "2026-03-02T09:00:00+00:00"),
    ("30 2 1 * *", "UTC", "2026-01-31T12:00:00+00:00", "2026-02-01T02:30:00+00:00"),
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
    ("0 12 13 * fri", "UTC", "2026-03-01T00:00:00+00:00", "2026-03-06T12:00:00+00:00"),  # either day
    ("0 0 * jan,jul *", "UTC", "2026-02-01T00:00:00+00:00", "2026-07-01T00:00:00+00:00"),
    ("5-10/5 1 * * 7", "UTC", "2026-03-01T00:00:00+00:00", "2026-03-01T01:05:00+00:00"),  # 7 is Sunday
    ("@hourly", "UTC", "2026-03-01T10:59:59+00:00", "2026-03-01T11:00:00+00:00"),
    ("@daily", "UTC", "2026-03-01T10:00:00+00:00", "2026-03-02T00:00:00+00:00"),
    ("@weekly", "UTC", "2026-03-02T00:00:00+00:00", "2026-03-08T00:00:00+00:00"),
    ("@monthly", "UTC", "2026-03-02T00:00:00+00:00", "2026-04-01T00:00:00+00:00"),
    ("0 9 * * *", "Asia/Tokyo", "2026-03-01T00:00:00+00:00", "2026-03-02T00:00:00+00:00"),
    ("0 9 * * *", "America/New_York", "2026-03-01T00:00:00+00:00", "2026-03-01T14:00:00+00:00"),
]


@pytest.mark.parametrize("expression, zone, after, expected", KNOWN)
def test_known_next_fire_times(expression, zone, after, expected):
    assert Cron(expression, zone).next_after(at(after)) == at(expected)


def fires(expression, zone, start, count):
    cron, t, seen = Cron(expression, zone), at(start), []
    for _ in range(count):
        t = cron.next_after(t)
        seen.append(local(t, zone))
    return seen


def test_spring_forward_runs_a_fixed_time_in_the_skipped_hour_at_the_change():
    # New York skips 02:00-03:00 on 2026-03-08.
    got = fires("30 2 * * *", "America/New_York", "2026-03-08T05:00:00+00:00", 2)
    assert got == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]


def test_spring_forward_skips_wildcard_times_that_do_not_exist():
    got = fires("30 * * * *", "America/New_York", "2026-03-08T05:00:00+00:00", 3)
    assert got == ["2026-03-08T00:30:00-05:00", "2026-03-08T01:30:00-05:00", "2026-03-08T03:30:00-04:00"]


def test_fall_back_runs_a_fixed_time_once_and_wildcard_times_twice():
    # New York repeats 01:00-02:00 on 2026-11-01.
    assert fires("30 1 * * *", "America/New_York", "2026-11-01T04:00:00+00:00", 2) == [
        "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
    assert fires("30 * * * *", "America/New_York", "2026-11-01T04:00:00+00:00", 4) == [
        "2026-11-01T00:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:30:00-05:00"]


@pytest.mark.parametrize("expression, zone, says", [
    ("60 * * * *", "UTC", "minute: 60 is not between 0 and 59"),
    ("* 24 * * *", "UTC", "hour"),
    ("* * 0 * *", "UTC", "day of month"),
    ("* * * 13 *", "UTC", "month"),
    ("* * * * 8", "UTC", "day of week"),
    ("* * * foo *", "UTC", "month: 'foo' is not a number or a name"),
    ("*/0 * * * *", "UTC", "step"),
    ("5-1 * * * *", "UTC", "backwards"),
    ("* * * *", "UTC", "five fields"),
    ("@fortnightly", "UTC", "unknown macro"),
    ("0 0 30 2 *", "UTC", "never fires"),
    ("", "UTC", "required"),
    ("0 * * * *", "Mars/Olympus", "timezone"),
    ("0 * * * *", "../etc/passwd", "timezone"),
])
def test_what_cannot_be_read_is_refused_saying_what(expression, zone, says):
    with pytest.raises(CronError) as refused:
        Cron(expression, zone)
    assert says in str(refused.value)


def random_field(rng, low, high, day_field):
    roll = rng.random()
    if roll < 0.3:
        return "*"
    if roll < 0.45 and not day_field:  # Vixie reads "*/n" in a day field as unrestricted
        return f"*/{rng.randint(1, high)}"
    parts = []
    for _ in range(rng.randint(1, 3)):
        a = rng.randint(low, high - 1)
        kind = rng.random()
        if kind < 0.4:
            parts.append(str(a))
        elif kind < 0.8:
            parts.append(f"{a}-{rng.randint(a + 1, high)}")
        else:
            parts.append(f"{a}-{rng.randint(a + 1, high)}/{rng.randint(1, 5)}")
    return ",".join(parts)


def test_thousands_of_random_expressions_agree_with_croniter():
    """In UTC, where the two need not differ on daylight saving. (croniter
    reads a range of one value, "5-5", differently: none is generated.)"""
    rng = random.Random(20261129)
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
    compared = 0
    for _ in range(3000):
        expression = " ".join(random_field(rng, low, high, i in (2, 4))
                              for i, (low, high) in enumerate(bounds))
        try:
            cron = Cron(expression)
        except CronError:
            continue  # such as 31 February
        start = rng.uniform(1.6e9, 1.9e9)
        theirs = croniter(expression, datetime.datetime.fromtimestamp(start, datetime.timezone.utc))
        mine = start
        for _ in range(3):
            mine = cron.next_after(mine)
            assert mine == theirs.get_next(float), (expression, start)
        compared += 1
    assert compared > 2500


def test_after_a_long_outage_missed_fires_collapse_into_the_latest_past_one():
    from schedules import latest_fire
    spec = {"cron": "0 9 * * mon-fri", "timezone": "UTC", "every": None}
    sunday_noon = at("2026-03-08T12:00:00+00:00")
    # Due a year ago: the fire they collapse into is Friday's, never one to come.
    assert latest_fire(spec, at("2025-03-07T09:00:00+00:00"), sunday_noon) == \
        at("2026-03-06T09:00:00+00:00")
    every_minute = {"cron": "* * * * *", "timezone": "UTC", "every": None}
    assert latest_fire(every_minute, 0.0, sunday_noon) == sunday_noon
    assert latest_fire({"cron": None, "every": 7}, 100.0, 150.0) == 149.0
