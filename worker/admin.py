"""Admin commands of the CLI. They talk to Redis through the public client, never to a
worker directly, so they work from any machine that can reach Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson
from pydantic import TypeAdapter, ValidationError

from app import overview
from app.client import CampaignClient
from app.connection import arq_redis, close_redis, open_redis
from app.errors import (
    CampaignError,
    EnrollManyError,
    InvalidRequest,
)
from app.failures import failure_groups, parse_group, replay_group
from app.models import EnrollmentStatus, State
from app.retention import finished_cutoff
from app.settings import Settings

__all__ = [
    "dead_letter_action",
    "dead_letters",
    "enroll",
    "enroll_file",
    "failures",
    "info",
    "list_enrollments",
    "migrate",
    "open_input",
    "parse_finished_before",
    "parse_maps",
    "ping_workers",
    "purge",
    "register",
    "replay",
    "show_status",
]


async def ping_workers(settings: Settings, wait_seconds: float) -> int:
    """Enqueue a ``ping`` job and wait for a worker to run it: exit 0 if one did, 1 if not."""
    data = await open_redis(settings)
    try:
        redis = arq_redis(settings, data)  # on a cluster: the master of arq's slot
    except BaseException:
        await close_redis(data)
        raise
    token = uuid.uuid4().hex
    # The job id carries the key prefix (arq's keys, arq:job:<id>, are shared by everyone)
    # and arq's hash tag (one slot on Redis Cluster).
    job_id = settings.arq_job_id(f"ping:{token}")
    try:
        await redis.enqueue_job("ping", token, _job_id=job_id, _queue_name=settings.arq_queue)
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            raw = await redis.get(settings.arq_job_id(f"pong:{token}"))
            if raw:
                doc = _json_doc(raw)
                try:
                    took = f"{float(doc['finished']) - float(doc['started']):.3f}s"
                except (KeyError, TypeError, ValueError):
                    took = "an unknown time"
                print(f"pong from {doc.get('worker_id', '?')} in {took}")
                return 0
            await asyncio.sleep(0.05)
        # Leave nothing behind: a ping nobody ran must not hold its job key for days.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(settings.arq_queue, job_id)
            pipe.delete(f"arq:job:{job_id}")
            await pipe.execute()
        print(f"no worker answered within {wait_seconds:g}s", file=sys.stderr)
        return 1
    finally:
        await close_redis(redis)
        if data is not redis:
            await close_redis(data)


def _utf8(data: bytes, where: str, start: int = 0) -> str:
    """``data`` decoded; a byte that is not UTF-8 is an InvalidRequest naming its offset
    (``start`` is the offset of ``data`` in its file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{where}: not UTF-8 at byte {start + exc.start}") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"{where}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise InvalidRequest(f"{where}: not valid JSON: {exc}") from None


def open_input(path: Path) -> BinaryIO:
    """``path`` opened for reading; a missing or unreadable file is an InvalidRequest
    naming it (one line, no traceback)."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_json(path: Path) -> Any:
    with open_input(path) as handle:
        try:
            data = handle.read()
        except OSError as exc:  # a directory, or a read error
            raise InvalidRequest(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _parse_json(_utf8(data, str(path)), str(path))


def _json_doc(raw: bytes | str) -> dict[str, Any]:
    """A stored JSON object, or {} when it is not one."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def register(client: CampaignClient, path: Path, out: TextIO) -> int:
    definition = _read_json(path)
    version = await client.register_campaign(definition)
    print(f"registered campaign {definition.get('id')!r} version {version}", file=out)
    return 0


async def enroll(
    client: CampaignClient, campaign: str, contact: str, attributes: dict[str, Any],
    timezone: str | None, out: TextIO, *, node: str | None = None, run_at: str | None = None,
) -> int:  # fmt: skip
    status = await client.enroll(campaign, contact, attributes, timezone, node=node,
                                 run_at=run_at)  # fmt: skip
    print(_status_line(status), file=out)
    return 0


def _contacts(path: Path, cursor: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, contact) from a JSON-lines file, one object per line; errors name the
    line, and a byte that is not UTF-8 its offset in the file. ``cursor[0]`` is the number
    of the line being read."""
    handle = open_input(path)
    offset = 0
    with handle:
        for number, raw in enumerate(handle, 1):
            cursor[0] = number
            line = _utf8(raw, f"{path}:{number}", offset)
            offset += len(raw)
            if not line.strip():
                continue
            doc = _parse_json(line, f"{path}:{number}")
            if not isinstance(doc, dict):
                raise InvalidRequest(f"{path}:{number}: expected an object with a contact_id")
            yield number, doc


async def enroll_file(
    client: CampaignClient, campaign: str, path: Path, batch: int, out: TextIO
) -> int:
    """Enroll every contact of a JSON-lines file, printing progress per batch.

    Stops at the first bad line (or a Redis error) with one line saying where, and how
    many contacts were enrolled before; running the same file again is safe (contacts
    already enrolled are skipped).
    """
    total = enrolled = already = conflict_count = 0
    conflicts: list[str] = []
    chunk: list[tuple[int, dict[str, Any]]] = []
    started = time.monotonic()

    def progress(where: int) -> str:
        """Progress for an error at line ``where``: nothing of ``chunk`` was written."""
        first = chunk[0][0] if chunk else where
        return (
            f"{enrolled} contacts enrolled from the lines before line {first}, none from there on"
        )

    async def flush() -> None:
        nonlocal enrolled, total, already, conflict_count
        try:
            result = await client.enroll_many(campaign, [c for _, c in chunk], batch_size=batch)
        except EnrollManyError as exc:
            line = chunk[min(exc.row, len(chunk) - 1)][0]
            enrolled += exc.enrolled
            done = chunk[exc.processed][0] if exc.processed < len(chunk) else line
            where = f"{path}:{line}"
            raise CampaignError(
                f"{where}: {exc.reason}; {enrolled} contacts enrolled from the lines before "
                f"line {done}, none from there on"
                + (
                    ""
                    if isinstance(exc, InvalidRequest)
                    else " (except perhaps this batch; running the file again is safe)"
                )
            ) from None
        enrolled += result
        already += result.already_enrolled
        conflict_count += result.conflict_count
        for row, contact_id, reason in result.conflicts:
            if len(conflicts) < 20:
                conflicts.append(f"  skipped {path}:{chunk[row][0]} {contact_id!r}: {reason}")
        total += len(chunk)
        rate = total / max(time.monotonic() - started, 1e-9)
        print(f"  {total} read, {enrolled} enrolled ({rate:,.0f} contacts/s)", file=out, flush=True)
        chunk.clear()

    cursor = [1]
    contacts = _contacts(path, cursor)
    while True:
        try:
            item = next(contacts, None)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{exc}; {progress(cursor[0])}") from None
        if item is None:
            break
        chunk.append(item)
        if len(chunk) >= batch:
            await flush()
    if chunk:
        await flush()
    extra = (
        f", {conflict_count} with a job still queued from an earlier enrollment"
        if conflict_count
        else ""
    )
    print(f"enrolled {enrolled} of {total} contacts ({already} already enrolled{extra})", file=out)
    for line in conflicts:
        print(line, file=out)
    return 0


def _status_line(st: EnrollmentStatus) -> str:
    when = st.run_at or st.deadline
    extra = f" at {when.isoformat()}" if when else ""
    return f"{st.enrollment_id}: {st.state.value} node={st.node} step={st.step} attempt={st.attempt}{extra}"


async def show_status(
    client: CampaignClient, enrollment_id: str, as_json: bool, out: TextIO
) -> int:
    st = await client.status(enrollment_id)
    if as_json:
        print(st.model_dump_json(indent=2), file=out)
        return 0
    print(_status_line(st), file=out)
    if st.error is not None:
        print(f"  error: {st.error.type}: {st.error.message}", file=out)
        if st.error.trace_id:
            print(f"  trace id: {st.error.trace_id}", file=out)
    print("  history:", file=out)
    for h in st.history:
        print(f"    {h.at:%Y-%m-%d %H:%M:%S} {h.from_state or '-':>9} -> {h.to_state:<9} "
              f"{h.node or '-'} (step {h.step}) {h.reason}", file=out)  # fmt: skip
    return 0


async def failures(client: CampaignClient, campaign: str | None, limit: int, out: TextIO) -> int:
    """Recent failures grouped by campaign, node and error type, with counts."""
    groups = await failure_groups(client, campaign)
    if not groups:
        print("no failed enrollments", file=out)
        return 0
    print(f"{'count':>6}  {'group (campaign:node:error)':<48} latest error", file=out)
    for group in groups[:limit]:
        latest = group.latest
        message = str(latest.get("message", ""))[:80].replace("\n", " ")
        print(f"{group.count:>6}  {group.name:<48} {message}", file=out)
        if latest.get("trace_id"):
            print(f"{'':>6}  {'':<48} e.g. {group.members[0][0]} trace {latest['trace_id']}",
                  file=out)  # fmt: skip
    print("replay a group with: campaign-worker replay --group CAMPAIGN:NODE:ERROR", file=out)
    return 0


async def replay(
    client: CampaignClient, enrollment_id: str | None, group: str | None, out: TextIO,
    *, to_version: int | None = None,
) -> int:  # fmt: skip
    """Replay one failed enrollment, or every one in a failure group (on ``to_version``).
    A member that cannot be replayed is printed with the reason; exit 1 when one was
    skipped for any reason but having been replayed (or changed) meanwhile."""
    if enrollment_id:
        if to_version is not None:
            await client.get_campaign(enrollment_id.partition(":")[0], to_version)
        st = await client.replay(enrollment_id, to_version=to_version)
        print(f"replayed {_status_line(st)}", file=out)
        return 0
    assert group is not None
    try:
        parse_group(group)
    except InvalidRequest:
        raise InvalidRequest(f"--group must be CAMPAIGN:NODE:ERROR (got {group!r})") from None
    try:
        report = await replay_group(client, group, to_version=to_version)
    except InvalidRequest as exc:
        if str(exc).startswith("group "):  # name the option, as the CLI's user typed it
            raise InvalidRequest(f"--{exc}") from None
        raise
    for eid, why in report.gone + report.skipped:
        print(f"  skipped {eid}: {why}", file=out)
    print(f"replayed {report.replayed} of {report.total} failed enrollments in {group}", file=out)
    return 1 if report.skipped else 0


async def dead_letters(client: CampaignClient, limit: int, out: TextIO) -> int:
    """The poison jobs kept in the dead-letter list, newest first."""
    from worker.dead_letters import list_dead_letters

    letters, total = await list_dead_letters(client, limit)
    if not letters:
        print("no dead letters", file=out)
        return 0
    for letter in letters:
        try:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.at or 0))
        except (TypeError, ValueError, OverflowError, OSError):
            at = "????-??-?? ??:??:??"
        print(f"{at}  {letter.job_id}  {letter.reason}  payload={letter.payload[:100]!r}",
              file=out)  # fmt: skip
    print(f"{len(letters)} of {total} shown", file=out)
    return 0


def _table(header: list[str], rows: list[list[str]], out: TextIO) -> None:
    """Columns padded to their widest cell: the first left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip(), file=out)


