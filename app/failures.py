"""Failed enrollments grouped by campaign, node and error type, and replaying a group.

The CLI (``failures``, ``replay --group``), the HTTP API and the console share these, so
a group has one name everywhere: ``CAMPAIGN:NODE:ERROR`` (``-`` for no node).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from app.errors import CorruptRecord, EnrollmentNotFound, InvalidRequest
from app.models import State

if TYPE_CHECKING:
    from app.client import CampaignClient

__all__ = ["FailureGroup", "GroupReplay", "failure_groups", "parse_group", "replay_group"]

#: Failed enrollments read per campaign at most when grouping.
SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class FailureGroup:
    """Failed enrollments of one campaign that failed at one node with one error type;
    ``members`` are ``(enrollment id, error document)``, newest failure first."""

    campaign_id: str
    node: str
    error_type: str
    members: list[tuple[str, dict[str, Any]]]

    @property
    def name(self) -> str:
        """``CAMPAIGN:NODE:ERROR``, as ``replay --group`` takes it."""
        return f"{self.campaign_id}:{self.node}:{self.error_type}"

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def latest(self) -> dict[str, Any]:
        return self.members[0][1] if self.members else {}


@dataclass
class GroupReplay:
    """What replaying a group did: ``replayed`` of ``total``; ``gone`` were no longer
    failed (replayed by someone else meanwhile); ``skipped`` could not be replayed, as
    ``(enrollment id, reason)``."""

    group: str
    total: int = 0
    replayed: int = 0
    gone: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def parse_group(group: str) -> tuple[str, str, str]:
    """``CAMPAIGN:NODE:ERROR`` split in three (a campaign id and an error type have no
    ``:``, a node name may); InvalidRequest naming it otherwise."""
    campaign, _, rest = group.partition(":") if isinstance(group, str) else ("", "", "")
    node, _, error_type = rest.rpartition(":")
    if not (campaign and node and error_type):
        raise InvalidRequest(f"group: must be CAMPAIGN:NODE:ERROR (got {str(group)[:200]!r})")
    return campaign, node, error_type


def _failed_at(err: dict[str, Any]) -> float:
    """When an error document says it happened (0 when it cannot be read)."""
    try:
        at = float(err.get("at") or 0)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return at if math.isfinite(at) else 0.0


def _error_doc(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        return doc
    return {"type": "CorruptRecord", "message": "stored field 'error' cannot be read"}


async def failure_groups(
    client: CampaignClient, campaign_id: str | None = None, scan_limit: int = SCAN_LIMIT
) -> list[FailureGroup]:
    """Failed enrollments (up to ``scan_limit`` per campaign) grouped by campaign, node and
    error type, the largest group first."""
    await client.connect()
    service = client.service
    campaigns = [campaign_id] if campaign_id else await service.registry.ids()
    found: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for cid in campaigns:
        ids = await service.store.list_ids(cid, State.FAILED.value, limit=scan_limit)
        rows = await service.store.records(ids, "node", "error")
        for eid, (node, error) in zip(ids, rows, strict=True):
            err = _error_doc(error)
            # an error type is a class name; a stored one with ':' would not parse back
            error_type = str(err.get("type", "?")).replace(":", "_") or "?"
            found[(cid, node or "-", error_type)].append((eid, err))
    groups = []
    for (cid, node, etype), members in found.items():
        members.sort(key=lambda m: _failed_at(m[1]), reverse=True)
        groups.append(FailureGroup(cid, node, etype, members))
    groups.sort(key=lambda g: (-g.count, g.name))
    return groups


async def replay_group(
    client: CampaignClient, group: str, *, to_version: int | None = None
) -> GroupReplay:
    """Replay every failed enrollment of a group (on ``to_version`` when given). A member
    that can no longer be replayed is reported, not raised; a bad group name, or a node
    the target version lacks, raises :class:`~app.errors.InvalidRequest`."""
    campaign_id, node, error_type = parse_group(group)
    campaign = await client.get_campaign(campaign_id, to_version)  # CampaignNotFound names it
    if to_version is not None and node != "-" and node not in campaign.nodes:
        raise InvalidRequest(
            f"group {group}: node {node!r} is not in version {to_version} of campaign "
            f"{campaign_id!r}; replay on a version that has it, or migrate with --map first"
        )
    groups = await failure_groups(client, campaign_id)
    match = next((g for g in groups if (g.node, g.error_type) == (node, error_type)), None)
    report = GroupReplay(group, total=match.count if match else 0)
    for eid, _ in match.members if match else []:
        try:
            await client.replay(eid, to_version=to_version)
            report.replayed += 1
            continue
        except (InvalidRequest, EnrollmentNotFound) as exc:
            why = str(exc)
            state = (await client.service.store.records([eid], "state"))[0][0]
            if state != State.FAILED:  # replayed (or purged) by someone else: nothing to do
                report.gone.append((eid, f"{state or 'gone'} now, no longer failed"))
                continue
        except CorruptRecord as exc:  # that one cannot be read: say so, replay the others
            why = str(exc)
        report.skipped.append((eid, why))
    return report
