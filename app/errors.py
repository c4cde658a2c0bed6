"""Typed errors of the public client; each message says what was wrong."""

from __future__ import annotations

__all__ = [
    "AlreadyEnrolled",
    "CampaignError",
    "CampaignNotFound",
    "CorruptRecord",
    "EnrollManyError",
    "EnrollmentNotFound",
    "InvalidCampaign",
    "InvalidRequest",
    "InvalidRow",
    "InvalidState",
]


class CampaignError(Exception):
    """Base class of every error the client raises on purpose."""


class CampaignNotFound(CampaignError, LookupError):
    """No campaign (or no such version) is registered under that id."""


class InvalidCampaign(CampaignError, ValueError):
    """A campaign definition failed validation; the message names each bad field."""


class AlreadyEnrolled(CampaignError):
    """The contact already has an enrollment in that campaign that may not be replaced."""


class EnrollmentNotFound(CampaignError, LookupError):
    """No enrollment has that id."""


class InvalidRequest(CampaignError, ValueError):
    """An argument is malformed, or the enrollment is in a state that does not allow it."""


class InvalidState(InvalidRequest):
    """The enrollment is in a state that does not allow the request (replaying one that
    has not failed), or kept changing while it was tried; the HTTP API answers 409."""


class CorruptRecord(CampaignError):
    """A stored enrollment or campaign version has a field that cannot be read.

    Raised for that one enrollment (or version) only; the message names it and the field.
    """


class EnrollManyError(CampaignError):
    """``enroll_many`` stopped part-way.

    ``enrolled``: contacts enrolled before it stopped. ``row``: index of the row that
    stopped it (for a Redis error, the first row of the batch being written).
    ``processed``: rows before this index were all handled (enrolled, or skipped as
    already enrolled); from ``processed`` on nothing was written, except when a Redis
    error cut a batch short, where rows ``processed`` to ``row + batch - 1`` may be
    partly written. Running the same rows again is safe: enrolled contacts are skipped.
    ``reason``: what stopped it, without the row and the counts. The original exception,
    if any, is ``__cause__``.
    """

    def __init__(
        self, message: str, *, enrolled: int, row: int, processed: int, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.enrolled = enrolled
        self.row = row
        self.processed = processed
        self.reason = reason or message


class InvalidRow(EnrollManyError, InvalidRequest):
    """A row given to ``enroll_many`` is invalid (an :class:`InvalidRequest` that also
    says how far ``enroll_many`` got, as :class:`EnrollManyError`)."""
