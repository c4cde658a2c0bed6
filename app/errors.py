"""Typed errors of the public client; each message says what was wrong."""

from __future__ import annotations

__all__ = [
    "AlreadyEnrolled",
    "CampaignError",
    "CampaignNotFound",
    "EnrollmentNotFound",
    "InvalidCampaign",
    "InvalidRequest",
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
