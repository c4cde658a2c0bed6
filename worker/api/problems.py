"""RFC 9457 problem details: every error the API answers is one of these.

``type`` is a ``tag:`` URI (RFC 9457 allows a URI that is not meant to be fetched),
``title`` the error's name as the Python client spells it, so a service can branch on
either; ``detail`` says what was wrong, naming the field and the value.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from aiohttp import web

from app.errors import (
    AlreadyEnrolled,
    CampaignError,
    CampaignNotFound,
    CorruptRecord,
    EnrollmentNotFound,
    InvalidCampaign,
    InvalidRequest,
    InvalidState,
)

__all__ = ["CONTENT_TYPE", "Problem", "from_campaign_error", "problem_type"]

CONTENT_TYPE = "application/problem+json"
_TYPE_PREFIX = "tag:campaign-scheduler,2026:problem:"


def problem_type(title: str) -> str:
    """The ``type`` URI of a problem titled ``title``."""
    return _TYPE_PREFIX + title


class Problem(Exception):
    """An error response: raise it from a handler, the middleware writes it."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": problem_type(self.title),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }

    def response(self) -> web.Response:
        try:
            body = orjson.dumps(self.body())
        except TypeError:  # an extension member orjson cannot encode: keep the problem
            body = json.dumps(self.body(), default=str).encode()
        return web.Response(
            status=self.status,
            body=body,
            content_type=CONTENT_TYPE,
            headers=self.headers,
        )


#: Client errors by class, most specific first.
_STATUS: list[tuple[type[CampaignError], int]] = [
    (CampaignNotFound, 404),
    (EnrollmentNotFound, 404),
    (AlreadyEnrolled, 409),
    (InvalidState, 409),
    (InvalidCampaign, 422),
    (InvalidRequest, 422),
    (CorruptRecord, 500),
]


#: "field: message" at the start of a client error, as its messages are written.
_FIELD = re.compile(r"(?:invalid campaign: )?([A-Za-z_][\w.\[\]-]*): (.+)", re.S)


def from_campaign_error(exc: CampaignError) -> Problem:
    """The problem for an error the client raised: its class name is the title; a 422
    also lists the field it names in ``errors``, as a validation problem does."""
    status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 422)
    title = type(exc).__name__
    extra: dict[str, Any] = {}
    if title == "InvalidRow":  # an enroll_many row: say how far the batch got
        title = "InvalidRequest"
        extra["enrolled"] = getattr(exc, "enrolled", 0)
    elif title not in {cls.__name__ for cls, _ in _STATUS}:
        title = "InvalidRequest" if isinstance(exc, InvalidRequest) else "CampaignError"
    detail = str(exc)
    if status == 422:
        errors = []
        for part in detail.split("; "):
            found = _FIELD.match(part)
            if found:
                errors.append({"field": found.group(1), "message": found.group(2)})
        if errors:
            extra["errors"] = errors
    return Problem(status, title, detail, **extra)
