"""Request and response models of the control API.

The handlers validate bodies and build responses with these, and the OpenAPI document is
generated from them (``worker.api.openapi``), so the two cannot drift apart. Limits that
depend on settings (lengths, sizes) are checked by the client underneath, with the same
messages as for a Python caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from app.models import EnrollmentSummary, State

__all__ = [
    "BATCH_LIMIT",
    "BatchConflict",
    "BatchRequest",
    "BatchResult",
    "CampaignCreated",
    "CampaignDetail",
    "CampaignList",
    "CampaignSummary",
    "CancelRequest",
    "CancelResult",
    "DeadLetter",
    "DeadLetterList",
    "DeadLetterQuery",
    "EnrollRequest",
    "EnrollmentPage",
    "FailureGroupList",
    "FailureGroupOut",
    "GroupReplayRequest",
    "GroupReplayResult",
    "ListQuery",
    "ProblemBody",
    "QueueOverview",
    "ReplayRequest",
    "ShardQueue",
    "SignalRequest",
    "SignalResult",
    "SkippedMember",
]

#: Contacts one ``POST .../enrollments/batch`` takes at most; more is a 413.
BATCH_LIMIT = 5000
#: The highest campaign version a request may name.
MAX_VERSION = 2**31 - 1


class _Body(BaseModel):
    """A request body: unknown fields are refused, so a typo is named, not ignored; strict,
    so what validates is what the schema says (no number taken for a date)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Query(BaseModel):
    """Query parameters: strings converted to the field's type (``limit=5``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- requests ------------------------------------------------------------------------------


_CONTACT: dict[str, JsonValue] = {"contact_id": "contact-42", "timezone": "Europe/Berlin",
            "attributes": {"email": "a@example.com"}}  # fmt: skip


class EnrollRequest(_Body):
    """One contact to enroll; ``node`` and ``run_at`` place it part-way (moving it from
    another system)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_CONTACT]})

    contact_id: str = Field(min_length=1)
    attributes: dict[str, Any] | None = None
    timezone: str | None = Field(
        default=None, min_length=1, description="IANA time zone of the contact"
    )
    node: str | None = Field(
        default=None, min_length=1, description="start here instead of the entry node"
    )
    run_at: AwareDatetime | None = Field(
        default=None, description="when the step at node is due (a wait's deadline)"
    )


class BatchRequest(_Body):
    """Contacts to enroll in one call (at most 5,000; more is answered 413)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"contacts": [_CONTACT, {"contact_id": "contact-43"}]}]}
    )

    contacts: list[EnrollRequest] = Field(max_length=BATCH_LIMIT)


class SignalRequest(_Body):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"event": "replied", "payload": {"text": "yes"}}]}
    )

    event: str = Field(min_length=1)
    payload: dict[str, Any] | None = None


class CancelRequest(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "unsubscribed"}]})

    reason: str = ""


class ReplayRequest(_Body):
    to_version: int | None = Field(
        default=None, ge=1, le=MAX_VERSION, description="replay on this version of the campaign"
    )


class GroupReplayRequest(_Body):
    group: str = Field(
        pattern=r"^[^:]+:.+:[^:]+$",
        description="CAMPAIGN:NODE:ERROR, as GET /v1/failures names it",
    )
    to_version: int | None = Field(default=None, ge=1, le=MAX_VERSION)


class ListQuery(_Query):
    """Query parameters of ``GET /v1/campaigns/{campaign_id}/enrollments``."""

    state: State | None = None
    node: str | None = Field(default=None, min_length=1)
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, min_length=1)


class DeadLetterQuery(_Query):
    limit: int = Field(default=100, ge=1, le=1000)


# -- responses -----------------------------------------------------------------------------


class ProblemBody(_Out):
    """An RFC 9457 problem: every error response has this shape."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str
    title: str
    status: int
    detail: str


class CampaignCreated(_Out):
    id: str
    version: int


class CampaignSummary(_Out):
    id: str
    version: int = Field(description="the latest version")
    counts: dict[State, int] = Field(description="enrollments per state")
    total: int


class CampaignList(_Out):
    items: list[CampaignSummary]


class CampaignDetail(_Out):
    id: str
    version: int = Field(description="the latest version")
    versions: list[int]
    definition: dict[str, Any] = Field(description="the latest definition")
    counts: dict[State, int]
    by_node: dict[str, dict[State, int]] = Field(
        description="enrollments per node and state ('-' for none)"
    )
    by_node_complete: bool = Field(
        description="false when the campaign had more enrollments than by_node reads"
    )


class EnrollmentPage(_Out):
    items: list[EnrollmentSummary]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: no more")


class BatchConflict(_Out):
    row: int
    contact_id: str
    reason: str


class BatchResult(_Out):
    enrolled: int
    skipped: int
    already_enrolled: int
    conflicts: list[BatchConflict] = Field(description="the first 100 rows skipped for a conflict")


class SignalResult(_Out):
    accepted: bool


class CancelResult(_Out):
    cancelled: bool


class FailureGroupOut(_Out):
    group: str = Field(description="CAMPAIGN:NODE:ERROR")
    campaign_id: str
    node: str
    error_type: str
    count: int
    latest_enrollment_id: str
    latest_message: str
    latest_trace_id: str | None
    latest_at: datetime | None


class FailureGroupList(_Out):
    items: list[FailureGroupOut]


class SkippedMember(_Out):
    enrollment_id: str
    reason: str


class GroupReplayResult(_Out):
    group: str
    total: int
    replayed: int
    gone: list[SkippedMember] = Field(description="no longer failed (replayed meanwhile)")
    skipped: list[SkippedMember] = Field(description="could not be replayed, with why")


class DeadLetter(_Out):
    shard: int
    job_id: str | None
    reason: str
    at: datetime | None
    payload: str = Field(description="a printable excerpt of what was dropped")


class DeadLetterList(_Out):
    items: list[DeadLetter]
    total: int


class ShardQueue(_Out):
    shard: int
    due: int
    deferred: int
    running: int
    dead: int


class QueueOverview(_Out):
    at: datetime
    due: int
    deferred: int
    running: int
    dead: int
    workers_alive: int
    maintenance_queued: int
    shards: list[ShardQueue]
    campaigns: list[CampaignSummary]
