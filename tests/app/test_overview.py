"""app.overview: enrollments page by page (SSCAN cursor), and the queue at a glance."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from app import CampaignClient, overview
from app.errors import CampaignNotFound, InvalidRequest
from app.keys import Keys
from app.overview import MAX_LIMIT, Page, list_enrollments, queue_overview
from app.settings import Settings
from tests.queue_view import claim_due

WAIT = {"id": "mix", "entry": "w1", "nodes": {
    "w1": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "done"},
    "done": {"type": "exit"}}}  # fmt: skip
ACTION = {"id": "mix", "entry": "a", "nodes": {
    "a": {"type": "action", "action": "log", "next": "w1"},
    "w1": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "done"},
    "done": {"type": "exit"}}}  # fmt: skip


def keys_of(client: CampaignClient) -> Keys:
    return Keys(client.settings.key_prefix, client.settings.shards)


async def enroll(client: CampaignClient, prefix: str, n: int, campaign: str = "mix") -> list[str]:
    contacts = [{"contact_id": f"{prefix}{i}"} for i in range(n)]
    assert await client.enroll_many(campaign, contacts, batch_size=500) == n
    return [f"{campaign}:{prefix}{i}" for i in range(n)]


async def mixed(client: CampaignClient) -> dict[str, tuple[str, str]]:
    """2,500 enrollments of campaign ``mix``: 800 waiting at w1, 200 cancelled at w1 (v1,
    entry a wait), 1000 scheduled at a and 500 running at a (v2, entry an action).
    Returns id -> (state, node)."""
    await client.register_campaign(WAIT)
    waiting = await enroll(client, "w", 1000)
    await client.register_campaign(ACTION)
    scheduled = await enroll(client, "s", 1500)
    assert len((await claim_due(client.service, limit=500)).claims) == 500
    index = keys_of(client).shard(0).state_index("mix", "running")
    running = {m.decode() for m in await client.redis.smembers(index)}  # type: ignore[misc]
    assert len(running) == 500
    cancelled = waiting[:200]
    assert all(await asyncio.gather(*(client.cancel(eid) for eid in cancelled)))
    expected = {eid: ("waiting", "w1") for eid in waiting[200:]}
    expected.update({eid: ("cancelled", "w1") for eid in cancelled})
    expected.update({eid: ("running" if eid in running else "scheduled", "a") for eid in scheduled})
    return expected


async def all_pages(client: CampaignClient, campaign: str = "mix", **kw: Any) -> list[Page]:
    pages: list[Page] = []
    cursor = None
    while True:
        page = await list_enrollments(client.redis, keys_of(client), campaign, cursor=cursor, **kw)
        pages.append(page)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor
        assert len(pages) < 10_000


def items(pages: list[Page]) -> list[tuple[str, str, str | None]]:
    return [item for page in pages for item in page.items]


async def test_pages_list_every_enrollment_exactly_once(client: CampaignClient) -> None:
    expected = await mixed(client)
    for limit in (100, 7, 1000):
        pages = await all_pages(client, limit=limit)
        listed = items(pages)
        assert Counter(eid for eid, _, _ in listed).most_common(1)[0][1] == 1
        assert {eid: (st, node) for eid, st, node in listed} == expected
        # full pages until the last one (which may be empty: SSCAN may say there is more
        # when the rest of the set is empty)
        assert all(len(p.items) == limit for p in pages[:-1]), limit
        assert len(pages[-1].items) <= limit
        assert -(-2500 // limit) <= len(pages) <= -(-2500 // limit) + 1


async def test_filter_by_state_and_node(client: CampaignClient) -> None:
    expected = await mixed(client)

    def want(state: str | None = None, node: str | None = None) -> set[str]:
        return {e for e, (s, n) in expected.items()
                if (state is None or s == state) and (node is None or n == node)}  # fmt: skip

    for state in ("scheduled", "running", "waiting", "cancelled", "completed", "failed"):
        listed = items(await all_pages(client, state=state, limit=300))
        assert all(st == state for _, st, _ in listed)
        assert sorted(eid for eid, _, _ in listed) == sorted(want(state)), state
    listed = items(await all_pages(client, node="a", limit=250))
    assert sorted(eid for eid, _, _ in listed) == sorted(want(node="a"))
    assert {n for _, _, n in listed} == {"a"}
    listed = items(await all_pages(client, state="running", node="a", limit=64))
    assert sorted(eid for eid, _, _ in listed) == sorted(want("running", "a"))
    assert len(listed) == 500
    empty = await list_enrollments(client.redis, keys_of(client), "mix", state="scheduled",
                                   node="w1")  # fmt: skip
    assert empty == Page([], None)
    assert await list_enrollments(client.redis, keys_of(client), "mix", node="nowhere") == Page(
        [], None
    )


async def test_a_node_filter_that_skips_many_returns_short_pages(
    client: CampaignClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call reads a bounded number of ids: pages come back short (even empty) with a
    cursor, and together they still list every match once."""
    expected = await mixed(client)
    monkeypatch.setattr(overview, "_SCAN_BUDGET", 300)
    monkeypatch.setattr(overview, "_FILTERED_COUNT", 100)
    pages = await all_pages(client, node="w1", limit=50)
    listed = [eid for eid, _, _ in items(pages)]
    assert sorted(listed) == sorted(e for e, (_, n) in expected.items() if n == "w1")
    assert any(not p.items and p.next_cursor for p in pages)  # the 1,500 at node a skipped
    assert len(pages) >= 1500 // 300


