"""Retention policy: which snapshots to keep, and why.  Pure: no I/O.

Semantics are restic's (``ApplyPolicy``).  Snapshots are considered newest
first.  For each of the *bucketed* rules (``last``, ``hourly``, ``daily``,
``weekly``, ``monthly``, ``yearly``) with count N, a snapshot is kept when it
is the newest one of its bucket (its hour, day, ISO week, …, in the time
zone given) and fewer than N buckets were kept for that rule yet: so
``daily=7`` keeps the newest snapshot of each of the last 7 *days that have
snapshots*, however far apart they are.  ``last`` has one bucket per
snapshot.  ``within`` keeps every snapshot taken within that duration before
the newest snapshot (not before now: an idle database does not lose its
history).  ``tags`` keeps every snapshot carrying any of the tags.  A
snapshot is kept if any rule keeps it; the reasons say which.

Snapshots are grouped by source (host, port, database) and by what was
selected of it (snap's -n/-N/-t/-T), and each group gets the policy on its
own, as restic groups by host and paths: a one-off snapshot of one table is
not the newest backup of the whole database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: str = ""          # e.g. "7d", "1y2m", "36h"
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within or self.tags)


@dataclass(frozen=True)
class Item:
    """What the policy needs to know of a snapshot."""

    id: str
    time: datetime            # aware
    tags: tuple[str, ...] = ()


@dataclass
class Decision:
    keep: list[tuple[Item, list[str]]] = field(default_factory=list)
    remove: list[Item] = field(default_factory=list)


_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?$")


def parse_duration(text: str) -> tuple[int, int, int, int, int]:
    """'1y2m3w4d5h' -> (years, months, weeks, days, hours)."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"Cannot read the duration {text!r}; use a combination of <N>y <N>m "
                         "<N>w <N>d <N>h, such as 7d, 1y6m or 36h.")
    return tuple(int(g or 0) for g in m.groups())  # type: ignore[return-value]


def subtract(t: datetime, duration: str) -> datetime:
    years, months, weeks, days, hours = parse_duration(duration)
    month_index = t.year * 12 + (t.month - 1) - years * 12 - months
    year, month = divmod(month_index, 12)
    month += 1
    # Clamp the day: 31 March minus one month is 28/29 February.
    for day in range(t.day, 0, -1):
        try:
            shifted = t.replace(year=year, month=month, day=day)
            break
        except ValueError:
            continue
    return shifted - timedelta(weeks=weeks, days=days, hours=hours)


def _bucket(kind: str, t: datetime) -> tuple:
    if kind == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if kind == "daily":
        return (t.year, t.month, t.day)
    if kind == "weekly":
        iso = t.isocalendar()
        return (iso[0], iso[1])
    if kind == "monthly":
        return (t.year, t.month)
    if kind == "yearly":
        return (t.year,)
    raise ValueError(kind)


_BUCKETED = (("last", "last snapshot"), ("hourly", "hourly snapshot"),
             ("daily", "daily snapshot"), ("weekly", "weekly snapshot"),
             ("monthly", "monthly snapshot"), ("yearly", "yearly snapshot"))


def apply_policy(items: list[Item], policy: Policy, tz: tzinfo | None = None) -> Decision:
    """Keep and remove lists (newest first) for one group of snapshots."""
    ordered = sorted(items, key=lambda i: (i.time, i.id), reverse=True)
    decision = Decision()
    if not ordered:
        return decision
    remaining = {kind: getattr(policy, kind) for kind, _ in _BUCKETED}
    last_bucket: dict[str, tuple | None] = {kind: None for kind, _ in _BUCKETED}
    newest = ordered[0].time
    cutoff = subtract(newest, policy.within) if policy.within else None
    for item in ordered:
        local = item.time.astimezone(tz) if tz else item.time.astimezone()
        reasons = []
        for kind, reason in _BUCKETED:
            if remaining[kind] <= 0:
                continue
            bucket = (item.id,) if kind == "last" else _bucket(kind, local)
            if bucket != last_bucket[kind]:
                last_bucket[kind] = bucket
                remaining[kind] -= 1
                reasons.append(reason)
        if cutoff is not None and item.time >= cutoff:
            reasons.append(f"within {policy.within} of the newest")
        hit = sorted(set(policy.tags) & set(item.tags))
        if hit:
            reasons.append("tagged " + ", ".join(hit))
        if reasons:
            decision.keep.append((item, reasons))
        else:
            decision.remove.append(item)
    return decision


@dataclass
class GroupDecision:
    group: dict[str, str]
    keep: list[tuple[Item, list[str]]]
    remove: list[Item]


def group_key(source_host: str, source_port: str, database: str,
              filters: dict[str, list[str]] | None = None) -> dict:
    return {"host": source_host, "port": source_port, "database": database,
            "filters": filters or {}}


def plan(snapshots, policy: Policy, tz: tzinfo | None = None) -> list[GroupDecision]:
    """Apply the policy to each group of snapshots (by source).  ``snapshots`` are
    manifests with ``id``, ``time`` (ISO text), ``tags``, ``source`` and ``filters``."""
    groups: dict[tuple, list] = {}
    for s in snapshots:
        selected = tuple(sorted((k, tuple(sorted(v))) for k, v in (getattr(s, "filters", None)
                                                                    or {}).items()))
        groups.setdefault((s.source.host, s.source.port, s.source.database, selected),
                          []).append(s)
    out = []
    for (host, port, database, selected), members in sorted(groups.items()):
        items = [Item(s.id, _aware(s.time), tuple(s.tags)) for s in members]
        d = apply_policy(items, policy, tz)
        out.append(GroupDecision(group_key(host, port, database,
                                           {k: list(v) for k, v in selected}),
                                 d.keep, d.remove))
    return out


def _aware(iso: str) -> datetime:
    t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return t if t.tzinfo else t.astimezone()
