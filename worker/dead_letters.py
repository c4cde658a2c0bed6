"""Dead letters: list, requeue and purge the jobs the worker dropped without running.

A dead letter is a queue entry the worker could not read (a payload of the wrong shape,
bytes that are not UTF-8, no payload at all). Its payload is kept only as a printable
excerpt, so "requeue" does not put those bytes back: it re-creates the enrollment's
current job from its record, as the reconciler would, and then drops the letter. A
letter whose job id names no enrollment cannot be requeued; ``--purge`` removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from app.client import CampaignClient
from app.errors import InvalidRequest
from app.jobs import enrollment_of_job
from app.keys import ShardKeys
from app.models import ACTIVE_STATES
from worker.reconciler import repair_missing_jobs

__all__ = [
    "DeadLetterEntry",
    "RequeueReport",
    "list_dead_letters",
    "purge_dead_letters",
    "requeue_dead_letters",
]

_ACTIVE = {s.value for s in ACTIVE_STATES}


@dataclass
class RequeueReport:
    """What a requeue did, one line per dead letter handled."""

    requeued: int = 0
    dropped: int = 0
    kept: int = 0
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead letter as read back: ``at`` in epoch seconds (None when unreadable), the
    payload as a printable excerpt."""

    shard: int
    job_id: str | None
    reason: str
    at: float | None
    payload: str


#: Epoch seconds of 10000-01-01: later (or nan) is not a time a letter was written.
_YEAR_10000 = 253_402_300_800


def _entry(shard: int, raw: bytes) -> DeadLetterEntry:
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return DeadLetterEntry(shard, None, "unreadable entry", None,
                               raw[:200].decode("utf-8", "backslashreplace"))  # fmt: skip
    try:
        at: float | None = float(doc.get("at") or 0) or None
    except (TypeError, ValueError, OverflowError):
        at = None
    if at is not None and not 0 < at < _YEAR_10000:  # nan, inf, or no date a clock can show
        at = None
    job_id = doc.get("job_id")
    return DeadLetterEntry(
        shard, job_id if isinstance(job_id, str) else None, str(doc.get("reason") or "?"),
        at, str(doc.get("payload") or "")[:200],
    )  # fmt: skip


async def list_dead_letters(
    client: CampaignClient, limit: int
) -> tuple[list[DeadLetterEntry], int]:
    """Up to ``limit`` dead letters (each shard's newest first), and how many there are."""
    entries: list[DeadLetterEntry] = []
    total = 0
    async with client.redis.pipeline(transaction=False) as pipe:
        for shard in client.service.keys.all_shards():
            pipe.lrange(shard.dead, 0, limit - 1)
            pipe.llen(shard.dead)
        replies = await pipe.execute()
    for n in range(0, len(replies), 2):
        entries.extend(_entry(n // 2, raw) for raw in replies[n])
        total += int(replies[n + 1])
    return entries[:limit], total


def _job_id(raw: bytes) -> str | None:
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    job_id = doc.get("job_id") if isinstance(doc, dict) else None
    return job_id if isinstance(job_id, str) else None


async def _letters(client: CampaignClient) -> list[tuple[ShardKeys, bytes]]:
    out: list[tuple[ShardKeys, bytes]] = []
    for shard in client.service.keys.all_shards():
        for raw in await client.redis.lrange(shard.dead, 0, -1):  # type: ignore[misc]
            out.append((shard, raw))
    return out


async def requeue_dead_letters(client: CampaignClient, job_id: str | None) -> RequeueReport:
    """Requeue the dead letters of ``job_id`` (None: all of them). Raises InvalidRequest
    when no dead letter has that job id."""
    report = RequeueReport()
    letters = await _letters(client)
    if job_id is not None:
        letters = [(shard, raw) for shard, raw in letters if _job_id(raw) == job_id]
        if not letters:
            raise InvalidRequest(f"no dead letter with job id {job_id!r}")
    done: dict[str, str] = {}  # enrollment id -> what happened (several letters, one repair)
    for shard, raw in letters:
        jid = _job_id(raw)
        eid = enrollment_of_job(jid) if jid else None
        if eid is None:
            report.kept += 1
            report.lines.append(f"kept {jid!r}: names no enrollment (--purge removes it)")
            continue
        if eid not in done:
            done[eid] = await _requeue_one(client, eid)
        outcome = done[eid]
        await client.redis.lrem(shard.dead, 1, raw)  # type: ignore[misc,arg-type]
        if outcome == "requeued":
            report.requeued += 1
        else:
            report.dropped += 1
        report.lines.append(f"{outcome} {jid}: enrollment {eid}")
    return report


async def _requeue_one(client: CampaignClient, eid: str) -> str:
    """Give ``eid`` its current job back if it lacks one; says what happened."""
    repaired = await repair_missing_jobs(client.service, [eid])
    if any(repaired.values()):
        return "requeued"
    state = (await client.service.store.records([eid], "state"))[0][0]
    if state is None:
        return "dropped (the enrollment no longer exists)"
    if state in _ACTIVE:
        return f"dropped (the enrollment is {state} and already has its job)"
    return f"dropped (the enrollment is {state})"


async def purge_dead_letters(client: CampaignClient) -> int:
    """Delete every dead letter; returns how many there were."""
    total = 0
    take = client.redis.register_script(_TAKE_ALL)
    for shard in client.service.keys.all_shards():
        total += int(await take(keys=[shard.dead]))
    return total


#: Count and delete a list in one step (a letter pushed meanwhile is counted or kept).
_TAKE_ALL = "local n = redis.call('LLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n"