async def test_bad_arguments_are_named(client: CampaignClient) -> None:
    await client.register_campaign(WAIT)
    await enroll(client, "w", 30)
    redis, keys = client.redis, keys_of(client)
    for limit in (0, -1, MAX_LIMIT + 1):
        with pytest.raises(InvalidRequest, match=r"^limit: must be an integer from 1 to 1000"):
            await list_enrollments(redis, keys, "mix", limit=limit)
    with pytest.raises(InvalidRequest, match=r"^state: must be one of scheduled, running"):
        await list_enrollments(redis, keys, "mix", state="sleeping")
    forged = base64.urlsafe_b64encode(b"1.2.0.5.99999999.0.mix:w1").decode()
    for cursor in ("", "nope", "!!!", "MS4yLjA", "Mi4yLjAuMC4wLjAu", forged):
        with pytest.raises(InvalidRequest, match=r"^cursor: "):
            await list_enrollments(redis, keys, "mix", cursor=cursor)
    with pytest.raises(CampaignNotFound, match="no campaign named 'other'"):
        await list_enrollments(redis, keys, "other")
    # a cursor is tied to its listing (campaign, state and node filters), and to the
    # shard count: used with another one it is refused, not read as a position in it
    page = await list_enrollments(redis, keys, "mix", state="waiting", limit=10)
    assert page.next_cursor is not None
    for other in ({"state": "failed"}, {}, {"state": "waiting", "node": "w"}):
        with pytest.raises(InvalidRequest, match=r"^cursor: "):
            await list_enrollments(redis, keys, "mix", cursor=page.next_cursor, **other)  # type: ignore[arg-type]
    rest = await list_enrollments(redis, keys, "mix", state="waiting", cursor=page.next_cursor)
    assert len(rest.items) == 20


