"""The campaign job queue protocol, worker side: claim, renew leases, bury.

A shard's due jobs sit in a sorted set by due time; a claimed job moves to the leases set,
scored by its lease's expiry, until the transition that finishes it (``app/lua/
transition.lua``) removes it. A job whose lease expires is claimed again by any worker.
Every reply is parsed here into typed results; nothing else handles raw script replies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import orjson
from arq.connections import ArqRedis

from app.jobs import JobPayload, MalformedJob
from app.keys import Keys, ShardKeys
from app.store import load_script, with_derived

__all__ = ["DEAD_LETTERS_KEPT", "Claim", "ClaimBatch", "ClaimCode", "StepQueue"]

#: Dead letters kept per shard (newest first).
DEAD_LETTERS_KEPT = 1000


class ClaimCode(IntEnum):
    """What the claim script did with one queue entry."""

    CORRUPT = -2
    DEAD = -1
    STALE = 0
    STARTED = 1
    RERUN = 2


@dataclass(frozen=True)
class Claim:
    """One claimed job: its payload, parsed, and its enrollment's record after the claim."""

    code: ClaimCode
    job_id: str
    score_ms: int
    payload: JobPayload
    record: dict[str, str]
    shard: ShardKeys


@dataclass
class ClaimBatch:
    """The result of one claim call."""

    claims: list[Claim] = field(default_factory=list)
    #: Ids of jobs dropped because they were no longer their enrollment's current job.
    stale: list[str] = field(default_factory=list)
    #: (job id, reason) of entries dead-lettered, by the script or while parsing here.
    dead: list[tuple[str, str]] = field(default_factory=list)
    #: (job id, reason) of jobs whose enrollment record was corrupt: the script failed the
    #: enrollment with ``CorruptRecord``.
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    #: Jobs the script started but whose payload or record Python could not use: their
    #: enrollments must be failed by name (the engine does it). (job id, eid, record, reason)
    rejected: list[tuple[str, str, dict[str, str], str]] = field(default_factory=list)
    #: Earliest due time or lease expiry left in the shard (epoch ms), if any.
    next_ms: int | None = None


class StepQueue:
    """Claims, lease renewals and dead letters of campaign jobs across the shards."""

    def __init__(
        self, redis: ArqRedis, keys: Keys, *, lease_seconds: float, history_limit: int
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ms = int(lease_seconds * 1000)
        self.history_limit = history_limit
        self._claim = redis.register_script(load_script("worker", "claim.lua"))
        self._next_shard = 0

    async def claim(self, limit: int, now_ms: int | None = None) -> ClaimBatch:
        """Claim up to ``limit`` jobs: one call to one shard, the shards taken in turn so that
        a busy shard does not starve the others."""
        shard = self.keys.shard(self._next_shard)
        self._next_shard = (self._next_shard + 1) % self.keys.shards
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        raw = await self._claim(
            keys=[shard.queue, shard.leases, shard.jobs, shard.dead, shard.base],
            args=[limit, now, now + self.lease_ms, self.history_limit, DEAD_LETTERS_KEPT],
        )
        batch = ClaimBatch(next_ms=int(raw[0]) if int(raw[0]) >= 0 else None)
        buried: list[tuple[bytes, str, bytes]] = []
        for entry in raw[1:]:
            code = ClaimCode(int(entry[0]))
            if code == ClaimCode.STALE:
                batch.stale.append(_text(entry[1]))
                continue
            if code == ClaimCode.DEAD:
                batch.dead.append((_text(entry[1]), _text(entry[3])))
                continue
            if code == ClaimCode.CORRUPT:
                batch.corrupt.append((_text(entry[1]), _text(entry[3])))
                continue
            job_id, eid = _text(entry[1]), _text(entry[4])
            record = with_derived(eid, _pairs(entry[5:]))
            try:
                payload = JobPayload.parse(job_id, entry[3])
                score = int(float(entry[2]))
            except (MalformedJob, ValueError) as exc:
                # The script's check let it through; ours did not. Its enrollment is
                # running now, so it is failed by name rather than left without a job.
                buried.append((entry[1], str(exc), entry[3]))
                batch.rejected.append((job_id, eid, record, str(exc)))
                continue
            batch.claims.append(Claim(code, job_id, score, payload, record, shard))
        if buried:
            await self.bury(shard, buried)
        return batch

    async def renew(self, held: Iterable[tuple[ShardKeys, str]]) -> None:
        """Extend the leases of the jobs this worker runs (one call per shard)."""
        expiry = int(time.time() * 1000) + self.lease_ms
        by_shard: dict[str, tuple[ShardKeys, list[str]]] = {}
        for shard, job_id in held:
            by_shard.setdefault(shard.leases, (shard, []))[1].append(job_id)
        if not by_shard:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, (_shard, ids) in by_shard.items():
                # XX: a lease already finished or handed back is not brought back.
                pipe.zadd(key, dict.fromkeys(ids, expiry), xx=True)
            await pipe.execute()

    async def bury(self, shard: ShardKeys, entries: Sequence[tuple[bytes, str, bytes]]) -> None:
        """Dead-letter jobs (raw id, reason, raw payload) that could not be used."""
        # No MULTI (a cluster client has none): if this is cut short, the reconciler gives
        # the enrollment its job back; at worst a letter is missing.
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw_id, reason, payload in entries:
                doc = {
                    "job_id": raw_id.decode("utf-8", "backslashreplace"),
                    "reason": reason,
                    "at": time.time(),
                    "payload": payload[:4096].decode("utf-8", "backslashreplace"),
                }
                pipe.zrem(shard.leases, raw_id)
                pipe.hdel(shard.jobs, raw_id)  # type: ignore[arg-type]
                pipe.lpush(shard.dead, orjson.dumps(doc))
            pipe.ltrim(shard.dead, 0, DEAD_LETTERS_KEPT - 1)
            await pipe.execute()


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    items = [_text(v) for v in flat]
    return dict(zip(items[::2], items[1::2], strict=True))
