"""Campaign scheduler: the library the API imports (no worker-only code here)."""

from importlib.metadata import PackageNotFoundError, version

from app.client import CampaignClient
from app.errors import (
    AlreadyEnrolled,
    CampaignError,
    CampaignNotFound,
    CorruptRecord,
    EnrollManyError,
    EnrollmentNotFound,
    InvalidCampaign,
    InvalidRequest,
    InvalidRow,
    InvalidState,
)
from app.models import EnrollManyResult, EnrollmentStatus, State

try:
    __version__ = version("campaign-scheduler")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AlreadyEnrolled",
    "CampaignClient",
    "CampaignError",
    "CampaignNotFound",
    "CorruptRecord",
    "EnrollManyError",
    "EnrollManyResult",
    "EnrollmentNotFound",
    "EnrollmentStatus",
    "InvalidCampaign",
    "InvalidRequest",
    "InvalidRow",
    "InvalidState",
    "State",
]
