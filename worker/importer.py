"""``campaign-worker import``: bring enrollments over from another system (the cron job).

Each line of a JSON-lines file is one enrollment, placed at its node with its due time
(``enroll_many`` rows with ``node`` and ``run_at``). A bad row is reported by its line
number and left out; the rest is imported. Running the same file again is safe:
contacts already enrolled are skipped.

Rows are checked one by one before a batch is sent (the checks ``enroll_many`` makes:
:meth:`app.scheduling.SchedulingService.check_enroll_row`), so a bad row costs nothing
more than its check; only a row that cannot be planned is found by ``enroll_many``,
and then the rest of its batch is sent again. A contact that appears twice among the
rows waiting to be sent is a bad row ("duplicate of line M"): the first one is kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from app.client import CampaignClient
from app.errors import CampaignNotFound, EnrollManyError, InvalidRequest
from worker.admin import open_input

__all__ = ["FIELDS", "ImportReport", "import_file"]

#: The fields a row may have; ``campaign_id`` and ``contact_id`` are required.
FIELDS = frozenset({"campaign_id", "contact_id", "node", "run_at", "attributes", "timezone"})
#: Bad rows printed one by one; past this only their count.
SHOWN_BAD = 100


@dataclass
class ImportReport:
    """What an import did: rows read, imported, skipped as already enrolled, and bad rows
    as (line number, reason)."""

    read: int = 0
    imported: int = 0
    already: int = 0
    conflicts: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_count: int = 0

    def reject(self, line: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad) < SHOWN_BAD:
            self.bad.append((line, reason))


def _rows(path: Path, report: ImportReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each well-formed line; malformed ones go to ``report``."""
    import orjson

    with open_input(path) as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark (some editors and exports add one)
            if not raw.strip():
                continue
            report.read += 1
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                report.reject(number, f"not valid JSON: {exc}")
                continue
            if not isinstance(doc, dict):
                report.reject(number, "expected a JSON object with campaign_id and contact_id")
                continue
            unknown = sorted(set(doc) - FIELDS)
            if unknown:
                allowed = ", ".join(sorted(FIELDS))
                report.reject(number, f"unknown field {unknown[0]!r} (allowed: {allowed})")
                continue
            missing = [f for f in ("campaign_id", "contact_id") if f not in doc]
            if missing:
                report.reject(number, f"missing {missing[0]!r}")
                continue
            if not isinstance(doc["campaign_id"], str) or not doc["campaign_id"]:
                report.reject(number, "campaign_id must be a non-empty string")
                continue
            yield number, doc


async def import_file(
    client: CampaignClient, path: Path, batch: int, out: TextIO, err: TextIO | None = None
) -> int:
    """Import the enrollments of a JSON-lines file; exit 1 when any row was bad. Bad rows
    are listed on ``err`` (standard error when None)."""
    err = sys.stderr if err is None else err
    report = ImportReport()
    pending: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    #: campaign -> contact id -> the line of its row among the pending ones
    lines_of: dict[str, dict[str, int]] = {}
    unknown_campaigns: dict[str, str] = {}
    started = last_shown = time.monotonic()

    def show_progress(final: bool = False) -> None:
        nonlocal last_shown
        now = time.monotonic()
        if not final and now - last_shown < 1.0:
            return
        last_shown = now
        rate = report.imported / max(now - started, 1e-9)
        print(f"  {report.read} read, {report.imported} imported, {report.bad_count} bad "
              f"({rate:,.0f} rows/s)", file=out, flush=True)  # fmt: skip

    async def flush(campaign_id: str) -> None:
        rows = pending.pop(campaign_id, [])
        lines_of.pop(campaign_id, None)
        if campaign_id not in unknown_campaigns:
            try:
                campaign = await client.service.registry.get(campaign_id)
            except CampaignNotFound as exc:
                unknown_campaigns[campaign_id] = str(exc)
        if campaign_id in unknown_campaigns:
            for number, _ in rows:
                report.reject(number, unknown_campaigns[campaign_id])
            return
        good = []
        for number, row in rows:  # the checks enroll_many makes, one row at a time
            try:
                client.service.check_enroll_row(campaign, row)
            except InvalidRequest as exc:
                report.reject(number, str(exc))
                continue
            good.append((number, row))
        rows = good
        while rows:  # a row that cannot be planned (rare) stops the batch: the rest again
            try:
                result = await client.enroll_many(
                    campaign_id, [r for _, r in rows], batch_size=len(rows)
                )
            except CampaignNotFound as exc:
                unknown_campaigns[campaign_id] = str(exc)
                for number, _ in rows:
                    report.reject(number, str(exc))
                return
            except EnrollManyError as exc:
                if not isinstance(exc, InvalidRequest):  # Redis down, or worse: stop here
                    first = rows[min(exc.processed, len(rows) - 1)][0]
                    cause = exc.__cause__
                    why = f"{type(cause).__name__}: {cause}" if cause is not None else exc.reason
                    raise InvalidRequest(
                        f"{path}:{first}: writing the rows of lines {first}-{rows[-1][0]} "
                        f"failed: {why}; {report.imported + exc.enrolled} rows imported so "
                        "far; running the same file again is safe (rows already imported "
                        "are skipped)"
                    ) from None
                # A bad row: nothing of this batch was written. Report it; send the rest.
                report.imported += exc.enrolled
                report.reject(rows[exc.row][0], exc.reason)
                rows = rows[exc.processed : exc.row] + rows[exc.row + 1 :]
                continue
            report.imported += result
            report.already += result.already_enrolled
            report.conflicts += result.conflict_count
            rows = []
        show_progress()

    for number, row in _rows(path, report):
        campaign_id = row.pop("campaign_id")
        contact = row.get("contact_id")
        if isinstance(contact, str):
            seen = lines_of.setdefault(campaign_id, {})
            if contact in seen:
                report.reject(number, f"duplicate of line {seen[contact]}")
                continue
            seen[contact] = number
        chunk = pending.setdefault(campaign_id, [])
        chunk.append((number, row))
        if len(chunk) >= batch:
            await flush(campaign_id)
    for campaign_id in list(pending):
        await flush(campaign_id)
    show_progress(final=True)
    for number, reason in sorted(report.bad):
        print(f"{path}:{number}: {reason}", file=err)
    if report.bad_count > len(report.bad):
        print(f"... and {report.bad_count - len(report.bad)} more bad rows", file=err)
    skipped = f", {report.already} already enrolled" if report.already else ""
    if report.conflicts:
        skipped += f", {report.conflicts} with a job still queued from an earlier enrollment"
    print(f"imported {report.imported} of {report.read} rows ({report.bad_count} bad{skipped})",
          file=out)  # fmt: skip
    return 1 if report.bad_count else 0
