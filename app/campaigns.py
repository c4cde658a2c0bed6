"""Campaign definitions (PRODUCT.md section 2): the pydantic model and its graph rules."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.business_hours import BusinessHours
from app.durations import Duration
from app.errors import InvalidCampaign

__all__ = [
    "ActionNode",
    "Campaign",
    "DelayNode",
    "ExitNode",
    "Node",
    "RetryPolicy",
    "WaitNode",
    "parse_campaign",
]

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    """How an action's transient failures are retried."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff: Literal["exponential", "fixed"] = "exponential"
    base_delay: Duration = timedelta(seconds=10)
    max_delay: Duration = timedelta(hours=1)
    jitter: bool = True

    @model_validator(mode="after")
    def _check_delays(self) -> RetryPolicy:
        if self.max_delay < self.base_delay:
            raise ValueError("retry.max_delay must not be shorter than retry.base_delay")
        return self


class ActionNode(_Model):
    """Calls the named action handler; its outcome picks ``outcomes[outcome]``, else ``next``."""

    type: Literal["action"]
    action: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)
    next: str | None = None
    outcomes: dict[str, str | None] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    business_hours: bool | None = None
    timeout: Duration | None = None

    def successors(self) -> list[tuple[str, str | None]]:
        return [("next", self.next), *((f"outcomes.{k}", v) for k, v in self.outcomes.items())]


class DelayNode(_Model):
    """Waits ``duration`` (open time only when ``business_time``), then goes to ``next``."""

    type: Literal["delay"]
    duration: Duration
    business_time: bool = False
    next: str | None = None

    def successors(self) -> list[tuple[str, str | None]]:
        return [("next", self.next)]


class WaitNode(_Model):
    """Waits for a matching event until ``timeout``."""

    type: Literal["wait"]
    event: str | list[str]
    timeout: Duration
    business_time: bool = False
    on_event: str | None = None
    on_timeout: str | None = None

    @field_validator("event")
    @classmethod
    def _check_event(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names or any(not n for n in names):
            raise ValueError("event must be a non-empty name or list of names")
        return value

    @property
    def events(self) -> frozenset[str]:
        return frozenset([self.event] if isinstance(self.event, str) else self.event)

    def successors(self) -> list[tuple[str, str | None]]:
        return [("on_event", self.on_event), ("on_timeout", self.on_timeout)]


class ExitNode(_Model):
    """Completes the enrollment."""

    type: Literal["exit"]

    def successors(self) -> list[tuple[str, str | None]]:
        return []


Node = Annotated[ActionNode | DelayNode | WaitNode | ExitNode, Field(discriminator="type")]


class Campaign(_Model):
    """A validated campaign definition. ``version`` is set by the registry."""

    id: str = Field(pattern=_ID_PATTERN)
    timezone: str = "UTC"
    business_hours: dict[str, Any] | None = None
    entry: str
    nodes: dict[str, Node] = Field(min_length=1)
    reentry: bool = False
    version: int | None = Field(default=None, ge=1)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_graph(self) -> Campaign:
        problems: list[str] = []
        if self.entry not in self.nodes:
            problems.append(f"entry: no node named {self.entry!r}")
        for name, node in self.nodes.items():
            for field, target in node.successors():
                if target is not None and target not in self.nodes:
                    problems.append(f"nodes.{name}.{field}: no node named {target!r}")
        if problems:
            raise ValueError("; ".join(problems))
        reachable = self._reachable()
        unreachable = [n for n in self.nodes if n not in reachable]
        if unreachable:
            raise ValueError(
                "; ".join(f"nodes.{n}: unreachable from entry {self.entry!r}" for n in unreachable)
            )
        cycle = self._spinning_cycle()
        if cycle:
            raise ValueError(
                f"nodes.{cycle[0]}: cycle {' -> '.join(cycle)} passes through no delay or wait "
                "node, so it would spin"
            )
        if self.business_hours is not None:
            # Validated here so that errors name the campaign's field; cached below for use.
            self.calendar  # noqa: B018
        return self

    def _reachable(self) -> set[str]:
        seen: set[str] = set()
        stack = [self.entry]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            stack.extend(t for _, t in self.nodes[name].successors() if t is not None)
        return seen

    def _spinning_cycle(self) -> list[str] | None:
        """A cycle made only of action nodes (exit has no successors), if any."""
        actions = {n for n, node in self.nodes.items() if isinstance(node, ActionNode)}
        color: dict[str, int] = {}
        path: list[str] = []

        def visit(name: str) -> list[str] | None:
            color[name] = 1
            path.append(name)
            for _, target in self.nodes[name].successors():
                if target is None or target not in actions:
                    continue
                if color.get(target) == 1:
                    return [*path[path.index(target) :], target]
                if target not in color:
                    found = visit(target)
                    if found:
                        return found
            path.pop()
            color[name] = 2
            return None

        for name in sorted(actions):
            if name not in color:
                found = visit(name)
                if found:
                    return found
        return None

    @cached_property
    def calendar(self) -> BusinessHours | None:
        """The business-hours calendar in the campaign's zone, or None when always open."""
        if self.business_hours is None:
            return None
        try:
            return BusinessHours.model_validate({"timezone": self.timezone, **self.business_hours})
        except ValidationError as exc:
            raise ValueError("; ".join(_bh_error(e) for e in exc.errors())) from None

    def calendar_for(self, timezone: str | None) -> BusinessHours | None:
        """The calendar in an enrollment's own zone (its ``timezone``, else the campaign's)."""
        cal = self.calendar
        if cal is None or timezone is None or timezone == self.timezone:
            return cal
        return cal.with_timezone(timezone)

    def uses_business_hours(self, node: ActionNode) -> bool:
        """Action nodes run only in business hours unless they opt out."""
        if self.business_hours is None:
            return False
        return True if node.business_hours is None else node.business_hours

    def definition(self) -> dict[str, Any]:
        """The JSON-able definition, without the registry's version."""
        return self.model_dump(mode="json", exclude={"version"}, exclude_none=False)


def _bh_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = _msg(err["msg"])
    # The calendar's own messages usually start with the field path already.
    if not loc or msg.startswith(str(err["loc"][0])):
        return f"business_hours.{msg}" if loc else f"business_hours: {msg}"
    return f"business_hours.{loc}: {msg}"


def _msg(text: str) -> str:
    return text.removeprefix("Value error, ")


def parse_campaign(data: Any) -> Campaign:
    """Validate a definition; raise :class:`InvalidCampaign` listing every problem by field."""
    if isinstance(data, Campaign):
        return data
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not _is_tag(p))
            msg = _msg(err["msg"])
            lines.append(f"{loc}: {msg}" if loc else msg)
        raise InvalidCampaign("invalid campaign: " + "; ".join(lines)) from None


def _is_tag(part: Any) -> bool:
    return part in ("action", "delay", "wait", "exit")
