"""Moving enrollments to another version of their campaign (``campaign-worker migrate``).

An enrollment keeps its state, node (or the one ``mapping`` names), step, run time or
deadline, and history; only the version it runs under changes. A scheduled step's or a
wait's job keeps its id and due time and gets a payload for the new version, in the same
atomic call that changes the record, so a worker never runs the old version's node
after the move. An enrollment whose node is missing from the new version (and not
mapped), or a wait whose node is not a wait node there, is reported and left alone. (A
scheduled step may be at any kind of node: after a delay, the step job enters whatever
node follows it.) A wait whose timeout job a worker is running right now is left alone
too (the worker holds the old version's payload): it is counted in ``running``, and
running ``migrate`` again moves it once that job is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from app.campaigns import Campaign, WaitNode
from app.errors import InvalidRequest
from app.jobs import STEP_FUNCTION, TIMEOUT_FUNCTION, Job, JobTarget
from app.models import State
from app.planner import ms
from app.scheduling import SchedulingService
from app.store import Transition, index_slices, now_ms

__all__ = ["DEFAULT_STATES", "MigrationReport", "migrate_enrollments"]

#: What ``migrate`` moves unless told otherwise.
DEFAULT_STATES = (State.FAILED.value, State.SCHEDULED.value, State.WAITING.value)
_MOVABLE = frozenset(DEFAULT_STATES)
_FIELDS = ("state", "version", "node", "step", "attempt", "job", "run_at", "deadline",
           "timezone", "base_step")  # fmt: skip
SLICE = 500


@dataclass
class MigrationReport:
    """What a migration did (or, on a dry run, would do)."""

    to_version: int
    dry_run: bool = False
    moved: dict[str, int] = field(default_factory=dict)
    already: int = 0
    changed: int = 0
    #: (enrollment id, node, why it was left alone); the first 1000.
    left: list[tuple[str, str, str]] = field(default_factory=list)
    left_count: int = 0
    #: Enrollments whose job a worker was running: left alone this time (run it again).
    running: int = 0

    @property
    def total(self) -> int:
        return sum(self.moved.values())

    def leave(self, eid: str, node: str, why: str) -> None:
        self.left_count += 1
        if len(self.left) < 1000:
            self.left.append((eid, node, why))


def _node_problem(campaign: Campaign, state: str, node: str | None) -> str | None:
    """Why an enrollment in ``state`` cannot be at ``node`` of ``campaign`` (None: it can)."""
    if node is None:
        return None if state != State.WAITING else "a wait with no node"
    # A scheduled step may be at any node: after a delay, the step job enters the next
    # node whatever its type (an action runs, a wait or an exit is entered).
    found = campaign.nodes.get(node)
    if found is None:
        return f"node {node!r} is not in version {campaign.version} (map it with --map)"
    if state == State.WAITING and not isinstance(found, WaitNode):
        return f"node {node!r} is a {found.type} node in version {campaign.version}, not a wait"
    return None


async def migrate_enrollments(
    service: SchedulingService,
    campaign_id: str,
    to_version: int,
    *,
    mapping: Mapping[str, str] | None = None,
    states: Iterable[str] = DEFAULT_STATES,
    dry_run: bool = False,
    progress: Callable[[MigrationReport], None] | None = None,
) -> MigrationReport:
    """Move the enrollments of ``campaign_id`` in ``states`` to version ``to_version``."""
    states = list(dict.fromkeys(states))
    for state in states:
        if state not in _MOVABLE:
            raise InvalidRequest(
                f"state {state!r} cannot be migrated (one of {', '.join(DEFAULT_STATES)}; a "
                "running step finishes on its version, finished enrollments stay as they ended)"
            )
    await service.registry.get(campaign_id)  # an unknown campaign is named as such
    campaign = await service.registry.get(campaign_id, to_version)
    mapping = dict(mapping or {})
    for old, new in mapping.items():
        if new not in campaign.nodes:
            raise InvalidRequest(f"--map {old}={new}: node {new!r} is not in version {to_version}")
    report = MigrationReport(to_version=to_version, dry_run=dry_run,
                             moved=dict.fromkeys(states, 0))  # fmt: skip
    for shard in service.keys.all_shards():
        for state in states:
            index = shard.state_index(campaign_id, state)
            async for ids in index_slices(service.redis, index, SLICE):
                rows = await service.store.records(ids, *_FIELDS)
                await _migrate_slice(service, campaign, state, ids, rows, mapping, report)
                if progress is not None:
                    progress(report)
    return report


async def _migrate_slice(
    service: SchedulingService, campaign: Campaign, state: str, ids: list[str],
    rows: list[list[str | None]], mapping: dict[str, str], report: MigrationReport,
) -> None:  # fmt: skip
    version = campaign.version
    assert version is not None
    items: list[tuple[str, Transition]] = []
    old_nodes: dict[str, str] = {}
    for eid, row in zip(ids, rows, strict=True):
        rec = {f: v for f, v in zip(_FIELDS, row, strict=True) if v is not None}
        if rec.get("state") != state:
            report.changed += 1  # moved on since it was listed
            continue
        if rec.get("version") == str(version):
            report.already += 1
            continue
        old_node = rec.get("node") or None
        node = mapping.get(old_node, old_node) if old_node is not None else None
        problem = _node_problem(campaign, state, node)
        if problem is not None:
            report.leave(eid, old_node or "", problem)
            continue
        if report.dry_run:
            report.moved[state] += 1
            continue
        old_nodes[eid] = old_node or ""
        items.append((eid, _transition(campaign, eid, rec, node)))
    if not items:
        return
    results = await service.store.apply_many(items)
    for (eid, tr), result in zip(items, results, strict=True):
        if result.ok:
            report.moved[state] += 1
            if service.on_transition is not None:
                service.on_transition(eid, tr.history[0])
        elif result.job_conflict:
            report.leave(eid, old_nodes[eid], f"job {result.job_conflict!r} is taken")
        elif result.leased:
            report.running += 1  # a worker runs its job now: left alone, run migrate again
        else:
            report.changed += 1


def _transition(campaign: Campaign, eid: str, rec: dict[str, str], node: str | None) -> Transition:
    """Same state, step, attempt, node (or the mapped one) and times; the new version, and
    for a scheduled step or a wait its job (same id and due time) with a new payload."""
    version = campaign.version
    assert version is not None
    state, step, attempt = rec["state"], int(rec["step"]), int(rec.get("attempt") or 1)
    old_node = rec.get("node") or None
    target = JobTarget(eid, campaign.id, version, rec.get("timezone") or None,
                       int(rec.get("base_step") or 0))  # fmt: skip
    job: Job | None = None
    current = rec.get("job")
    if state == State.SCHEDULED and current:
        due = int(rec.get("run_at") or now_ms())
        job = Job(current, STEP_FUNCTION, [eid, step, attempt], target.kwargs(node), due)
    elif state == State.WAITING and current:
        assert node is not None
        due = int(rec.get("deadline") or now_ms())
        job = Job(current, TIMEOUT_FUNCTION, [eid, step], target.kwargs(node), due)
    at = ms(datetime.now(UTC))
    moved = f" (node {old_node} -> {node})" if node != old_node else ""
    fields = {"version": str(version), "updated_at": str(at)}
    unset = []
    if node is not None:
        fields["node"] = node
    elif old_node is not None:
        unset.append("node")
    entry = {"at": at, "from": state, "to": state, "node": node, "step": step,
             "attempt": attempt,
             "reason": f"migrated from version {rec.get('version')} to {version}{moved}"}  # fmt: skip
    return Transition(
        campaign_id=campaign.id, expect_states=(state,), expect_step=step,
        expect_attempt=attempt, expect_job=current or None, set=fields, unset=unset,
        history=[entry], add_job=job, unleased=True,
    )  # fmt: skip
