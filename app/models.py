"""What the client returns: enrollment status, history entries, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "EnrollManyResult",
    "EnrollmentStatus",
    "EnrollmentSummary",
    "ErrorInfo",
    "HistoryEntry",
    "State",
    "ms_to_datetime",
]


class State(StrEnum):
    """Enrollment states (docs/guarantees.md)."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
ACTIVE_STATES = frozenset({State.SCHEDULED, State.RUNNING, State.WAITING})


def ms_to_datetime(ms: int | float | str | None) -> datetime | None:
    """Epoch milliseconds (as stored in Redis) to an aware UTC datetime."""
    if ms is None or ms == "":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorInfo(_Frozen):
    """Why an enrollment failed."""

    type: str
    message: str
    traceback: str | None = None
    trace_id: str | None = None
    node: str | None = None
    step: int | None = None
    attempt: int | None = None
    at: datetime | None = None


class HistoryEntry(_Frozen):
    """One transition: when, from and to which state, at which node and step, and why."""

    at: datetime
    from_state: str | None
    to_state: str
    node: str | None
    step: int
    attempt: int | None = None
    reason: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> HistoryEntry:
        return cls(
            at=ms_to_datetime(doc["at"]) or datetime.now(UTC),
            from_state=doc.get("from") or None,
            to_state=doc["to"],
            node=doc.get("node"),
            step=int(doc.get("step", 0)),
            attempt=doc.get("attempt"),
            reason=doc.get("reason", ""),
        )


class EnrollmentSummary(_Frozen):
    """An enrollment as stored, without its history (what a listing shows)."""

    enrollment_id: str
    campaign_id: str
    contact_id: str
    campaign_version: int
    state: State
    node: str | None
    step: int
    attempt: int
    run_at: datetime | None
    deadline: datetime | None
    timezone: str | None
    attributes: dict[str, Any]
    error: ErrorInfo | None
    created_at: datetime | None
    updated_at: datetime | None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class EnrollmentStatus(EnrollmentSummary):
    """An enrollment as stored, with its history (oldest first)."""

    history: list[HistoryEntry] = []


class EnrollManyResult(int):
    """What ``enroll_many`` returns: the number of contacts it enrolled (an ``int``), and
    why it skipped the others.

    ``already_enrolled``: rows skipped because the contact has an enrollment that may not
    be replaced (active, or ended in a campaign without re-entry).
    ``conflicts``: rows skipped because a job with the id the enrollment needs is still
    queued from an earlier enrollment with the same id (a leftover; it leaves the queue
    when it runs or when the reconciler drops it; enroll that contact again later); the
    first 100 as ``(row, contact_id, reason)``, and ``conflict_count`` in all.
    """

    already_enrolled: int
    conflicts: tuple[tuple[int, str, str], ...]
    conflict_count: int

    def __new__(
        cls,
        enrolled: int,
        *,
        already_enrolled: int = 0,
        conflicts: tuple[tuple[int, str, str], ...] = (),
        conflict_count: int | None = None,
    ) -> EnrollManyResult:
        self = super().__new__(cls, enrolled)
        self.already_enrolled = already_enrolled
        self.conflicts = conflicts
        self.conflict_count = len(conflicts) if conflict_count is None else conflict_count
        return self

    @property
    def enrolled(self) -> int:
        return int(self)

    @property
    def skipped(self) -> int:
        """Rows not enrolled, for any reason."""
        return self.already_enrolled + self.conflict_count

    def __str__(self) -> str:
        # the count, as an int prints (f"{n} enrolled"); repr() has the details
        return str(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    def __repr__(self) -> str:
        return (
            f"EnrollManyResult({int(self)}, already_enrolled={self.already_enrolled}, "
            f"conflict_count={self.conflict_count})"
        )
