"""Campaign jobs: their identity, what they carry, and the one place payloads are parsed.

A campaign job is a step (``run_step``) or a wait's timeout (``fire_timeout``). Its id is
deterministic (the same step and attempt can never be queued twice) and names its
enrollment; its payload is arq's JSON job format (``{"t", "f", "a", "k", "et"}``), so
tools that read arq jobs read ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.serialization import job_payload
from app.tracing import current_carrier

__all__ = [
    "STEP_FUNCTION",
    "TIMEOUT_FUNCTION",
    "Job",
    "JobPayload",
    "JobTarget",
    "MalformedJob",
    "enrollment_id_for",
    "enrollment_of_job",
    "split_enrollment_id",
    "step_job_id",
    "timeout_job_id",
]

STEP_FUNCTION = "run_step"
TIMEOUT_FUNCTION = "fire_timeout"
_MAX_INT = 2**53


def enrollment_id_for(campaign_id: str, contact_id: str) -> str:
    """``"{campaign_id}:{contact_id}"``."""
    return f"{campaign_id}:{contact_id}"


def split_enrollment_id(enrollment_id: str) -> tuple[str, str]:
    """(campaign id, contact id) of an enrollment id (campaign ids have no ``:``)."""
    campaign, _, contact = enrollment_id.partition(":")
    return campaign, contact


def step_job_id(enrollment_id: str, step: int, attempt: int, run_at_ms: int | None = None) -> str:
    """Deterministic: the same step and attempt can never be queued twice. A business-hours
    deferral of the same attempt adds its new due time."""
    base = f"step:{enrollment_id}:{step}:{attempt}"
    return base if run_at_ms is None else f"{base}@{run_at_ms}"


def timeout_job_id(enrollment_id: str, step: int) -> str:
    """Deterministic id of a wait's timeout job."""
    return f"timeout:{enrollment_id}:{step}"


def enrollment_of_job(job_id: str) -> str | None:
    """The enrollment id a campaign job id names (``step:...``/``timeout:...``), or None."""
    kind, _, rest = job_id.partition(":")
    parts = rest.rsplit(":", 2 if kind == "step" else 1)
    if kind not in {"step", "timeout"} or len(parts) != (3 if kind == "step" else 2):
        return None
    eid = parts[0]
    if ":" not in eid or not all(p.split("@")[0].isdigit() for p in parts[1:]):
        return None
    return eid


@dataclass(frozen=True)
class JobTarget:
    """What a job carries besides its step: enough to plan without reading the record."""

    enrollment_id: str
    campaign_id: str
    version: int
    timezone: str | None
    #: The step this enrollment started after: steps keep growing across re-entries (so
    #: job ids stay unique), and the step limit counts from here.
    base_step: int = 0

    def kwargs(self, node: str | None) -> dict[str, Any]:
        """The job's keyword arguments (with the current trace context, if any)."""
        # The campaign is the enrollment id's first part, and no time zone means the
        # campaign's: neither is repeated in every job.
        out: dict[str, Any] = {"version": self.version, "node": node}
        if self.timezone:
            out["tz"] = self.timezone
        if self.base_step:
            out["base"] = self.base_step
        carrier = current_carrier()
        if carrier:
            out["otel"] = carrier
        return out


@dataclass(frozen=True)
class Job:
    """A campaign job to queue as part of a transition."""

    id: str
    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    score_ms: int

    def payload(self, enqueue_ms: int) -> bytes:
        """arq's JSON job format."""
        return job_payload(self.function, self.args, self.kwargs, enqueue_ms, 1)

    def retarget(self, enrollment_id: str) -> Job:
        """The same job for another enrollment (a plan made once for many contacts)."""
        if self.args[0] == enrollment_id:
            return self
        step = self.args[1]
        job_id = (
            step_job_id(enrollment_id, step, self.args[2])
            if self.function == STEP_FUNCTION
            else timeout_job_id(enrollment_id, step)
        )
        return Job(job_id, self.function, [enrollment_id, *self.args[1:]], self.kwargs,
                   self.score_ms)  # fmt: skip


class MalformedJob(ValueError):
    """A queued payload does not have the shape of a campaign job; the message says why."""


@dataclass(frozen=True)
class JobPayload:
    """A parsed, validated campaign job payload."""

    function: str
    target: JobTarget
    step: int
    attempt: int | None
    node: str | None
    otel: dict[str, str] | None
    enqueue_ms: int | None

    @classmethod
    def parse(cls, job_id: str, raw: bytes | str) -> JobPayload:
        """Validate ``raw`` for ``job_id``; raises :class:`MalformedJob` naming the problem."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MalformedJob("payload is not JSON") from None
        if not isinstance(doc, dict):
            raise MalformedJob("payload is not a JSON object")
        function = doc.get("f")
        if function not in (STEP_FUNCTION, TIMEOUT_FUNCTION):
            raise MalformedJob("f: not a campaign job function")
        args, kwargs = doc.get("a"), doc.get("k")
        if not isinstance(args, list) or len(args) < 2 or not isinstance(args[0], str):
            raise MalformedJob("a: expected [enrollment_id, step, ...]")
        step = _whole(args[1], "a: step")
        attempt = (
            _whole(args[2], "a: attempt") if function == STEP_FUNCTION and len(args) > 2 else None
        )
        if function == STEP_FUNCTION and attempt is None:
            raise MalformedJob("a: expected an attempt number")
        if not isinstance(kwargs, dict) or not isinstance(kwargs.get("campaign", "?"), str):
            raise MalformedJob("k: expected campaign and version")
        version = _whole(kwargs.get("version"), "k: version")
        node, tz = kwargs.get("node"), kwargs.get("tz")
        if not (node is None or isinstance(node, str)) or not (tz is None or isinstance(tz, str)):
            raise MalformedJob("k: node and tz must be strings")
        otel = kwargs.get("otel")
        if otel is not None and not (
            isinstance(otel, dict) and all(isinstance(v, str) for v in otel.values())
        ):
            raise MalformedJob("k: otel must be an object of strings")
        enrollment_id: str = args[0]
        campaign: str = kwargs.get("campaign", split_enrollment_id(enrollment_id)[0])
        if not campaign or not enrollment_id.startswith(campaign + ":"):
            raise MalformedJob("a: enrollment id does not belong to the campaign")
        expected = (
            step_job_id(enrollment_id, step, attempt or 0)
            if function == STEP_FUNCTION
            else timeout_job_id(enrollment_id, step)
        )
        if not (job_id == expected or job_id.startswith(expected + "@")):
            raise MalformedJob("job id does not match its payload")
        et = doc.get("et")
        if et is not None and not _number(et):
            raise MalformedJob("et: not a time in ms")
        if doc.get("t") is not None:
            _whole(doc["t"], "t")
        target = JobTarget(
            enrollment_id, campaign, version, tz, _whole(kwargs.get("base", 0), "k: base")
        )
        return cls(function, target, step, attempt, node, otel, int(et) if et is not None else None)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any, what: str) -> int:
    # 1.0 counts as 1, as it does for the claim script's own check (Lua has one number type)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_INT:
        raise MalformedJob(f"{what}: expected a whole number")
    return value
