"""The transition script (app/lua/transition.lua), driven directly through EnrollmentStore
on a real Redis: preconditions, what is written and what is not, and the job swap."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.jobs import Job
from app.keys import Keys
from app.settings import Settings
from app.store import EnrollmentStore, Transition, now_ms

EID = "c:x"
KEYS = Keys("campaign")
SHARD = KEYS.for_enrollment(EID)


@pytest.fixture
def store(redis: Any, settings: Settings) -> EnrollmentStore:
    return EnrollmentStore(redis, KEYS, history_limit=5)


def entry(to: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    return {"at": now_ms(), "to": to, "reason": reason, **extra}


def job(job_id: str = "step:c:x:1:1", score: int | None = None) -> Job:
    return Job(
        job_id,
        "run_step",
        [EID, 1, 1],
        {"campaign": "c", "node": "a"},
        score if score is not None else now_ms(),
    )


async def create(
    store: EnrollmentStore,
    eid: str = EID,
    *,
    state: str = "scheduled",
    step: int = 1,
    attempt: int = 1,
    add_job: Job | None = None,
) -> None:
    tr = Transition(
        campaign_id="c",
        create=True,
        expect_step=0,
        set={
            "state": state,
            "campaign": "c",
            "node": "a",
            "step": str(step),
            "attempt": str(attempt),
            "job": f"step:{eid}:{step}:{attempt}",
        },
        history=[entry(state, "created")],
        add_job=add_job,
    )
    applied = await store.apply(eid, tr)
    assert applied.ok and applied.state == state


def move(
    state: str,
    *,
    expect: str = "scheduled",
    step: int | None = 1,
    attempt: int | None = None,
    **kw: Any,
) -> Transition:
    return Transition(
        campaign_id="c",
        expect_states=(expect,),
        expect_step=step,
        expect_attempt=attempt,
        set={"state": state},
        history=[entry(state)],
        **kw,
    )


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key and its serialized value: equal snapshots mean nothing was written."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


async def indexed(redis: Any, eid: str = EID) -> list[str]:
    """The index sets that hold ``eid``."""
    found = []
    for key in sorted(await redis.keys(SHARD.state_index("c", "*"))):
        if await redis.sismember(key, eid):
            found.append(key.decode().rsplit(":", 1)[1])
    return found


async def history(redis: Any, eid: str = EID) -> list[dict[str, Any]]:
    return [orjson.loads(h) for h in await redis.lrange(KEYS.history(eid), 0, -1)]


# --- transition.lua --------------------------------------------------------------------


async def test_create_writes_record_history_index_and_job(
    store: EnrollmentStore, redis: Any, settings: Settings
) -> None:
    score = now_ms() + 3_600_000
    await create(store, add_job=job(score=score))
    record = await store.record(EID)
    assert record == {
        "state": "scheduled",
        "campaign": "c",
        "node": "a",
        "step": "1",
        "attempt": "1",
        "job": f"step:{EID}:1:1",
        "contact": "x",  # derived from the id, not stored
    }
    # a new record's history list is only started at its first move
    assert await history(redis) == []
    assert not await redis.exists(KEYS.history(EID))
    assert await indexed(redis) == ["scheduled"]
    assert await redis.zscore(SHARD.queue, "step:c:x:1:1") == score
    payload = orjson.loads(await redis.hget(SHARD.jobs, "step:c:x:1:1"))
    assert (payload["f"], payload["a"], payload["k"], payload["t"]) == (
        "run_step",
        [EID, 1, 1],
        {"campaign": "c", "node": "a"},
        1,
    )
    # no expiry: a job lives until the transition that retires it
    assert await redis.ttl(SHARD.jobs) == -1


async def test_create_refuses_an_existing_record(store: EnrollmentStore, redis: Any) -> None:
    await create(store)
    before = await snapshot(redis)
    again = Transition(
        campaign_id="c",
        create=True,
        expect_step=0,
        set={"state": "waiting", "campaign": "c"},
        history=[entry("waiting")],
        add_job=job("step:c:x:9:1"),
    )
    applied = await store.apply(EID, again)
    assert (applied.ok, applied.state, applied.step) == (False, "scheduled", 1)
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    ("state", "expect_step", "ok"),
    [
        ("completed", 3, True),
        ("cancelled", 3, True),
        ("failed", 3, True),
        ("completed", 2, False),
        ("scheduled", 3, False),
        ("waiting", 3, False),
    ],
)
async def test_reentry_replaces_only_a_terminal_record_at_the_expected_step(
    store: EnrollmentStore, redis: Any, state: str, expect_step: int, ok: bool
) -> None:
    await create(store, state=state, step=3)
    before = await snapshot(redis)
    tr = Transition(
        campaign_id="c",
        create=True,
        reentry=True,
        expect_step=expect_step,
        set={"state": "scheduled", "campaign": "c", "step": "4"},
        history=[entry("scheduled", "re-entered")],
    )
    applied = await store.apply(EID, tr)
    assert applied.ok is ok
    if ok:
        assert (await store.record(EID) or {})["step"] == "4"
        assert await indexed(redis) == ["scheduled"]
        assert [h["reason"] for h in await history(redis)] == ["re-entered"]
    else:
        assert (applied.state, applied.step) == (state, 3)
        assert await snapshot(redis) == before


@pytest.mark.parametrize(
    "tr",
    [
        move("running", expect="waiting"),  # wrong state
        move("running", step=2),  # wrong step
        move("running", attempt=2),  # wrong attempt
    ],
    ids=["state", "step", "attempt"],
)
async def test_precondition_mismatch_returns_the_current_state_and_writes_nothing(
    store: EnrollmentStore, redis: Any, settings: Settings, tr: Transition
) -> None:
    await create(store, add_job=job())
    tr.add_job = job("step:c:x:2:1")
    tr.unset = ["node"]
    before = await snapshot(redis)
    applied = await store.apply(EID, tr)
    assert (applied.ok, applied.state, applied.step, applied.missing) == (
        False,
        "scheduled",
        1,
        False,
    )
    assert await snapshot(redis) == before
    assert await redis.zscore(SHARD.queue, "step:c:x:1:1") is not None


async def test_matching_state_step_and_attempt_applies(store: EnrollmentStore) -> None:
    await create(store)
    applied = await store.apply(EID, move("running", step=1, attempt=1))
    assert applied.ok and applied.state == "running"


async def test_no_expected_step_means_any_step(store: EnrollmentStore) -> None:
    await create(store, step=7)
    assert (await store.apply(EID, move("cancelled", step=None))).ok


async def test_missing_record_returns_missing_and_writes_nothing(
    store: EnrollmentStore, redis: Any
) -> None:
    tr = move("running", add_job=job())
    applied = await store.apply(EID, tr)
    assert (applied.ok, applied.missing) == (False, True)
    assert await redis.keys("*") == []


async def test_index_sets_follow_the_state(store: EnrollmentStore, redis: Any) -> None:
    eid = "c:contact:with:colons"
    await create(store, eid)
    assert await indexed(redis, eid) == ["scheduled"]
    for old, new in (("scheduled", "running"), ("running", "waiting"), ("waiting", "completed")):
        assert (await store.apply(eid, move(new, expect=old))).ok
        assert await indexed(redis, eid) == [new]
        assert await redis.scard(SHARD.state_index("c", old)) == 0
    # a transition that keeps the state leaves the index alone
    same = Transition(campaign_id="c", expect_states=("completed",), set={"updated_at": "1"})
    assert (await store.apply(eid, same)).ok
    assert await indexed(redis, eid) == ["completed"]
    assert await store.count_by_state("c") == {
        "scheduled": 0,
        "running": 0,
        "waiting": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert await store.list_ids("c", "completed") == [eid]


async def test_history_is_capped_at_the_limit(store: EnrollmentStore, redis: Any) -> None:
    await create(store)
    for n in range(11):
        tr = Transition(
            campaign_id="c", expect_states=("scheduled",), history=[entry("scheduled", f"n{n}")]
        )
        assert (await store.apply(EID, tr)).ok
    assert [h["reason"] for h in await history(redis)] == ["n6", "n7", "n8", "n9", "n10"]


async def test_a_new_state_retires_the_current_job(store: EnrollmentStore, redis: Any) -> None:
    await create(store, add_job=job())
    await redis.zadd(SHARD.leases, {"step:c:x:1:1": 1})  # as if a worker held it too
    tr = move("cancelled", unset=["node", "job"])
    assert (await store.apply(EID, tr)).ok
    assert await redis.zcard(SHARD.queue) == 0
    assert await redis.zcard(SHARD.leases) == 0
    assert not await redis.hexists(SHARD.jobs, "step:c:x:1:1")
    record = await store.record(EID)
    assert record is not None and record["state"] == "cancelled" and "node" not in record


async def test_a_new_job_replaces_the_current_one(store: EnrollmentStore, redis: Any) -> None:
    await create(store, add_job=job())
    tr = move("scheduled", add_job=job("step:c:x:1:2", score=5))
    tr.set["job"] = "step:c:x:1:2"
    assert (await store.apply(EID, tr)).ok
    assert await redis.zrange(SHARD.queue, 0, -1, withscores=True) == [(b"step:c:x:1:2", 5.0)]
    assert await redis.hkeys(SHARD.jobs) == [b"step:c:x:1:2"]


async def test_requeue_hands_the_job_back_and_keeps_it(store: EnrollmentStore, redis: Any) -> None:
    await create(store, state="running", add_job=job())
    await redis.zrem(SHARD.queue, "step:c:x:1:1")
    await redis.zadd(SHARD.leases, {"step:c:x:1:1": now_ms() + 10_000})
    tr = move("scheduled", expect="running", requeue_ms=42)
    tr.expect_job = "step:c:x:1:1"
    assert (await store.apply(EID, tr)).ok
    assert await redis.zrange(SHARD.queue, 0, -1, withscores=True) == [(b"step:c:x:1:1", 42.0)]
    assert await redis.zcard(SHARD.leases) == 0
    assert await redis.hexists(SHARD.jobs, "step:c:x:1:1")


async def test_only_the_current_job_may_finish(store: EnrollmentStore, redis: Any) -> None:
    await create(store, state="running", add_job=job())
    tr = move("completed", expect="running")
    tr.expect_job = "step:c:x:1:1@123"  # a superseded job
    before = await snapshot(redis)
    assert not (await store.apply(EID, tr)).ok
    assert await snapshot(redis) == before


@pytest.mark.parametrize("where", ["queue", "leases"])
async def test_orphan_repair_refuses_a_job_that_is_queued_or_leased(
    store: EnrollmentStore, redis: Any, where: str
) -> None:
    await create(store, add_job=job())
    if where == "leases":
        await redis.zrem(SHARD.queue, "step:c:x:1:1")
        await redis.zadd(SHARD.leases, {"step:c:x:1:1": 1})
    before = await snapshot(redis)
    tr = move("scheduled", add_job=job(), orphan=True)
    assert (await store.apply(EID, tr)).not_orphan
    assert await snapshot(redis) == before
    await redis.zrem(SHARD.queue, "step:c:x:1:1")
    await redis.zrem(SHARD.leases, "step:c:x:1:1")
    assert (await store.apply(EID, tr)).ok
    assert await redis.zscore(SHARD.queue, "step:c:x:1:1") is not None


async def test_values_pass_through_the_script_unchanged(store: EnrollmentStore, redis: Any) -> None:
    odd = 'Zoë 🎉 "quoted" \\ back/slash\nnew line \x01 {"json": [1, 2]}'
    await create(store)
    at = now_ms()
    hist = {"at": at, "to": "scheduled", "node": None, "step": 1, "reason": odd}
    tr = Transition(
        campaign_id="c",
        expect_states=("scheduled",),
        set={"attributes": odd, "empty": ""},
        history=[hist],
    )
    assert (await store.apply(EID, tr)).ok
    record = await store.record(EID)
    assert record is not None and record["attributes"] == odd and record["empty"] == ""
    last = (await history(redis))[-1]
    assert {k: last[k] for k in hist} == hist  # reason, null and a 13-digit ms time intact


async def test_apply_many_runs_independent_transitions(store: EnrollmentStore) -> None:
    await create(store, "c:a")
    results = await store.apply_many(
        [("c:a", move("running")), ("c:b", move("running")), ("c:a", move("running"))]
    )
    assert [(r.ok, r.missing, r.state) for r in results] == [
        (True, False, "running"),
        (False, True, None),
        (False, False, "running"),
    ]


async def test_the_first_move_starts_the_history_with_the_creation(
    store: EnrollmentStore, redis: Any
) -> None:
    tr = Transition(
        campaign_id="c", create=True, expect_step=0,
        set={"state": "waiting", "node": "w", "step": "1", "attempt": "1", "created_at": "1000"},
        history=[entry("waiting", "enrolled; wait for e")],
    )  # fmt: skip
    assert (await store.apply(EID, tr)).ok
    assert await history(redis) == []
    assert (await store.apply(EID, move("completed", expect="waiting"))).ok
    [first, second] = await history(redis)
    assert (first["at"], first["from"], first["to"], first["node"], first["reason"]) == (
        1000, None, "waiting", "w", "enrolled",
    )  # fmt: skip
    assert (second["from"], second["to"]) == ("waiting", "completed")


async def test_unleased_refuses_while_the_current_job_is_leased(
    store: EnrollmentStore, redis: Any
) -> None:
    await create(store, add_job=job())
    await redis.zrem(SHARD.queue, "step:c:x:1:1")
    await redis.zadd(SHARD.leases, {"step:c:x:1:1": now_ms() + 10_000})
    before = await snapshot(redis)
    tr = move("scheduled", add_job=job(), unleased=True, expect_job="step:c:x:1:1")
    assert (await store.apply(EID, tr)).leased == "step:c:x:1:1"
    assert await snapshot(redis) == before
    await redis.zrem(SHARD.leases, "step:c:x:1:1")
    await redis.zadd(SHARD.queue, {"step:c:x:1:1": now_ms()})
    assert (await store.apply(EID, tr)).ok


async def test_create_expects_the_step_a_purged_enrollment_left(
    store: EnrollmentStore, redis: Any
) -> None:
    await redis.hset(SHARD.tombstones, EID, 4)
    before = await snapshot(redis)
    tr = Transition(campaign_id="c", create=True, expect_step=0,
                    set={"state": "scheduled", "step": "5"}, history=[entry("scheduled")])  # fmt: skip
    refused = await store.apply(EID, tr)
    assert (refused.ok, refused.state, refused.step) == (False, None, 4)
    assert await snapshot(redis) == before
    tr.expect_step = 4
    assert (await store.apply(EID, tr)).ok
    assert await redis.hexists(SHARD.tombstones, EID) == 0
    assert await redis.hget(SHARD.enrollment(EID), "step") == b"5"
