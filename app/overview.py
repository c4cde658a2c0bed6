"""Read-only views for operators: enrollments of a campaign page by page, and the queue.

Both stay cheap however many enrollments there are. :func:`list_enrollments` costs
O(page): it walks the per-campaign state index sets with SSCAN and an opaque cursor.
:func:`queue_overview` uses only O(1)/O(log n) commands per shard and per campaign (ZCOUNT,
ZCARD, LLEN, SCARD), never a scan of the enrollments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis

from app.errors import CampaignNotFound, InvalidRequest
from app.keys import Keys, ShardKeys
from app.models import ACTIVE_STATES, State
from app.settings import Settings

__all__ = [
    "MAX_LIMIT",
    "WORKER_ALIVE_SECONDS",
    "CampaignCounts",
    "Overview",
    "Page",
    "ShardOverview",
    "list_enrollments",
    "node_counts",
    "queue_overview",
]

#: The largest page :func:`list_enrollments` returns.
MAX_LIMIT = 1000
#: A worker whose last heartbeat is older than this is not counted as alive (the same
#: window as the ``campaign_workers_alive`` gauge).
WORKER_ALIVE_SECONDS = 30.0

_STATES: list[str] = [s.value for s in State]
#: SSCAN COUNT when a node filter may skip most of what is read.
_FILTERED_COUNT = 500
#: Ids read (and filtered) by one call at most: a page may come back short (even empty,
#: with a ``next_cursor``) when the node filter skips many, so one call stays bounded.
_SCAN_BUDGET = 20_000
#: Campaigns whose counts go in one pipeline.
_SLICE = 500
_CURSOR_VERSION = "2"


# -- listing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of enrollments: ``(enrollment id, state, node)`` tuples, and the cursor of
    the next page (None when this was the last)."""

    items: list[tuple[str, str, str | None]]
    next_cursor: str | None


@dataclass(frozen=True)
class _Position:
    """Where a listing stands: index set ``state`` of ``shard``, at SSCAN cursor ``scan``.

    ``after`` is set when the previous page ended inside the batch that SSCAN returns at
    ``scan``: that batch was read with COUNT ``count`` and ended at SSCAN cursor ``until``,
    and its ids up to ``after`` (in sorted order) were listed.
    """

    state: int
    shard: int
    scan: int = 0
    count: int = 0
    until: int = 0
    after: str | None = None

    def encode(self, scope: str) -> str:
        text = ".".join(
            [_CURSOR_VERSION, scope, *(str(n) for n in (self.state, self.shard, self.scan,
                                                        self.count, self.until)), self.after or ""]
        )  # fmt: skip
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str, scope: str, states: list[int], shards: int) -> _Position:
        bad = InvalidRequest(
            f"cursor: {cursor[:80]!r} is not a cursor of this listing (pass the next_cursor "
            "of the previous page, with the same campaign, state and node)"
        )
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            version, of, *numbers, after = text.split(".", 7)
            state, shard, scan, count, until = (int(n) for n in numbers)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise bad from None
        if (
            version != _CURSOR_VERSION
            or of != scope
            or state not in states
            or not 0 <= shard < shards
            or min(scan, count, until) < 0
            or max(scan, until) >= 2**64
            or count > max(MAX_LIMIT, _FILTERED_COUNT)
            or (after and count < 1)
        ):
            raise bad
        return cls(state, shard, scan, count, until, after or None)


