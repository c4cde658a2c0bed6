"""Enrollment records in Redis and the atomic transitions that change them.

Each transition is one Lua call (``lua/transition.lua``): it checks the expected state and
step, writes the new fields and a history entry, keeps the per-state index sets, and adds
or removes the arq job that goes with the new state. No half-done transitions if a process
dies, and no two writers can both win.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.exceptions import NoScriptError

from app.keys import Keys
from app.models import EnrollmentStatus, ErrorInfo, HistoryEntry, State, ms_to_datetime
from app.serialization import job_payload

__all__ = ["Applied", "EnrollmentStore", "Job", "Transition", "now_ms"]


def now_ms() -> int:
    """Wall-clock epoch milliseconds (what arq scores jobs with)."""
    return int(time.time() * 1000)


def _script(name: str) -> str:
    return resources.files("app").joinpath("lua", name).read_text()


@dataclass(frozen=True)
class Job:
    """An arq job to put in the queue as part of a transition."""

    id: str
    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    score_ms: int


@dataclass
class Transition:
    """One atomic change of an enrollment; see ``lua/transition.lua`` for the semantics."""

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
    remove_jobs: list[str] = field(default_factory=list)

    @property
    def new_state(self) -> str | None:
        return self.set.get("state")


@dataclass(frozen=True)
class Applied:
    """What a transition did: ``ok``, else the state and step that made it fail."""

    ok: bool
    state: str | None = None
    step: int | None = None
    missing: bool = False
    job_conflict: str | None = None


class EnrollmentStore:
    """Reads and atomic writes of enrollment records."""

    def __init__(self, redis: ArqRedis, keys: Keys, queue_name: str, *, history_limit: int,
                 job_expiry_extra_ms: int) -> None:  # fmt: skip
        self.redis = redis
        self.keys = keys
        self.queue_name = queue_name
        self.history_limit = history_limit
        self.job_expiry_extra_ms = job_expiry_extra_ms
        self._transition = redis.register_script(_script("transition.lua"))
        self._claim = redis.register_script(_script("claim.lua"))
        self._transition_loaded = False

    # -- writes -------------------------------------------------------------------------

    def _args(self, enrollment_id: str, tr: Transition, now: int) -> tuple[list[str], list[bytes]]:
        job = None
        if tr.add_job is not None:
            j = tr.add_job
            job = {
                "id": j.id,
                "payload": job_payload(j.function, j.args, j.kwargs, now).decode(),
                "score": j.score_ms,
                "ttl": max(j.score_ms - now, 0) + self.job_expiry_extra_ms,
            }
        op = {
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
            "remove_jobs": tr.remove_jobs,
            "idx_prefix": f"{self.keys.prefix}:idx:",
            "enr_prefix": self.keys.enrollment(""),
        }
        keys = [
            self.keys.enrollment(enrollment_id),
            self.keys.history(enrollment_id),
            self.queue_name,
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
        return Applied(False, _s(raw[1]) or None, int(raw[2]) if len(raw) > 2 else None)

    async def apply(self, enrollment_id: str, tr: Transition, now: int | None = None) -> Applied:
        """Run one transition atomically."""
        keys, args = self._args(enrollment_id, tr, now or now_ms())
        return self._result(await self._transition(keys=keys, args=args))

    async def apply_many(self, items: Sequence[tuple[str, Transition]]) -> list[Applied]:
        """Run many independent transitions in one pipelined round trip."""
        now = now_ms()
        calls = [self._args(enrollment_id, tr, now) for enrollment_id, tr in items]
        if not self._transition_loaded:  # once, rather than a batch of NOSCRIPT errors
            await self.redis.script_load(self._transition.script)
            self._transition_loaded = True
        try:
            raw = await self._evalsha_pipeline(calls)
        except NoScriptError:
            # Script cache emptied since (restarted server): a NOSCRIPT call ran nothing.
            await self.redis.script_load(self._transition.script)
            raw = await self._evalsha_pipeline(calls)
        return [self._result(r) for r in raw]

    async def _evalsha_pipeline(self, calls: Sequence[tuple[list[str], list[bytes]]]) -> list[Any]:
        # Plain EVALSHA, not the Script object: a pipeline holding Script objects first
        # sends SCRIPT EXISTS, which doubles the round trips of every batch.
        sha = self._transition.sha
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)  # type: ignore[arg-type]
            return list(await pipe.execute())

    async def claim(
        self, enrollment_id: str, step: int, attempt: int, node: str | None,
        job_id: str | None = None,
    ) -> tuple[int, dict[str, str]]:  # fmt: skip
        """scheduled -> running for a step job. Returns (code, record); code 1 claimed,
        2 re-run after a crash (attempt bumped), 0 stale, -1 missing. With ``job_id``, only
        the record's current job may claim it."""
        now = now_ms()
        template = orjson.dumps({"at": now, "node": node, "step": step}).decode()
        raw = await self._claim(
            keys=[self.keys.enrollment(enrollment_id), self.keys.history(enrollment_id)],
            args=[step, attempt, now, template, self.history_limit,
                  f"{self.keys.prefix}:idx:", enrollment_id, job_id or ""],
        )  # fmt: skip
        code = int(raw[0])
        if code in (1, 2):
            flat = [_s(x) for x in raw[1:]]
            return code, dict(zip(flat[::2], flat[1::2], strict=True))
        if code == 0:
            return 0, {"state": _s(raw[1]), "step": str(raw[2]), "attempt": str(raw[3])}
        return -1, {}

    # -- reads --------------------------------------------------------------------------

    async def record(self, enrollment_id: str) -> dict[str, str] | None:
        """The raw record, or None."""
        raw = await self.redis.hgetall(self.keys.enrollment(enrollment_id))  # type: ignore[misc]
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

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
        rec = {_s(k): _s(v) for k, v in raw.items()}
        return to_status(enrollment_id, rec, [orjson.loads(h) for h in hist])

    async def count_by_state(self, campaign_id: str) -> dict[str, int]:
        """Enrollments of a campaign per state, from the index sets (O(1) each)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in State:
                pipe.scard(self.keys.state_index(campaign_id, state.value))
            counts = await pipe.execute()
        return {state.value: int(n) for state, n in zip(State, counts, strict=True)}

    async def list_ids(self, campaign_id: str, state: str, limit: int = 100) -> list[str]:
        """Up to ``limit`` enrollment ids of a campaign in a state (SSCAN, not KEYS)."""
        out: list[str] = []
        async for member in self.redis.sscan_iter(
            self.keys.state_index(campaign_id, state), count=min(limit, 1000)
        ):
            out.append(_s(member))
            if len(out) >= limit:
                break
        return out


def to_status(
    enrollment_id: str, rec: dict[str, str], history: list[dict[str, Any]]
) -> EnrollmentStatus:
    """Build the public status from a raw record."""
    error = None
    if rec.get("error"):
        doc = orjson.loads(rec["error"])
        doc["at"] = ms_to_datetime(doc.get("at"))
        error = ErrorInfo(**doc)
    return EnrollmentStatus(
        enrollment_id=enrollment_id,
        campaign_id=rec["campaign"],
        contact_id=rec.get("contact", ""),
        campaign_version=int(rec.get("version", 0)),
        state=State(rec["state"]),
        node=rec.get("node") or None,
        step=int(rec.get("step", 0)),
        attempt=int(rec.get("attempt", 0)),
        run_at=ms_to_datetime(rec.get("run_at")),
        deadline=ms_to_datetime(rec.get("deadline")),
        timezone=rec.get("timezone") or None,
        attributes=orjson.loads(rec["attributes"]) if rec.get("attributes") else {},
        error=error,
        created_at=ms_to_datetime(rec.get("created_at")),
        updated_at=ms_to_datetime(rec.get("updated_at")),
        history=[HistoryEntry.from_json(h) for h in history],
    )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