async def test_enrollments_that_keep_their_state_are_listed_while_others_move(
    client: CampaignClient,
) -> None:
    """Cancelling enrollments between pages (the set shrinks, listpack and hashtable sizes)
    never hides one that stayed waiting the whole time."""
    for n in (100, 1500):
        await client.redis.flushall()
        await client.register_campaign(WAIT)
        ids = await enroll(client, f"n{n}-", n)
        seen: list[str] = []
        moved: set[str] = set()
        cursor = None
        rounds = 0
        while True:
            page = await list_enrollments(client.redis, keys_of(client), "mix", state="waiting",
                                          limit=9, cursor=cursor)  # fmt: skip
            seen.extend(eid for eid, _, _ in page.items)
            # cancel one just listed and a few anywhere else (listed or not yet)
            pool = [e for e in ids if e not in moved]
            victims = pool[(rounds * 7) % len(pool) :: 41][:3]
            if page.items and page.items[0][0] not in moved:
                victims.append(page.items[0][0])
            for eid in set(victims):
                assert await client.cancel(eid)
                moved.add(eid)
            rounds += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        stayed, listed = set(ids) - moved, set(seen)
        assert len(stayed) > n // 3
        assert stayed <= listed, sorted(stayed - listed)[:5]
        assert len(seen) - len(set(seen)) <= len(moved)


async def test_pages_cover_every_shard(settings: Settings, redis: object) -> None:
    sharded = settings.model_copy(update={"shards": 3})
    async with CampaignClient(settings=sharded) as client:
        await client.register_campaign(WAIT)
        ids = await enroll(client, "c", 400)
        keys = keys_of(client)
        per_shard = Counter(keys.shard_of(eid) for eid in ids)
        assert set(per_shard) == {0, 1, 2}
        listed = items(await all_pages(client, limit=33))
        assert sorted(eid for eid, _, _ in listed) == sorted(ids)
        view = await queue_overview(client.redis, keys, sharded)
        assert [s.deferred for s in view.shards] == [per_shard[n] for n in range(3)]
        assert view.deferred == 400 and view.due == 0
        assert view.campaigns[0].counts["waiting"] == 400


async def test_queue_overview_counts(client: CampaignClient, settings: Settings) -> None:
    keys = keys_of(client)
    empty = await queue_overview(client.redis, keys, settings)
    assert (empty.due, empty.deferred, empty.running, empty.dead) == (0, 0, 0, 0)
    assert empty.campaigns == [] and empty.workers_alive == 0

    await client.register_campaign(WAIT)  # campaign "mix": waiting, timeout job deferred
    await enroll(client, "w", 30)
    await client.register_campaign({**ACTION, "id": "act"})  # due now
    acts = await enroll(client, "x", 20, campaign="act")
    assert await client.cancel(acts[0])
    batch = await claim_due(client.service, limit=5)
    assert len(batch.claims) == 5
    now = time.time()
    await client.redis.zadd(keys.workers, {"w-alive": now - 1, "w-gone": now - 120})
    shard = keys.shard(0)
    await client.redis.lpush(shard.dead, orjson.dumps({"job_id": "j", "reason": "test"}))  # type: ignore[misc]
    await client.redis.enqueue_job("ping", "t", _queue_name=settings.arq_queue)

    view = await queue_overview(client.redis, keys, settings)
    assert len(view.shards) == 1
    s0 = view.shards[0]
    assert (s0.shard, s0.due, s0.deferred, s0.running, s0.dead) == (0, 14, 30, 5, 1)
    assert (view.due, view.deferred, view.running, view.dead) == (14, 30, 5, 1)
    assert view.workers_alive == 1
    assert view.maintenance_queued == 1
    by_id = {c.campaign_id: c for c in view.campaigns}
    assert [c.campaign_id for c in view.campaigns] == ["act", "mix"]
    assert by_id["mix"].counts == {"scheduled": 0, "running": 0, "waiting": 30, "completed": 0,
                                   "failed": 0, "cancelled": 0}  # fmt: skip
    assert by_id["act"].counts == {"scheduled": 14, "running": 5, "waiting": 0, "completed": 0,
                                   "failed": 0, "cancelled": 1}  # fmt: skip
    assert (by_id["act"].total, by_id["act"].active) == (20, 19)
    # the same numbers as the store's own counts
    assert by_id["act"].counts == await client.service.store.count_by_state("act")
