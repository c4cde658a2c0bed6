"""Campaign definitions (docs/campaigns.md): the pydantic model and its graph rules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.business_hours import BeyondHorizon, BusinessHours
from app.durations import MAX_DURATION, Duration, format_duration
from app.errors import InvalidCampaign

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "JSON_MAX_DEPTH",
    "ActionNode",
    "Campaign",
    "DelayNode",
    "ExitNode",
    "Limits",
    "Node",
    "RetryPolicy",
    "WaitNode",
    "check_json",
    "json_size",
    "load_campaign",
    "parse_campaign",
    "zone_problem",
]

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

#: How deeply JSON given to the client (params, attributes, payloads) may nest.
JSON_MAX_DEPTH = 64
# What orjson writes as a JSON integer: a signed or unsigned 64-bit number.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# No IANA zone name is anywhere near this long; longer ones are refused unread.
_ZONE_MAX = 255


@dataclass(frozen=True)
class Limits:
    """The input limits that campaign validation enforces; the defaults are
    the settings' defaults (``CAMPAIGN_MAX_*``)."""

    max_definition_bytes: int = 1_048_576
    max_nodes: int = 10_000
    max_name_length: int = 128
    max_duration: timedelta = MAX_DURATION

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_definition_bytes=settings.max_definition_bytes,
            max_nodes=settings.max_nodes,
            max_name_length=settings.max_name_length,
            max_duration=settings.max_duration,
        )