async def info(client: CampaignClient, out: TextIO) -> int:
    """The queue per shard, workers alive, and every campaign's enrollments by state."""
    await client.connect()  # checks CAMPAIGN_SHARDS against the data
    keys = client.service.keys
    view = await overview.queue_overview(client.redis, keys, client.settings)
    rows = [[f"{{{s.shard}}}", str(s.due), str(s.deferred), str(s.running), str(s.dead)]
            for s in view.shards]  # fmt: skip
    if len(view.shards) > 1:
        rows.append(["total", str(view.due), str(view.deferred), str(view.running),
                     str(view.dead)])  # fmt: skip
    _table(["shard", "due", "deferred", "running", "dead letters"], rows, out)
    print(file=out)
    print(f"workers alive: {view.workers_alive} (heartbeat within "
          f"{overview.WORKER_ALIVE_SECONDS:g}s)", file=out)  # fmt: skip
    print(f"maintenance jobs queued: {view.maintenance_queued} ({client.settings.arq_queue})",
          file=out)  # fmt: skip
    print(file=out)
    if not view.campaigns:
        print("no campaigns registered", file=out)
        return 0
    states = [s.value for s in State]
    _table(
        ["campaign", *states, "total"],
        [[c.campaign_id, *(str(c.counts[s]) for s in states), str(c.total)]
         for c in view.campaigns],
        out,
    )  # fmt: skip
    return 0


