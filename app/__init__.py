"""Campaign scheduler: the library the API imports (no worker-only code here)."""

from app.client import CampaignClient
from app.errors import (
    AlreadyEnrolled,
    CampaignError,
    CampaignNotFound,
    EnrollmentNotFound,
    InvalidCampaign,
    InvalidRequest,
)
from app.models import EnrollmentStatus, State

__all__ = [
    "AlreadyEnrolled",
    "CampaignClient",
    "CampaignError",
    "CampaignNotFound",
    "EnrollmentNotFound",
    "EnrollmentStatus",
    "InvalidCampaign",
    "InvalidRequest",
    "State",
]
