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
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis

from app.durations import format_duration
from app.errors import InvalidRequest
from app.keys import Keys
from app.models import State
from app.registry import CampaignRegistry
from app.store import index_slices, load_script

__all__ = ["FINISHED_STATES", "PurgeResult", "finished_cutoff", "purge_finished"]

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


def finished_cutoff(finished_before: datetime | timedelta, now: datetime | None = None) -> datetime:
    """The instant a purge deletes up to: ``finished_before`` itself (timezone-aware), or
    ``now`` minus it for a duration. A negative duration, one reaching back past the
    year 1, or an instant without a UTC offset is an :class:`~app.errors.InvalidRequest`
    naming the value."""
    if isinstance(finished_before, timedelta):
        if finished_before < timedelta(0):
            raise InvalidRequest(
                f"finished_before must not be a negative duration (got {finished_before})"
            )
        try:
            return (now or datetime.now(UTC)) - finished_before
        except OverflowError:
            raise InvalidRequest(
                f"finished_before: {format_duration(finished_before)} is too long (it reaches "
                "back past the year 1)"
            ) from None
    if not isinstance(finished_before, datetime):
        raise InvalidRequest(
            "finished_before must be a datetime or a timedelta, not "
            f"{type(finished_before).__name__}"
        )
    if finished_before.tzinfo is None or finished_before.utcoffset() is None:
        raise InvalidRequest("finished_before must be timezone-aware")
    return finished_before


async def purge_finished(
    redis: ArqRedis,
    keys: Keys,
    before: datetime | timedelta,
    *,
    campaigns: Sequence[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[PurgeResult], None] | None = None,
) -> PurgeResult:
    """Delete enrollments that finished at or before ``before`` (all campaigns, or those
    named), with their history and index entries; ``dry_run`` only counts them.
    ``before`` may be a duration (finished more than that long ago): see
    :func:`finished_cutoff`. ``progress`` is called after each slice."""
    before = finished_cutoff(before)
    script = redis.register_script(load_script("app", "purge.lua"))
    cutoff = int(before.timestamp() * 1000)
    if campaigns is None:
        campaigns = await CampaignRegistry(redis, keys).ids()
    result = PurgeResult(dry_run=dry_run)
    for campaign_id in campaigns:
        for shard in keys.all_shards():
            for state in FINISHED_STATES:
                index = shard.state_index(campaign_id, state)
                async for ids in index_slices(redis, index, SLICE):
                    call_keys = [index, shard.tombstones]
                    for eid in ids:
                        call_keys += [shard.enrollment(eid), shard.history(eid)]
                    n = await script(keys=call_keys,
                                     args=[state, cutoff, "1" if dry_run else "0", *ids])  # fmt: skip
                    result.by_state[state] += int(n)
                    if progress is not None:
                        progress(result)
    return result
