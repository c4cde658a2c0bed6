"""Enrollment records in Redis and the atomic transitions that change them.

Each transition is one Lua call (``lua/transition.lua``): it checks the expected state and
step, writes the new fields and a history entry, keeps the per-state index sets, and swaps
the enrollment's current job (the old one dequeued and its lease dropped, the new one
queued). No half-done transitions if a process dies, and no two writers can both win.
Transitions issued concurrently are sent together in one pipeline (see
:class:`ScriptBatcher`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from app.errors import CorruptRecord
from app.jobs import Job, split_enrollment_id
from app.keys import Keys, ShardKeys
from app.models import (
    EnrollmentStatus,
    EnrollmentSummary,
    ErrorInfo,
    HistoryEntry,
    State,
    ms_to_datetime,
)

__all__ = [
    "PURGED",
    "Applied",
    "EnrollmentStore",
    "NewEnrollment",
    "ScriptBatcher",
    "Transition",
    "index_slices",
    "load_script",
    "now_ms",
    "to_status",
]

_STATES = [s.value for s in State]
#: Contacts per call of lua/enroll.lua (about 20 ms of Redis time each).
ENROLL_CHUNK = 1000
_TERMINAL = ["completed", "failed", "cancelled"]
#: :meth:`EnrollmentStore.create_many`'s code for a row whose enrollment id has a tombstone.
PURGED = -3


def now_ms() -> int:
    """Wall-clock epoch milliseconds (what job due times are scored with)."""
    return int(time.time() * 1000)


def load_script(package: str, name: str) -> str:
    """The text of a Lua script shipped in ``<package>/lua/``."""
    path: Traversable = resources.files(package).joinpath("lua", name)
    return path.read_text()


class ScriptBatcher:
    """Send the calls of one script made in the same event-loop turn as one pipeline.

    Under load many steps finish at once; one round trip for all of them costs Redis and
    the client far less than one each. A call made alone still goes out at once.
    """

    def __init__(self, redis: ArqRedis, script: AsyncScript) -> None:
        self.redis = redis
        self.script = script
        self._pending: list[tuple[Sequence[str], Sequence[Any], asyncio.Future[Any]]] = []
        self._loaded = False

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, fut))
        if len(self._pending) == 1:
            loop.call_soon(self._flush_soon)
        return await fut

    def _flush_soon(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        task.add_done_callback(_consume)

    async def _send(
        self, batch: list[tuple[Sequence[str], Sequence[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            results = await self.run([(k, a) for k, a, _ in batch])
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        exc if isinstance(exc, Exception) else ConnectionError(repr(exc))
                    )
            return
        for (_, _, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def run(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run ``calls`` in one pipeline; each result is a reply or the exception it raised."""
        if len(calls) == 1:
            keys, args = calls[0]
            try:
                return [await self.script(keys=keys, args=args)]
            except Exception as exc:  # the caller's future gets it
                return [exc]
        if not self._loaded:  # once, rather than a batch of NOSCRIPT errors
            await self.redis.script_load(self.script.script)
            self._loaded = True
        results = await self._pipeline(calls)
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:
            # The script cache was emptied (a restart, SCRIPT FLUSH) part-way: a NOSCRIPT call
            # ran nothing, the others ran and must not run twice. Re-send only those.
            await self.redis.script_load(self.script.script)
            for i, result in zip(
                again, await self._pipeline([calls[i] for i in again]), strict=True
            ):
                results[i] = result
        return results

    async def _pipeline(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        # Plain EVALSHA, not the Script object: a pipeline holding Script objects first
        # sends SCRIPT EXISTS, which doubles the round trips of every batch. As a command,
        # not pipe.evalsha(): redis-py's cluster pipeline blocks that method, yet routes the
        # command by its keys (every call's keys share one slot).
        sha = self.script.sha
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class NewEnrollment:
    """One contact of a batch enrollment, planned: what its record and first job hold."""

    enrollment_id: str
    job_id: str
    payload: str
    due_ms: int
    attributes: str
    timezone: str


@dataclass
class Transition:
    """One atomic change of an enrollment; see ``lua/transition.lua`` for the semantics."""

    campaign_id: str
    expect_states: Sequence[str] = ()
    expect_step: int | None = None
    expect_attempt: int | None = None
    expect_job: str | None = None
    create: bool = False
    reentry: bool = False
    set: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    add_job: Job | None = None
    #: Hand the current job back to the queue at this time (ms), keeping it current.
    requeue_ms: int | None = None
    #: Apply only if the current job is neither queued nor leased (the reconciler's repair).
    orphan: bool = False
    #: Apply only if the current job is not leased: no worker is running it (migrate).
    unleased: bool = False

    @property
    def new_state(self) -> str | None:
        return self.set.get("state")


@dataclass(frozen=True)
class Applied:
    """What a transition did: ``ok``, else why not."""

    ok: bool
    state: str | None = None
    step: int | None = None
    missing: bool = False
    #: A job with the id the transition wanted to queue already exists (never "stale").
    job_conflict: str | None = None
    #: The reconciler's repair found the current job queued or leased after all.
    not_orphan: bool = False
    #: ``unleased`` was asked and the current job (this id) is leased: running now.
    leased: str | None = None


class EnrollmentStore:
    """Reads and atomic writes of enrollment records."""

    def __init__(self, redis: ArqRedis, keys: Keys, *, history_limit: int) -> None:
        self.redis = redis
        self.keys = keys
        self.history_limit = history_limit
        self._transition = ScriptBatcher(
            redis, redis.register_script(load_script("app", "transition.lua"))
        )
        self._enroll = redis.register_script(load_script("app", "enroll.lua"))

    # -- writes -------------------------------------------------------------------------

    def call_args(
        self, enrollment_id: str, tr: Transition, now: int
    ) -> tuple[list[str], list[bytes]]:
        """The KEYS and ARGV of one transition."""
        job = None
        if tr.add_job is not None:
            j = tr.add_job
            job = {"id": j.id, "payload": j.payload(now).decode(), "score": j.score_ms}
        states = list(dict.fromkeys(tr.expect_states))
        if tr.create:
            states.extend(_TERMINAL)  # a re-entry replaces a terminal record
        if tr.new_state and tr.new_state not in states:
            states.append(tr.new_state)
        op = {
            "id": enrollment_id,
            "idx": states,
            "campaign": tr.campaign_id,
            "expect": {
                "states": list(tr.expect_states),
                "step": tr.expect_step,
                "attempt": tr.expect_attempt,
                "job": tr.expect_job,
            },
            "create": tr.create,
            "reentry": tr.reentry,
            "set": tr.set,
            "unset": tr.unset,
            "history": [orjson.dumps(h).decode() for h in tr.history],
            "history_limit": self.history_limit,
            "add_job": job,
            "requeue": tr.requeue_ms,
            "orphan": tr.orphan,
            "unleased": tr.unleased,
        }
        shard = self.keys.for_enrollment(enrollment_id)
        keys = [
            shard.enrollment(enrollment_id),
            shard.history(enrollment_id),
            shard.queue,
            shard.leases,
            shard.jobs,
            shard.tombstones,
            *(shard.state_index(tr.campaign_id, s) for s in states),
        ]
        return keys, [orjson.dumps(op)]

    @staticmethod
    def _result(raw: list[Any]) -> Applied:
        code = int(raw[0])
        if code == 1:
            return Applied(True, _s(raw[1]))
        if code == -1:
            return Applied(False, missing=True)
        if code == -2:
            return Applied(False, job_conflict=_s(raw[1]))
        if code == -3:
            return Applied(False, not_orphan=True)
        if code == -4:
            return Applied(False, leased=_s(raw[1]))
        return Applied(False, _s(raw[1]) or None, int(raw[2]) if len(raw) > 2 else None)

    async def apply(self, enrollment_id: str, tr: Transition, now: int | None = None) -> Applied:
        """Run one transition atomically (batched with concurrent ones)."""
        keys, args = self.call_args(enrollment_id, tr, now or now_ms())
        return self._result(await self._transition(keys, args))

    async def apply_many(self, items: Sequence[tuple[str, Transition]]) -> list[Applied]:
        """Run many independent transitions in one pipelined round trip."""
        now = now_ms()
        calls = [self.call_args(enrollment_id, tr, now) for enrollment_id, tr in items]
        out = []
        for raw in await self._transition.run(calls):
            if isinstance(raw, Exception):
                raise raw
            out.append(self._result(raw))
        return out

    async def create_many(self, campaign_id: str, state: str, common: dict[str, str],
                          time_field: str, rows: Sequence[NewEnrollment]) -> list[int | str]:  # fmt: skip
        """Create many records of one campaign that all start in ``state``: one Lua call per
        shard (``lua/enroll.lua``). Returns, per row: 1 created, -2 its job id is taken,
        :data:`PURGED` (not created: a purged enrollment with this id left a tombstone, so
        it must be created through a transition that goes on from its last step), else
        the state of the record that already exists."""
        by_shard: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_shard.setdefault(self.keys.shard_of(row.enrollment_id), []).append(i)
        out: list[int | str] = [0] * len(rows)
        common_json = orjson.dumps(common)
        chunks = [
            (n, indexes[i : i + ENROLL_CHUNK])
            for n, indexes in by_shard.items()
            for i in range(0, len(indexes), ENROLL_CHUNK)
        ]
        for n, indexes in chunks:  # bounded calls: a huge batch never blocks Redis for long
            shard = self.keys.shard(n)
            keys = [shard.queue, shard.jobs, shard.state_index(campaign_id, state),
                    shard.tombstones]  # fmt: skip
            packed = []
            for i in indexes:
                row = rows[i]
                keys.append(shard.enrollment(row.enrollment_id))
                packed.append((row.enrollment_id, row.job_id, row.payload, row.due_ms,
                               row.attributes, row.timezone))  # fmt: skip
            args: list[bytes | str] = [common_json, time_field, orjson.dumps(packed)]
            replies = await self._enroll(keys=keys, args=args)
            for i, reply in zip(indexes, replies, strict=True):
                out[i] = _s(reply) if isinstance(reply, bytes) else int(reply)
        return out

    # -- reads --------------------------------------------------------------------------

    async def record(self, enrollment_id: str) -> dict[str, str] | None:
        """The raw record, or None."""
        raw = await self.redis.hgetall(self.keys.enrollment(enrollment_id))  # type: ignore[misc]
        if not raw:
            return None
        return with_derived(enrollment_id, {_s(k): _s(v) for k, v in raw.items()})

    async def records(self, enrollment_ids: Sequence[str], *fields: str) -> list[list[str | None]]:
        """Selected fields of many records in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid in enrollment_ids:
                pipe.hmget(self.keys.enrollment(eid), list(fields))
            raw = await pipe.execute()
        return [[_s(v) if v is not None else None for v in row] for row in raw]

    async def status(self, enrollment_id: str) -> EnrollmentStatus | None:
        """The record and its history, or None."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.enrollment(enrollment_id))
            pipe.lrange(self.keys.history(enrollment_id), 0, -1)
            raw, hist = await pipe.execute()
        if not raw:
            return None
        rec = with_derived(enrollment_id, {_s(k): _s(v) for k, v in raw.items()})
        entries = [orjson.loads(h) for h in hist] or [creation_entry(rec)]
        return to_status(enrollment_id, rec, entries)

    async def summaries(self, enrollment_ids: Sequence[str]) -> list[EnrollmentSummary | None]:
        """Many enrollments without their history, in one round trip: None for one that
        is gone or whose record cannot be read (``status`` of that one names the field)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid in enrollment_ids:
                pipe.hgetall(self.keys.enrollment(eid))
            raws = await pipe.execute()
        out: list[EnrollmentSummary | None] = []
        for eid, raw in zip(enrollment_ids, raws, strict=True):
            if not raw:
                out.append(None)
                continue
            rec = with_derived(eid, {_s(k): _s(v) for k, v in raw.items()})
            try:
                out.append(to_status(eid, rec, []))
            except CorruptRecord:
                out.append(None)
        return out

    async def count_by_state(self, campaign_id: str) -> dict[str, int]:
        """Enrollments of a campaign per state, from the index sets (O(1) each)."""
        shards = self.keys.all_shards()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                for state in _STATES:
                    pipe.scard(shard.state_index(campaign_id, state))
            counts = await pipe.execute()
        out = dict.fromkeys(_STATES, 0)
        for i, n in enumerate(counts):
            out[_STATES[i % len(_STATES)]] += int(n)
        return out

    async def list_ids(self, campaign_id: str, state: str, limit: int = 100) -> list[str]:
        """Up to ``limit`` enrollment ids of a campaign in a state (SSCAN, not KEYS)."""
        out: list[str] = []
        for shard in self.keys.all_shards():
            async for member in self.redis.sscan_iter(
                shard.state_index(campaign_id, state), count=min(limit, 1000)
            ):
                out.append(_s(member))
                if len(out) >= limit:
                    return out
        return out

    def shard(self, enrollment_id: str) -> ShardKeys:
        """Key names of the shard holding ``enrollment_id``."""
        return self.keys.for_enrollment(enrollment_id)


async def index_slices(redis: ArqRedis, key: str, count: int) -> AsyncIterator[list[str]]:
    """The members of an index set, a slice (about ``count``) at a time, with SSCAN: a
    member present the whole walk is seen at least once, and members may be removed as
    the walk goes."""
    cursor = 0
    while True:
        cursor, members = await redis.sscan(key, cursor, count=count)
        if members:
            yield [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        if int(cursor) == 0:
            return


def to_status(
    enrollment_id: str, rec: dict[str, str], history: list[dict[str, Any]]
) -> EnrollmentStatus:
    """Build the public status from a raw record.

    A field that cannot be read raises :class:`~app.errors.CorruptRecord` naming the
    enrollment and the field (never ``ValueError`` or ``JSONDecodeError``).
    """
    field = "?"
    try:
        field = "error"
        error = None
        if rec.get("error"):
            doc = orjson.loads(rec["error"])
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            doc["at"] = ms_to_datetime(doc.get("at"))
            error = ErrorInfo(**doc)
        field = "attributes"
        attributes = orjson.loads(rec["attributes"]) if rec.get("attributes") else {}
        if not isinstance(attributes, dict):
            raise ValueError("not a JSON object")
        values: dict[str, Any] = {}
        for field, name in (("campaign", "campaign_id"), ("state", "state")):
            if not rec.get(field):
                raise ValueError("missing")
            values[name] = rec[field]
        field = "state"
        values["state"] = State(rec["state"])
        for field, name in (("version", "campaign_version"), ("step", "step"),
                            ("attempt", "attempt")):  # fmt: skip
            values[name] = int(rec.get(field) or 0)
        for field in ("run_at", "deadline", "created_at", "updated_at"):
            values[field] = ms_to_datetime(rec.get(field))
        field = "history"
        entries = [HistoryEntry.from_json(h) for h in history]
        field = "?"
        return EnrollmentStatus(
            enrollment_id=enrollment_id,
            contact_id=rec.get("contact", ""),
            node=rec.get("node") or None,
            timezone=rec.get("timezone") or None,
            attributes=attributes,
            error=error,
            history=entries,
            **values,
        )
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError) as exc:
        # orjson.JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise CorruptRecord(
            f"enrollment {enrollment_id!r}: stored field {field!r} cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None


def with_derived(enrollment_id: str, rec: dict[str, str]) -> dict[str, str]:
    """Fill in the fields a record does not store because its id says them (campaign,
    contact); records written before they were dropped keep their own."""
    campaign, contact = split_enrollment_id(enrollment_id)
    rec.setdefault("campaign", campaign)
    rec.setdefault("contact", contact)
    return rec


def creation_entry(rec: dict[str, str]) -> dict[str, Any]:
    """The history entry of an enrollment that has not moved since it was created: its
    history list is only written at its first move (the record says how it started)."""
    return {"at": rec.get("created_at") or rec.get("updated_at") or 0, "from": None,
            "to": rec.get("state"), "node": rec.get("node") or None,
            "step": rec.get("step") or 0, "attempt": rec.get("attempt") or 1,
            "reason": "enrolled"}  # fmt: skip


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