async def list_enrollments(
    client: CampaignClient,
    campaign: str,
    state: str | None,
    node: str | None,
    limit: int,
    cursor: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """One page of a campaign's enrollments, one ``id<TAB>state<TAB>node`` line each (``-``
    for no node); ``next: <cursor>`` on ``err`` when there is more."""
    await client.connect()  # checks CAMPAIGN_SHARDS against the data
    keys = client.service.keys
    page = await overview.list_enrollments(
        client.redis, keys, campaign, state=state, node=node, limit=limit, cursor=cursor
    )
    for eid, st, at in page.items:
        print(f"{eid}\t{st}\t{at or '-'}", file=out)
    if page.next_cursor is not None:
        out.flush()
        print(f"next: {page.next_cursor}", file=err)
    return 0


def parse_finished_before(text: str) -> datetime | timedelta:
    """``--finished-before``: an ISO 8601 duration in days, hours, minutes or seconds
    (``P30D``, ``PT0S``), a number of seconds (``2592000``, as ``CAMPAIGN_RETENTION``), or
    an instant with an offset (``2026-11-01T00:00:00Z``); anything else (a negative
    duration, years or months, which have no fixed length) is a CampaignError naming it."""
    value = text.strip()
    duration: timedelta | None = None
    if re.fullmatch(r"\d{1,12}(\.\d{1,9})?", value):
        duration = timedelta(seconds=float(value))
    elif value[:1] in {"P", "p", "-", "+"}:
        upper = value.upper()
        if upper.startswith("-"):
            raise CampaignError(f"--finished-before: {text!r} is negative; write e.g. P30D")
        if re.search(r"[YM]", upper.partition("T")[0]):
            raise CampaignError(
                f"--finished-before: {text!r}: years and months have no fixed length; write "
                "days (P365D, P30D)"
            )
        try:
            duration = TypeAdapter(timedelta).validate_python(upper)
        except (ValidationError, OverflowError):
            duration = None
        if duration is None or duration < timedelta(0):
            raise CampaignError(
                f"--finished-before: {text!r} is not an ISO 8601 duration such as P30D or PT0S"
            )
    if duration is not None:
        try:
            finished_cutoff(duration)
        except InvalidRequest:
            raise CampaignError(
                f"--finished-before: {text!r} is too long (it reaches back past the year 1)"
            ) from None
        return duration
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CampaignError(
            f"--finished-before: {text!r} is neither an ISO 8601 duration (P30D, PT0S), a "
            "number of seconds, nor an instant (2026-11-01T00:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise CampaignError(f"--finished-before: {text!r} has no UTC offset (add Z or +01:00)")
    return when


async def purge(
    client: CampaignClient, before: datetime | timedelta, campaign: str | None, dry_run: bool,
    out: TextIO,
) -> int:  # fmt: skip
    """Delete (or with ``dry_run`` count) finished enrollments and print the count."""
    result = await client.purge(finished_cutoff(before), campaign_id=campaign, dry_run=dry_run)
    parts = ", ".join(f"{n} {state}" for state, n in result.by_state.items())
    verb = "would purge" if dry_run else "purged"
    print(f"{verb} {_count(result.total, 'finished enrollment')} ({parts})", file=out)
    return 0


async def dead_letter_action(
    client: CampaignClient, requeue: str | None, every: bool, purge_all: bool, out: TextIO
) -> int:
    """``dead-letters --requeue ID``, ``--requeue --all`` or ``--purge``."""
    from worker.dead_letters import purge_dead_letters, requeue_dead_letters

    if purge_all:
        if every:
            raise CampaignError("--all goes with --requeue; --purge deletes every letter already")
        print(f"purged {_count(await purge_dead_letters(client), 'dead letter')}", file=out)
        return 0
    if requeue is None:
        raise CampaignError("--all goes with --requeue: dead-letters --requeue --all")
    if bool(requeue) == every:
        raise CampaignError("--requeue takes a job id or --all (not both, not neither)")
    # The reconciler's repair logs each re-created job (a warning) for a worker's log
    # pipeline; here the outcome is printed below, line by line, so only its errors show.
    reconciler_log = logging.getLogger("worker.reconciler")
    level = reconciler_log.level
    reconciler_log.setLevel(max(level, logging.ERROR))
    try:
        report = await requeue_dead_letters(client, requeue or None)
    finally:
        reconciler_log.setLevel(level)
    for line in report.lines:
        print(line, file=out)
    print(f"requeued {report.requeued}, dropped {report.dropped} (nothing to requeue), "
          f"kept {report.kept}", file=out)  # fmt: skip
    return 1 if report.kept else 0


def parse_maps(values: list[str]) -> dict[str, str]:
    """``--map OLD=NEW`` options as a dict; a malformed or repeated one is named."""
    out: dict[str, str] = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise CampaignError(f"--map {value!r}: write it as OLD=NEW (node names)")
        if old in out:
            raise CampaignError(f"--map: node {old!r} is mapped twice")
        out[old] = new
    return out


async def migrate(
    client: CampaignClient, campaign: str, to_version: int, mapping: dict[str, str],
    states: list[str] | None, dry_run: bool, out: TextIO,
) -> int:  # fmt: skip
    """Move enrollments to ``to_version``; exit 1 when some had to be left alone (or were
    running, so that running it again moves them)."""
    report = await client.migrate(campaign, to_version, mapping=mapping, states=states,
                                  dry_run=dry_run)  # fmt: skip
    for eid, node, why in report.left:
        print(f"left {eid} at node {node!r}: {why}", file=out)
    if report.left_count > len(report.left):
        print(f"... and {report.left_count - len(report.left)} more left alone", file=out)
    parts = ", ".join(f"{n} {state}" for state, n in report.moved.items())
    verb = "would migrate" if dry_run else "migrated"
    running = f", {report.running} running now (run migrate again)" if report.running else ""
    print(f"{verb} {_count(report.total, 'enrollment')} of {campaign!r} to version {to_version} "
          f"({parts}); {report.already} already on it, {report.left_count} left alone, "
          f"{report.changed} changed meanwhile{running}", file=out)  # fmt: skip
    return 1 if report.left_count or report.running else 0


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """``1 enrollment``, ``2 enrollments`` (``plural`` when it is not ``singular + "s"``)."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"