def zone_problem(name: object) -> str | None:
    """Why ``name`` is not a usable IANA time zone, or None when it is."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > _ZONE_MAX:
        return f"unknown time zone ({len(name)} characters, longer than any zone name)"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, TypeError):
        return f"unknown time zone {name!r}"
    return None


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _text_problem(text: str) -> str | None:
    try:
        text.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    return None


def check_json(value: Any, field: str, *, max_depth: int = JSON_MAX_DEPTH) -> None:
    """Raise ``ValueError`` naming the path of the first part of ``value`` that is not
    plain JSON: a key that is not a string, NaN or infinity, an integer outside 64 bits,
    a string that is not valid Unicode, nesting deeper than ``max_depth``, or a type
    orjson cannot write. Iterative, so any depth of input is safe."""
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                raise ValueError(
                    f"{path}: integer with {len(str(abs(item)))} digits is outside the "
                    "64-bit range JSON numbers may use here"
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{path}: {item} is not a JSON number")
        elif isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                raise ValueError(f"{path}: {problem}")
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise ValueError(f"{_short(path, 120)}: nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise ValueError(f"{path}: key {_short(repr(key))} is not a string")
                    problem = _text_problem(key)
                    if problem:
                        raise ValueError(f"{path}: a key {problem}")
                    stack.append((sub, f"{path}.{_short(key, 40)}", depth + 1))
            else:
                stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item))
        else:
            try:  # what orjson writes natively (datetime, UUID, enum, dataclass, ...)
                orjson.dumps(item)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}: {type(item).__name__} is not JSON-serializable"
                ) from None


def json_size(value: Any, field: str) -> int:
    """Bytes of ``value`` as JSON; ``ValueError`` naming ``field`` if it cannot be written."""
    try:
        return len(orjson.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: not JSON-serializable: {exc}") from None


def _name_problem(name: object, limit: int) -> str | None:
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > limit:
        return f"{len(name)} characters, more than the limit of {limit} (CAMPAIGN_MAX_NAME_LENGTH)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    return _text_problem(name)


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


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
    action: str = Field(min_length=1)
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

    _stored: bool = PrivateAttr(default=False)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        problem = zone_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._stored = isinstance(context, dict) and bool(context.get("stored"))

    @model_validator(mode="after")
    def _check_graph(self, info: ValidationInfo) -> Campaign:
        context = _context(info)
        if not self._stored:
            self._check_limits(context.get("limits") or Limits())
        problems: list[str] = []
        if self.entry not in self.nodes:
            problems.append(f"entry: no node named {self.entry!r}")
        for name, node in self.nodes.items():
            for field, target in node.successors():
                if target is not None and target not in self.nodes:
                    problems.append(f"nodes.{name}.{field}: no node named {target!r}")
        if problems:
            more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError("; ".join(problems[:20]) + more)
        reachable = self._reachable()
        unreachable = [n for n in self.nodes if n not in reachable]
        if unreachable:
            more = f"; and {len(unreachable) - 20} more" if len(unreachable) > 20 else ""
            raise ValueError(
                "; ".join(
                    f"nodes.{_short(n)}: unreachable from entry {_short(self.entry)!r}"
                    for n in unreachable[:20]
                )
                + more
            )
        cycle = self._spinning_cycle()
        if cycle:
            shown = (
                cycle
                if len(cycle) <= 12
                else [*cycle[:10], f"... ({len(cycle) - 11} more)", cycle[-1]]
            )
            raise ValueError(
                f"nodes.{_short(cycle[0])}: cycle {' -> '.join(_short(n, 40) for n in shown)} "
                "passes through no delay or wait node, so it would spin"
            )
        if self.business_hours is not None and not self._stored:
            # Validated here so that errors name the campaign's field; cached below for use.
            self.calendar  # noqa: B018
            self._check_business_time((context.get("limits") or Limits()).max_duration)
        return self

    def _check_limits(self, limits: Limits) -> None:
        """Names and sizes (the ``CAMPAIGN_MAX_*`` limits); not re-checked on stored versions."""
        problems: list[str] = []
        if len(self.id) > limits.max_name_length:
            problems.append(f"id: {_name_problem(self.id, limits.max_name_length)}")
        if len(self.nodes) > limits.max_nodes:
            problems.append(
                f"nodes: {len(self.nodes)} nodes, more than the limit of {limits.max_nodes} "
                "(CAMPAIGN_MAX_NODES)"
            )
        for name, node in self.nodes.items():
            where = f"nodes.{_short(name)}" if name else "nodes"
            problem = _name_problem(name, limits.max_name_length)
            if problem:
                problems.append(f"{where}: node name {problem}")
            names: list[tuple[str, object]] = []
            if isinstance(node, ActionNode):
                names.append(("action", node.action))
                names.extend(("outcomes", key) for key in node.outcomes)
            elif isinstance(node, WaitNode):
                names.extend(("event", e) for e in sorted(node.events))
            for field, value in names:
                problem = _name_problem(value, limits.max_name_length)
                if problem:
                    problems.append(f"{where}.{field}: name {_short(repr(value))} {problem}")
            if len(problems) > 20:
                break
        if problems:
            raise ValueError("; ".join(problems[:20]))

    def _check_business_time(self, limit: timedelta) -> None:
        """A business-time delay or wait must end within ``limit`` of real time from now
        on this schedule (without computing further than that)."""
        cal = self.calendar
        if cal is None:
            return
        longest: dict[str, tuple[timedelta, str]] = {}
        for name, node in self.nodes.items():
            if isinstance(node, DelayNode) and node.business_time:
                field, d = "duration", node.duration
            elif isinstance(node, WaitNode) and node.business_time:
                field, d = "timeout", node.timeout
            else:
                continue
            if field not in longest or d > longest[field][0]:
                longest[field] = (d, name)
        now = datetime.now(UTC)
        for field, (d, name) in longest.items():
            try:
                cal.add(now, d, within=limit)
            except (BeyondHorizon, RuntimeError):  # RuntimeError: no open time found at all
                raise ValueError(
                    f"nodes.{name}.{field}: {format_duration(d)} of business time does not "
                    f"end within {format_duration(limit)} (CAMPAIGN_MAX_DURATION) from now "
                    "on this schedule"
                ) from None

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
        """A cycle made only of action nodes (exit has no successors), if any.

        Depth-first, with an explicit stack: a chain of any length is fine.
        """
        actions = {n for n, node in self.nodes.items() if isinstance(node, ActionNode)}
        color: dict[str, int] = {}  # 1: on the current path, 2: done
        for root in sorted(actions):
            if root in color:
                continue
            path = [root]
            position = {root: 0}
            color[root] = 1
            stack = [iter(self._action_successors(root, actions))]
            while stack:
                target = next(stack[-1], None)
                if target is None:
                    stack.pop()
                    done = path.pop()
                    del position[done]
                    color[done] = 2
                    continue
                if color.get(target) == 1:
                    return [*path[position[target] :], target]
                if target not in color:
                    color[target] = 1
                    position[target] = len(path)
                    path.append(target)
                    stack.append(iter(self._action_successors(target, actions)))
        return None

    def _action_successors(self, name: str, actions: set[str]) -> list[str]:
        return [t for _, t in self.nodes[name].successors() if t is not None and t in actions]

    @cached_property
    def calendar(self) -> BusinessHours | None:
        """The business-hours calendar in the campaign's zone, or None when always open.

        For a stored version, built as it was accepted: without the checks that depend on
        today's date or the installed ``holidays`` data.
        """
        if self.business_hours is None:
            return None
        try:
            return BusinessHours.model_validate(
                {"timezone": self.timezone, **self.business_hours},
                context={"stored": True} if self._stored else None,
            )
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


def parse_campaign(data: Any, limits: Limits | None = None) -> Campaign:
    """Validate a definition; raise :class:`InvalidCampaign` listing every problem by field.

    ``limits`` default to the settings' defaults (the registry passes the configured
    ones). A :class:`Campaign` instance is validated again from its definition (it may
    have been built with ``model_construct``).
    """
    limits = limits or Limits()
    if isinstance(data, Campaign):
        try:
            data = data.model_dump(mode="json", exclude={"version"}, warnings=False)
        except Exception as exc:  # a model_construct-ed instance may hold anything
            raise InvalidCampaign(f"invalid campaign: cannot read the Campaign: {exc}") from None
    if not isinstance(data, Mapping):
        raise InvalidCampaign(
            f"invalid campaign: a definition must be a JSON object, not {type(data).__name__}"
        )
    data = dict(data)
    try:
        check_json(data, "campaign")
        size = json_size(data, "campaign")
    except ValueError as exc:
        raise InvalidCampaign(f"invalid campaign: {str(exc).removeprefix('campaign.')}") from None
    if size > limits.max_definition_bytes:
        raise InvalidCampaign(
            f"invalid campaign: the definition is {size} bytes of JSON, more than the limit "
            f"of {limits.max_definition_bytes} (CAMPAIGN_MAX_DEFINITION_BYTES)"
        )
    nodes = data.get("nodes")
    if isinstance(nodes, Mapping) and len(nodes) > limits.max_nodes:
        raise InvalidCampaign(
            f"invalid campaign: nodes: {len(nodes)} nodes, more than the limit of "
            f"{limits.max_nodes} (CAMPAIGN_MAX_NODES)"
        )
    context = {"limits": limits, "max_duration": limits.max_duration}
    try:
        return Campaign.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidCampaign("invalid campaign: " + _describe(exc)) from None
    except RecursionError:
        raise InvalidCampaign("invalid campaign: nested too deeply") from None


def load_campaign(data: Any, version: int) -> Campaign:
    """A stored version as it was accepted: the structure is parsed again, but not the
    checks that can change over time (today's date, the installed ``holidays`` data, the
    configured limits). Raises ``ValueError`` when the stored form no longer parses."""
    try:
        return Campaign.model_validate({**data, "version": version}, context={"stored": True})
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:20]:
        loc = ".".join(_short(str(p)) for p in err["loc"] if not _is_tag(p))
        msg = _msg(err["msg"])
        lines.append(f"{loc}: {msg}" if loc else msg)
    if exc.error_count() > 20:
        lines.append(f"and {exc.error_count() - 20} more")
    return "; ".join(lines)


def _is_tag(part: Any) -> bool:
    return part in ("action", "delay", "wait", "exit")