async def list_enrollments(
    redis: ArqRedis,
    keys: Keys,
    campaign_id: str,
    *,
    state: str | None = None,
    node: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """Up to ``limit`` (1 to 1000) enrollments of a campaign, optionally only those in
    ``state`` and/or at ``node``, from ``cursor`` (None: the first page).

    Pass the returned ``next_cursor`` (with the same campaign and state) for the next
    page; None means there is no more. As with SCAN, an enrollment that keeps its state
    while the pages are read is listed at least once; one that changes state meanwhile may
    be listed twice or not at all. A page may be shorter than ``limit``, even empty,
    while ``next_cursor`` is set (a node filter that skips many, or the end of a set that
    SSCAN had not seen yet).

    Raises :class:`~app.errors.InvalidRequest` naming ``limit``, ``state`` or
    ``cursor``, and :class:`~app.errors.CampaignNotFound` for an unknown campaign.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be an integer from 1 to {MAX_LIMIT} (got {limit!r})")
    if state is None:
        states = list(range(len(_STATES)))
    elif state in _STATES:
        states = [_STATES.index(state)]
    else:
        raise InvalidRequest(f"state: must be one of {', '.join(_STATES)} (got {state!r})")
    # A cursor names the listing it continues: one of another campaign, state or node
    # filter is refused rather than read as a position in this one.
    scope = hashlib.sha256(f"{campaign_id}\0{state}\0{node}".encode()).hexdigest()[:12]
    if cursor is None:
        if not await redis.sismember(keys.campaigns, campaign_id):  # type: ignore[misc]
            raise CampaignNotFound(f"no campaign named {campaign_id[:200]!r} is registered")
        pos: _Position | None = _Position(states[0], 0)
    else:
        pos = _Position.decode(cursor, scope, states, keys.shards)

    items: list[tuple[str, str, str | None]] = []
    budget = _SCAN_BUDGET
    while pos is not None and len(items) < limit and budget > 0:
        if pos.scan == 0 and not pos.after:  # at the start of a set: skip to one that exists
            pos = await _first_nonempty(redis, keys, campaign_id, pos, states)
            if pos is None:
                break
        need = limit - len(items)
        count = pos.count if pos.after else (need if node is None else _FILTERED_COUNT)
        index = keys.shard(pos.shard).state_index(campaign_id, _STATES[pos.state])
        raw_next, members = await redis.sscan(index, pos.scan, count=count)
        next_scan = int(raw_next)
        ids = sorted(_s(m) for m in members)
        if pos.after and next_scan == pos.until:
            # The same stretch of the set as when the last page ended inside it: go on
            # after the last id listed. (Otherwise the set was resized or changed: read the
            # batch again from its start, which may list some twice but misses none.)
            ids = [i for i in ids if i > pos.after]
        budget -= len(ids)
        found = await _matching(redis, keys.shard(pos.shard), ids, _STATES[pos.state], node)
        if len(found) > need:
            items.extend(found[:need])
            pos = _Position(pos.state, pos.shard, pos.scan, count, next_scan, found[need - 1][0])
            break
        items.extend(found)
        pos = _advance(pos, next_scan, states, keys.shards)
    if pos is not None and pos.scan == 0 and not pos.after:
        pos = await _first_nonempty(redis, keys, campaign_id, pos, states)
    return Page(items, pos.encode(scope) if pos is not None else None)


async def _first_nonempty(
    redis: ArqRedis, keys: Keys, campaign_id: str, pos: _Position, states: list[int]
) -> _Position | None:
    """The first index set from ``pos`` on that exists (one pipelined EXISTS each), so the
    last page says there is no more rather than leading to an empty page."""
    rest = [(st, sh) for st in states if st >= pos.state for sh in range(keys.shards)
            if (st, sh) >= (pos.state, pos.shard)]  # fmt: skip
    async with redis.pipeline(transaction=False) as pipe:
        for st, sh in rest:
            pipe.exists(keys.shard(sh).state_index(campaign_id, _STATES[st]))
        found = await pipe.execute()
    return next((_Position(st, sh) for (st, sh), n in zip(rest, found, strict=True) if n), None)


def _advance(pos: _Position, next_scan: int, states: list[int], shards: int) -> _Position | None:
    """The position after a whole SSCAN batch: the next batch, set, or None at the end."""
    if next_scan != 0:
        return _Position(pos.state, pos.shard, next_scan)
    if pos.shard + 1 < shards:
        return _Position(pos.state, pos.shard + 1)
    later = [s for s in states if s > pos.state]
    return _Position(later[0], 0) if later else None


async def _matching(
    redis: ArqRedis, shard: ShardKeys, ids: list[str], state: str, node: str | None
) -> list[tuple[str, str, str | None]]:
    """``(id, state, node)`` of the ids whose record is (still) in ``state`` and at
    ``node`` when given, in the order of ``ids``: one pipelined HMGET."""
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for eid in ids:
            pipe.hmget(shard.enrollment(eid), ["state", "node"])
        rows = await pipe.execute()
    out: list[tuple[str, str, str | None]] = []
    for eid, (raw_state, raw_node) in zip(ids, rows, strict=True):
        if raw_state is None or _s(raw_state) != state:
            continue  # gone, or moved to another state (listed from that state's set)
        at = _s(raw_node) if raw_node else None
        if node is not None and at != node:
            continue
        out.append((eid, state, at))
    return out


# -- the queue at a glance ----------------------------------------------------------------


@dataclass(frozen=True)
class ShardOverview:
    """Campaign jobs of one shard: due now, due later, running (leased), dead letters."""

    shard: int
    due: int
    deferred: int
    running: int
    dead: int


@dataclass(frozen=True)
class CampaignCounts:
    """Enrollments of one campaign per state (every state present, 0 included)."""

    campaign_id: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def active(self) -> int:
        """Scheduled, running and waiting enrollments."""
        return sum(n for s, n in self.counts.items() if s in {a.value for a in ACTIVE_STATES})


@dataclass(frozen=True)
class Overview:
    """The queue per shard, live workers, arq's maintenance queue, and every campaign's
    enrollment counts (sorted by campaign id), as of ``at`` (epoch seconds)."""

    at: float
    shards: list[ShardOverview]
    workers_alive: int
    maintenance_queued: int
    campaigns: list[CampaignCounts] = field(default_factory=list)

    @property
    def due(self) -> int:
        return sum(s.due for s in self.shards)

    @property
    def deferred(self) -> int:
        return sum(s.deferred for s in self.shards)

    @property
    def running(self) -> int:
        return sum(s.running for s in self.shards)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.shards)


async def queue_overview(redis: ArqRedis, keys: Keys, settings: Settings) -> Overview:
    """Jobs due, deferred, running and dead-lettered per shard, workers alive (heartbeat
    within :data:`WORKER_ALIVE_SECONDS`), jobs in arq's maintenance queue
    (``settings.arq_queue``), and each registered campaign's enrollments by state (SCARD
    of the index sets). O(1)/O(log n) per shard and per campaign."""
    now = time.time()
    now_ms = int(now * 1000)
    shards = keys.all_shards()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.workers, now - WORKER_ALIVE_SECONDS, "+inf")
        pipe.zcard(settings.arq_queue)
        pipe.smembers(keys.campaigns)
        for shard in shards:
            pipe.zcount(shard.queue, "-inf", now_ms)
            pipe.zcount(shard.queue, f"({now_ms}", "+inf")
            pipe.zcard(shard.leases)
            pipe.llen(shard.dead)
        alive, maintenance, members, *per_shard = await pipe.execute()
    campaigns = sorted(_s(m) for m in members)
    counts = {cid: dict.fromkeys(_STATES, 0) for cid in campaigns}
    for start in range(0, len(campaigns), _SLICE):
        part = campaigns[start : start + _SLICE]
        async with redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                for cid in part:
                    for st in _STATES:
                        pipe.scard(shard.state_index(cid, st))
            cards = await pipe.execute()
        per_campaign = len(_STATES)
        for i, n in enumerate(cards):
            cid = part[(i // per_campaign) % len(part)]
            counts[cid][_STATES[i % per_campaign]] += int(n)
    return Overview(
        at=now,
        shards=[
            ShardOverview(n, *(int(v) for v in per_shard[4 * n : 4 * n + 4]))
            for n in range(len(shards))
        ],
        workers_alive=int(alive),
        maintenance_queued=int(maintenance),
        campaigns=[CampaignCounts(cid, counts[cid]) for cid in campaigns],
    )


# -- where enrollments are --------------------------------------------------------------

#: Enrollment records :func:`node_counts` reads at most.
NODE_COUNT_BUDGET = 200_000


async def node_counts(
    redis: ArqRedis, keys: Keys, campaign_id: str, *, budget: int = NODE_COUNT_BUDGET
) -> tuple[dict[str, dict[str, int]], bool]:
    """Enrollments of a campaign per node and state (``"-"`` for no node), and whether
    every enrollment was counted (False once ``budget`` records were read).

    Nodes are not indexed, so this reads the node of each enrollment: SSCAN of the state
    index sets and one pipelined HMGET per slice, O(enrollments) up to ``budget``.
    """
    counts: dict[str, dict[str, int]] = {}
    read = 0
    for shard in keys.all_shards():
        for state in _STATES:
            cursor = 0
            while True:
                cursor, members = await redis.sscan(
                    shard.state_index(campaign_id, state), cursor, count=1000
                )
                if members:
                    async with redis.pipeline(transaction=False) as pipe:
                        for member in members:
                            pipe.hmget(shard.enrollment(_s(member)), ["state", "node"])
                        rows = await pipe.execute()
                    for raw_state, raw_node in rows:
                        if raw_state is None or _s(raw_state) != state:
                            continue  # gone or moved meanwhile: counted under its new state
                        at = _s(raw_node) if raw_node else "-"
                        per = counts.setdefault(at, dict.fromkeys(_STATES, 0))
                        per[state] += 1
                    read += len(members)
                    if read >= budget:
                        return counts, False
                if int(cursor) == 0:
                    break
    return counts, True


def _s(value: Any) -> str:
    # "replace": a stray member that is not UTF-8 has no record and is skipped, not raised
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
