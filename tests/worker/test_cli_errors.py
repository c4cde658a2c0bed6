"""Issue 10: the admin CLI on bad input and corrupt records: one line, exit 1, never a
traceback, never "redis unreachable" for what is not Redis; ``| head`` ends it quietly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import CampaignClient
from app.settings import Settings
from tests.conftest import subprocess_env
from tests.worker.test_cli import SIMPLE

EXE = str(Path(sys.executable).parent / "campaign-worker")


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "redis unreachable" not in err, err
    return lines[0]


def register(cli: Any, tmp_path: Path, definition: dict[str, Any] = SIMPLE) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(definition))
    assert cli("register", str(path))[0] == 0


def test_enroll_file_that_is_not_utf8_names_the_byte(cli: Any, tmp_path: Path) -> None:
    register(cli, tmp_path)
    contacts = tmp_path / "contacts.jsonl"
    good = b'{"contact_id": "a"}\n{"contact_id": "b"}\n'
    contacts.write_bytes(good + b'{"contact_id": "caf\xe9"}\n')
    code, out, err = cli("enroll-file", "simple", str(contacts))
    assert code == 1 and out == ""
    line = one_line(err)
    assert line == (
        f"campaign-worker: {contacts}:3: not UTF-8 at byte {len(good) + 19}; 0 contacts "
        "enrolled from the lines before line 1, none from there on"
    )


def test_enroll_file_bad_line_after_a_batch_says_how_far(cli: Any, tmp_path: Path) -> None:
    register(cli, tmp_path)
    contacts = tmp_path / "contacts.jsonl"
    rows = [json.dumps({"contact_id": f"c{i}"}) for i in range(250)]
    rows[120] = json.dumps({"contact_id": "has space"})
    contacts.write_text("\n".join(rows))
    code, out, err = cli("enroll-file", "simple", str(contacts), "--batch", "100")
    assert code == 1 and "100 read, 100 enrolled" in out
    line = one_line(err)
    assert line.startswith(f"campaign-worker: {contacts}:121: contact_id 'has space' contains")
    assert line.endswith("100 contacts enrolled from the lines before line 101, none from there on")
    rows[200] = "[1, 2]"
    rows[120] = json.dumps({"contact_id": "c120"})
    contacts.write_text("\n".join(rows))
    code, out, err = cli("enroll-file", "simple", str(contacts), "--batch", "100")
    assert code == 1
    assert one_line(err) == (
        f"campaign-worker: {contacts}:201: expected an object with a contact_id; 100 contacts "
        "enrolled from the lines before line 201, none from there on"
    )


def test_a_huge_time_zone_is_not_called_redis_unreachable(cli: Any, tmp_path: Path) -> None:
    register(cli, tmp_path)
    code, _, err = cli("enroll", "simple", "bob", "--timezone", "x" * 10_000)
    assert code == 1
    assert one_line(err).startswith(
        "campaign-worker: timezone: unknown time zone (10000 characters"
    )


def test_bad_json_arguments_and_files(cli: Any, tmp_path: Path) -> None:
    register(cli, tmp_path)
    code, _, err = cli("enroll", "simple", "bob", "--attributes", '{"n": ' + "9" * 5000 + "}")
    assert code == 1 and "--attributes: not valid JSON" in one_line(err)
    code, _, err = cli("enroll", "simple", "bob", "--attributes", '{"n": 1e400}')
    assert code == 1 and "attributes.n: inf is not a JSON number" in one_line(err)
    code, _, err = cli("enroll", "simple", "bob", "--attributes", "[" * 100_000)
    assert code == 1 and "--attributes: not valid JSON" in one_line(err)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = cli("register", str(deep))
    assert code == 1 and "nested too deeply" in one_line(err)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"id": "caf\xe9"}')
    code, _, err = cli("register", str(latin))
    assert code == 1 and one_line(err) == f"campaign-worker: {latin}: not UTF-8 at byte 11"
    code, _, err = cli("signal", "simple:bob", "replied", "--payload", '{"n": ' + str(2**70) + "}")
    assert code == 1 and "payload.n: integer with 22 digits" in one_line(err)


def test_corrupt_records_are_one_line(cli: Any, tmp_path: Path, settings: Settings) -> None:
    register(cli, tmp_path)
    assert cli("enroll", "simple", "bob")[0] == 0
    assert cli("enroll", "simple", "eve")[0] == 0

    async def corrupt() -> None:
        async with CampaignClient(settings=settings) as c:
            await c.redis.hset(c.service.keys.enrollment("simple:bob"), "step", "x")
            await c.redis.hset(c.service.keys.enrollment("simple:eve"), "error", "{oops")

    asyncio.run(corrupt())
    for argv in (("status", "simple:bob"), ("cancel", "simple:bob"), ("status", "simple:eve")):
        code, _, err = cli(*argv)
        assert code == 1
        assert one_line(err).startswith(f"campaign-worker: enrollment '{argv[1]}': stored field")
    code, _, _ = cli("failures")
    assert code == 0


def _run_into_a_closed_pipe(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stdout a pipe whose reader has already gone away."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [EXE, *argv], env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


def test_a_closed_stdout_pipe_exits_quietly(cli: Any, tmp_path: Path, settings: Settings) -> None:
    register(cli, tmp_path)
    assert cli("enroll", "simple", "bob")[0] == 0
    env = subprocess_env(REDIS_URL=settings.redis_url.get_secret_value())
    for argv in (["status", "simple:bob"], ["status", "simple:bob", "--json"],
                 ["failures"], ["dead-letters"]):  # fmt: skip
        code, err = _run_into_a_closed_pipe(argv, env)
        assert (code, err) == (141, ""), (argv, err)


def test_piped_into_head_prints_no_error(
    cli: Any, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(cli, tmp_path)
    # a status long enough to outgrow the pipe buffer, so the writer meets the closed pipe
    monkeypatch.setenv("CAMPAIGN_MAX_ATTRIBUTES_BYTES", "2000000")
    big = json.dumps({f"k{i}": "v" * 1000 for i in range(900)})
    assert cli("enroll", "simple", "bob", "--attributes", big)[0] == 0
    env = subprocess_env(
        REDIS_URL=settings.redis_url.get_secret_value(), CAMPAIGN_MAX_ATTRIBUTES_BYTES="2000000"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{EXE} status simple:bob --json | head -1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout == "{\n"
    assert proc.stderr == ""
    assert proc.returncode in (0, 141)  # 141 when it met the closed pipe, as SIGPIPE would
