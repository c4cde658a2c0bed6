"""Retention: delete finished enrollments (completed, failed, cancelled) with their history
and index entries once they finished before a cutoff.

Used by ``campaign-worker purge`` and by the worker's periodic job when
``CAMPAIGN_RETENTION`` is set. Enrollments are found through the state index sets (SSCAN
in slices, never KEYS), and each slice is checked and deleted in one Lua call, so an
enrollment replayed or re-entered in the meantime is left alone.

Each purged enrollment leaves a tombstone (its id and last step, in the shard's
``<prefix>:{n}:purged`` hash): a contact enrolled again goes on from that step, so the
idempotency keys of its actions (``{enrollment_id}:{step}``) never repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from arq.connections import ArqRedis

from app.keys import Keys
from app.models import State
from app.registry import CampaignRegistry
from app.store import load_script

__all__ = ["FINISHED_STATES", "PurgeResult", "purge_finished"]

FINISHED_STATES = (State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value)
SLICE = 500


@dataclass
class PurgeResult:
    """How many finished enrollments were deleted (or would be, on a dry run), by state."""

    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED_STATES, 0))
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


async def purge_finished(
    redis: ArqRedis,
    keys: Keys,
    before: datetime,
    *,
    campaigns: Sequence[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[PurgeResult], None] | None = None,
) -> PurgeResult:
    """Delete enrollments that finished at or before ``before`` (all campaigns, or those
    named), with their history and index entries; ``dry_run`` only counts them.
    ``progress`` is called after each slice."""
    script = redis.register_script(load_script("app", "purge.lua"))
    cutoff = int(before.timestamp() * 1000)
    if campaigns is None:
        campaigns = await CampaignRegistry(redis, keys).ids()
    result = PurgeResult(dry_run=dry_run)
    for campaign_id in campaigns:
        for shard in keys.all_shards():
            for state in FINISHED_STATES:
                index = shard.state_index(campaign_id, state)
                cursor = 0
                while True:
                    cursor, members = await redis.sscan(index, cursor, count=SLICE)
                    ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
                    if ids:
                        call_keys = [index, shard.tombstones]
                        for eid in ids:
                            call_keys += [shard.enrollment(eid), shard.history(eid)]
                        n = await script(keys=call_keys,
                                         args=[state, cutoff, "1" if dry_run else "0", *ids])  # fmt: skip
                        result.by_state[state] += int(n)
                        if progress is not None:
                            progress(result)
                    if int(cursor) == 0:
                        break
    return result
