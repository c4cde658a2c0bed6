"""``campaign-worker import``: 10,000 rows from the old cron system, bad rows reported by
line number (the first line is 1), the rest imported with their nodes and due times."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.client import CampaignClient
from app.models import State
from app.settings import Settings
from tests.queue_view import queued

CAMPAIGN: dict[str, Any] = {
    "id": "onboarding",
    "entry": "welcome",
    "nodes": {
        "welcome": {"type": "action", "action": "log", "next": "reply"},
        "reply": {
            "type": "wait",
            "event": "replied",
            "timeout": "P3D",
            "on_event": "done",
            "on_timeout": "nudge",
        },
        "nudge": {"type": "action", "action": "log", "next": "done"},
        "done": {"type": "exit"},
    },
}
BASE = datetime(2027, 1, 4, 9, 0, tzinfo=UTC)


def _line(i: int) -> str:
    """Row ``i`` (line i + 1): a mix of entry, action and wait placements."""
    row: dict[str, Any] = {"campaign_id": "onboarding", "contact_id": f"c{i}"}
    if i % 3 == 1:
        row |= {"node": "nudge", "run_at": (BASE + timedelta(minutes=i)).isoformat()}
    elif i % 3 == 2:
        row |= {"node": "reply", "run_at": (BASE + timedelta(minutes=i)).isoformat(),
                "timezone": "Europe/Berlin", "attributes": {"email": f"c{i}@example.com"}}  # fmt: skip
    return json.dumps(row)


BAD = {
    17: ("not json at all", "not valid JSON"),
    250: ('{"campaign_id": "onboarding"}', "missing 'contact_id'"),
    1001: (
        '{"campaign_id": "onboarding", "contact_id": "x1", "node": "gone"}',
        "node 'gone' is not in campaign 'onboarding' version 1",
    ),
    4000: (
        '{"campaign_id": "onboarding", "contact_id": "x2", "node": "nudge", '
        '"run_at": "2027-01-04T09:00:00"}',
        "has no UTC offset",
    ),
    7777: ('{"campaign_id": "nope", "contact_id": "x3"}', "no campaign named 'nope' is registered"),
    9000: (
        '{"campaign_id": "onboarding", "contact_id": "x4", "colour": "red"}',
        "unknown field 'colour'",
    ),
    9999: (
        '{"campaign_id": "onboarding", "contact_id": "x5", "timezone": "Mars/Base"}',
        "timezone",
    ),
    10005: ("[1, 2]", "expected a JSON object"),
}


def _file(tmp_path: Path) -> tuple[Path, int]:
    lines, good, i = [], 0, 0
    while len(lines) < 10_006:
        number = len(lines) + 1
        if number in BAD:
            lines.append(BAD[number][0])
        else:
            lines.append(_line(i))
            i += 1
            good += 1
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good


def test_import_reports_bad_rows_by_line_and_imports_the_rest(
    cli: Any, settings: Settings, tmp_path: Path
) -> None:
    campaign = tmp_path / "onboarding.json"
    campaign.write_text(json.dumps(CAMPAIGN))
    assert cli("register", str(campaign))[0] == 0
    path, good = _file(tmp_path)
    assert good == 10_006 - len(BAD)

    code, out, err = cli("import", str(path))
    assert code == 1
    reported = [line for line in err.splitlines() if line.startswith(f"{path}:")]
    assert [int(line.split(":")[1]) for line in reported] == sorted(BAD)
    for line in reported:
        number = int(line.split(":")[1])
        assert BAD[number][1] in line, line
    assert f"imported {good} of 10006 rows ({len(BAD)} bad)" in out
    assert "read," in out  # progress

    async def check() -> None:
        async with CampaignClient(settings=settings) as client:
            counts = await client.service.store.count_by_state("onboarding")
            assert counts[State.WAITING] == good // 3
            assert counts[State.SCHEDULED] == good - good // 3
            nudge = await client.status("onboarding:c1")  # row 1: nudge at BASE + 1 min
            assert (nudge.state, nudge.node) == (State.SCHEDULED, "nudge")
            assert nudge.run_at == BASE + timedelta(minutes=1)
            waiting = await client.status("onboarding:c5")
            assert (waiting.state, waiting.node) == (State.WAITING, "reply")
            assert waiting.deadline == BASE + timedelta(minutes=5)
            assert waiting.timezone == "Europe/Berlin"
            assert waiting.attributes == {"email": "c5@example.com"}
            jobs = await queued(client.redis, client.service.keys)
            assert jobs["step:onboarding:c1:1:1"] == int(
                (BASE + timedelta(minutes=1)).timestamp() * 1000
            )
            assert jobs["timeout:onboarding:c5:1"] == int(
                (BASE + timedelta(minutes=5)).timestamp() * 1000
            )
            assert len(jobs) == good

    asyncio.run(check())

    # Running the same file again is safe: every good row is already there.
    code, out, _ = cli("import", str(path))
    assert code == 1
    assert f"imported 0 of 10006 rows ({len(BAD)} bad, {good} already enrolled)" in out


def test_a_clean_file_exits_0_and_a_missing_file_is_named(cli: Any, tmp_path: Path) -> None:
    campaign = tmp_path / "onboarding.json"
    campaign.write_text(json.dumps(CAMPAIGN))
    cli("register", str(campaign))
    path = tmp_path / "ok.jsonl"
    path.write_text(_line(0) + "\n\n" + _line(1) + "\n")
    code, out, err = cli("import", str(path))
    assert (code, err) == (0, "")
    assert "imported 2 of 2 rows (0 bad)" in out
    code, _, err = cli("import", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "missing.jsonl: no such file" in err


def _register(cli: Any, tmp_path: Path) -> None:
    campaign = tmp_path / "onboarding.json"
    campaign.write_text(json.dumps(CAMPAIGN))
    assert cli("register", str(campaign))[0] == 0


def test_many_bad_rows_are_checked_one_by_one_not_by_resending_the_batch(
    cli: Any, tmp_path: Path
) -> None:
    """Every other row bad: each is reported by line and the good ones imported. (Each
    bad row used to stop its batch and re-send the rest: quadratic, ~40 s for 6,000 rows;
    checked one by one, this file takes well under a second.)"""
    _register(cli, tmp_path)
    lines = []
    for i in range(4000):
        row: dict[str, Any] = {"campaign_id": "onboarding", "contact_id": f"c{i}"}
        if i % 2:
            row |= {"node": ["gone", "nudge", "reply"][i % 3]}
            if i % 3:
                row |= {"timezone": "Mars/Base"} if i % 3 == 1 else {"run_at": "tomorrow"}
        lines.append(json.dumps(row))
    path = tmp_path / "half-bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("import", str(path))
    assert code == 1
    reported = [line for line in err.splitlines() if line.startswith(f"{path}:")]
    assert [int(line.split(":")[1]) for line in reported] == list(range(2, 201, 2))
    assert "node 'gone' is not in campaign" in reported[1]  # line 4: i = 3
    assert "timezone" in reported[0] and "not an ISO 8601 date" in reported[2]
    assert "... and 1900 more bad rows" in err
    assert "imported 2000 of 4000 rows (2000 bad)" in out


def test_a_contact_twice_in_a_batch_is_a_bad_row_and_the_first_is_kept(
    cli: Any, settings: Settings, tmp_path: Path
) -> None:
    _register(cli, tmp_path)
    path = tmp_path / "dup.jsonl"
    rows = [
        {"campaign_id": "onboarding", "contact_id": "b", "node": "reply",
         "run_at": BASE.isoformat()},
        {"campaign_id": "onboarding", "contact_id": "a"},
        {"campaign_id": "onboarding", "contact_id": "a", "node": "reply",
         "run_at": BASE.isoformat()},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("import", str(path))
    assert code == 1
    assert f"{path}:3: duplicate of line 2" in err
    assert "imported 2 of 3 rows (1 bad)" in out

    async def check() -> None:
        async with CampaignClient(settings=settings) as client:
            st = await client.status("onboarding:a")
            assert (st.state, st.node) == (State.SCHEDULED, "welcome")

    asyncio.run(check())


def test_a_byte_order_mark_on_line_1_is_not_a_bad_row(cli: Any, tmp_path: Path) -> None:
    _register(cli, tmp_path)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line(0) + "\n" + _line(1) + "\n").encode())
    code, out, err = cli("import", str(path))
    assert (code, err) == (0, "")
    assert "imported 2 of 2 rows (0 bad)" in out


def test_a_redis_failure_names_the_file_lines(cli: Any, settings: Settings, tmp_path: Path) -> None:
    """Redis refuses writes (maxmemory reached): the message names lines of the file, not
    rows of a batch."""
    _register(cli, tmp_path)
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(_line(i) + "\n" for i in range(5)))

    async def maxmemory(value: str) -> str:
        """Set maxmemory on the session's server; returns what it was."""
        async with CampaignClient(settings=settings) as client:
            was = (await client.redis.config_get("maxmemory"))["maxmemory"]
            await client.redis.config_set("maxmemory", value)
            return str(was)

    was = asyncio.run(maxmemory("1"))
    try:
        code, _, err = cli("import", str(path), "--batch", "2")
    finally:
        asyncio.run(maxmemory(was))  # the server is shared: put back the project's value
    assert code == 1
    assert f"{path}:1: writing the rows of lines 1-2 failed: " in err, err
    assert "maxmemory" in err and "rows 0-" not in err, err


def test_a_full_redis_before_any_write_is_one_line(
    cli: Any, settings: Settings, tmp_path: Path
) -> None:
    """Redis refuses writes from the first command on (a fresh database, so even pinning
    CAMPAIGN_SHARDS is refused): one line, exit 1, no traceback."""

    async def maxmemory(value: str) -> str:
        async with CampaignClient(settings=settings) as client:
            was = (await client.redis.config_get("maxmemory"))["maxmemory"]
            await client.redis.config_set("maxmemory", value)
            await client.redis.flushall()
            return str(was)

    was = asyncio.run(maxmemory("1"))
    try:
        code, _, err = cli("status", "c:x")
    finally:
        asyncio.run(maxmemory(was))
    assert code == 1
    assert err.startswith("campaign-worker: redis refused the command: OutOfMemoryError"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
