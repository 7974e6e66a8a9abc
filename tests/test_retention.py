"""The retention policy: a pure function, checked against a table of cases."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from fpvault.retention import Item, Policy, apply_policy, parse_duration, plan, subtract

UTC = timezone.utc


def items(*stamps: str, tz=UTC, tags=None):
    out = []
    for i, s in enumerate(stamps):
        t = datetime.fromisoformat(s)
        t = t if t.tzinfo else t.replace(tzinfo=tz)
        out.append(Item(f"s{i:02d}", t, tuple((tags or {}).get(i, ()))))
    return out


def kept(decision):
    return sorted(i.id for i, _ in decision.keep)


# Ten days with a gap (days 4-6 have nothing), two snapshots on some days.
GAPPY = items("2026-11-01T08:00", "2026-11-01T20:00", "2026-11-02T09:00", "2026-11-03T09:00",
              "2026-11-07T09:00", "2026-11-07T23:30", "2026-11-08T09:00", "2026-11-09T09:00",
              "2026-11-10T09:00", "2026-11-10T10:00")

CASES = [
    # (name, snapshots, policy, tz, kept ids)
    ("last 3", GAPPY, Policy(last=3), UTC, ["s07", "s08", "s09"]),
    ("last 0 keeps nothing", GAPPY, Policy(last=0, daily=0, tags=("x",)), UTC, []),
    ("daily 3: newest of each of the last 3 days that have snapshots", GAPPY, Policy(daily=3), UTC,
     ["s06", "s07", "s09"]),
    ("daily 5 skips the gap instead of counting empty days", GAPPY, Policy(daily=5), UTC,
     ["s03", "s05", "s06", "s07", "s09"]),
    ("daily 100 keeps one per day, the newest of the day", GAPPY, Policy(daily=100), UTC,
     ["s01", "s02", "s03", "s05", "s06", "s07", "s09"]),
    ("weekly 2 (ISO weeks: Nov 2 is a Monday)", GAPPY, Policy(weekly=2), UTC, ["s06", "s09"]),
    ("monthly 1", GAPPY, Policy(monthly=1), UTC, ["s09"]),
    ("yearly 5", GAPPY, Policy(yearly=5), UTC, ["s09"]),
    ("hourly 3", GAPPY, Policy(hourly=3), UTC, ["s07", "s08", "s09"]),
    ("rules combine: a snapshot kept by any", GAPPY, Policy(last=1, daily=2, monthly=2), UTC,
     ["s07", "s09"]),
    ("within 3d of the newest, not of now", GAPPY, Policy(within="3d"), UTC,
     ["s05", "s06", "s07", "s08", "s09"]),
    ("within 1d2h", GAPPY, Policy(within="1d2h"), UTC, ["s07", "s08", "s09"]),
    # In Tokyo (UTC+9) 20:00 UTC on Nov 1 is already Nov 2 and 23:30 UTC on Nov 7 is Nov 8:
    # the day buckets move with the zone.
    ("daily in Tokyo", GAPPY, Policy(daily=100), ZoneInfo("Asia/Tokyo"),
     ["s00", "s02", "s03", "s04", "s06", "s07", "s09"]),
    ("daily in Los Angeles", GAPPY, Policy(daily=3), ZoneInfo("America/Los_Angeles"),
     ["s06", "s07", "s09"]),
]


@pytest.mark.parametrize("name,snaps,policy,tz,want", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, snaps, policy, tz, want):
    d = apply_policy(snaps, policy, tz)
    assert kept(d) == want
    assert sorted(i.id for i in d.remove) == sorted(set(i.id for i in snaps) - set(want))


def test_tags_and_reasons():
    snaps = items("2026-01-01T00:00", "2026-01-02T00:00", "2026-01-03T00:00",
                  tags={0: ("release",), 1: ("nightly",)})
    d = apply_policy(snaps, Policy(last=1, tags=("release",)), UTC)
    reasons = {i.id: r for i, r in d.keep}
    assert reasons == {"s02": ["last snapshot"], "s00": ["tagged release"]}
    assert [i.id for i in d.remove] == ["s01"]


def test_dst_change_in_a_zone_keeps_one_per_local_day():
    # Europe/Berlin leaves DST on 2026-10-25: that local day has 25 hours.
    berlin = ZoneInfo("Europe/Berlin")
    snaps = items("2026-10-24T22:30", "2026-10-25T22:30", "2026-10-25T23:30",
                  "2026-10-26T22:59")
    d = apply_policy(snaps, Policy(daily=10), berlin)
    # In Berlin: s00 is Oct 25 00:30, s01 Oct 25 23:30, s02 Oct 26 00:30, s03 Oct 26 23:59.
    assert kept(d) == ["s01", "s03"]


def test_same_time_is_ordered_by_id_and_empty_input():
    t = "2026-05-05T05:05"
    d = apply_policy(items(t, t), Policy(last=1), UTC)
    assert kept(d) == ["s01"]
    assert apply_policy([], Policy(last=3)).keep == []


def test_durations():
    assert parse_duration("1y2m3w4d5h") == (1, 2, 3, 4, 5)
    t = datetime(2026, 3, 31, 12, tzinfo=UTC)
    assert subtract(t, "1m") == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert subtract(t, "1y1d") == datetime(2025, 3, 30, 12, tzinfo=UTC)
    assert subtract(t, "36h") == t - timedelta(hours=36)
    for bad in ("", "7", "d", "3x", "1d1y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_filtered_snapshot_is_a_group_of_its_own():
    """A one-off snapshot of one table (before a migration) is not the newest backup
    of the whole database: --keep-last 1 keeps one of each."""
    source = SimpleNamespace(host="h", port="5432", database="app")

    def manifest(i, filters):
        return SimpleNamespace(id=f"{i:064x}", time=f"2026-12-0{i}T10:00:00Z", tags=[],
                               source=source, filters=filters)

    snaps = [manifest(1, {}), manifest(2, {}), manifest(3, {"table": ["public.orders"]}),
             manifest(4, {"table": ["b", "a"]}), manifest(5, {"table": ["a", "b"]})]
    groups = plan(snaps, Policy(last=1))
    # (The same tables named in another order are the same selection.)
    assert [g.group["filters"] for g in groups] == [{}, {"table": ["a", "b"]},
                                                    {"table": ["public.orders"]}]
    assert [[i.id for i, _ in g.keep] for g in groups] == [[snaps[1].id], [snaps[4].id],
                                                          [snaps[2].id]]
    assert [[i.id for i in g.remove] for g in groups] == [[snaps[0].id], [snaps[3].id], []]
