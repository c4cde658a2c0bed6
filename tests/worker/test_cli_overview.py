"""``campaign-worker info``, ``list``, ``--redis-url`` and ``--version``, in-process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import app
from app import CampaignClient
from app.keys import Keys
from app.settings import Settings
from tests.queue_view import claim_due

WAIT = {"id": "simple", "entry": "w", "nodes": {
    "w": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "done"},
    "done": {"type": "exit"}}}  # fmt: skip
ACTION = {"id": "act", "entry": "a", "nodes": {
    "a": {"type": "action", "action": "log", "next": None}}}  # fmt: skip
#: Nothing listens there: a command that used it would say "redis unreachable".
UNREACHABLE = "redis://127.0.0.1:1/0"


def populate(settings: Settings) -> None:
    """``simple``: 250 waiting at w, 3 cancelled; ``act``: 40 enrolled, 10 of them claimed
    (running), 30 due; a live worker heartbeat and a dead letter."""

    async def go() -> None:
        async with CampaignClient(settings=settings) as c:
            await c.register_campaign(WAIT)
            await c.register_campaign(ACTION)
            await c.enroll_many("simple", [{"contact_id": f"c{i:03}"} for i in range(253)])
            for i in range(3):
                assert await c.cancel(f"simple:c{i:03}")
            await c.enroll_many("act", [{"contact_id": f"x{i}"} for i in range(40)])
            assert len((await claim_due(c.service, limit=10)).claims) == 10
            keys = Keys(settings.key_prefix, settings.shards)
            await c.redis.zadd(keys.workers, {"worker-1": time.time()})
            await c.redis.lpush(keys.shard(0).dead, b'{"job_id": "j", "reason": "x"}')  # type: ignore[misc]

    asyncio.run(go())


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_info_prints_the_queue_workers_and_campaigns(cli: Any, settings: Settings) -> None:
    populate(settings)
    code, out, err = cli("info")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["shard", "due", "deferred", "running", "dead", "letters"]
    assert lines[1].split() == ["{0}", "30", "250", "10", "1"]
    assert "workers alive: 1 " in out
    assert "maintenance jobs queued: 0" in out
    header = next(i for i, line in enumerate(lines) if line.startswith("campaign "))
    assert lines[header].split() == ["campaign", "scheduled", "running", "waiting", "completed",
                                     "failed", "cancelled", "total"]  # fmt: skip
    assert lines[header + 1].split() == ["act", "30", "10", "0", "0", "0", "0", "40"]
    assert lines[header + 2].split() == ["simple", "0", "0", "250", "0", "0", "3", "253"]


def test_info_on_an_empty_redis(cli: Any) -> None:
    code, out, _ = cli("info")
    assert code == 0 and "no campaigns registered" in out and "workers alive: 0" in out


def test_list_pages_through_a_campaign(cli: Any, settings: Settings) -> None:
    populate(settings)
    seen: list[list[str]] = []
    args = ["list", "simple", "--limit", "60"]
    pages = 0
    while True:
        code, out, err = cli(*args)
        assert code == 0
        pages += 1
        rows = [line.split("\t") for line in out.splitlines()]
        assert len(rows) <= 60
        seen.extend(rows)
        if not err:
            break
        line = one_line(err)
        assert line.startswith("next: ")
        args = ["list", "simple", "--limit", "60", "--cursor", line.removeprefix("next: ")]
        assert pages < 20
    assert pages >= 5
    assert sorted(r[0] for r in seen) == [f"simple:c{i:03}" for i in range(253)]
    assert all(len(r) == 3 for r in seen)
    states = {r[0]: (r[1], r[2]) for r in seen}
    assert states["simple:c000"] == ("cancelled", "w") and states["simple:c100"] == ("waiting", "w")


def test_list_filters_and_default_limit(cli: Any, settings: Settings) -> None:
    populate(settings)
    code, out, err = cli("list", "simple")  # default limit 100
    assert code == 0 and len(out.splitlines()) == 100 and err.startswith("next: ")
    code, out, err = cli("list", "simple", "--state", "cancelled")
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == [f"simple:c00{i}\tcancelled\tw" for i in range(3)]
    code, out, err = cli("list", "act", "--state", "running", "--node", "a", "--limit", "1000")
    assert (code, err) == (0, "") and len(out.splitlines()) == 10
    assert all(line.endswith("\trunning\ta") for line in out.splitlines())
    assert cli("list", "act", "--node", "elsewhere") == (0, "", "")


def test_list_user_errors_are_one_line_exit_1(cli: Any, settings: Settings) -> None:
    populate(settings)
    code, _, err = cli("list", "simple", "--state", "sleeping")
    assert code == 1 and one_line(err).startswith("campaign-worker: state: must be one of")
    for limit in ("0", "1001"):
        code, _, err = cli("list", "simple", "--limit", limit)
        assert code == 1 and "limit: must be an integer from 1 to 1000" in one_line(err)
    code, _, err = cli("list", "simple", "--cursor", "not-a-cursor")
    assert code == 1 and one_line(err).startswith("campaign-worker: cursor: ")
    code, _, err = cli("list", "nope")
    assert code == 1 and "no campaign named 'nope'" in one_line(err)


def test_redis_url_overrides_the_environment(
    cli: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(settings)
    url = settings.redis_url.get_secret_value()
    monkeypatch.setenv("REDIS_URL", UNREACHABLE)
    code, _, err = cli("info")
    assert code == 1 and "redis unreachable" in err
    for argv in (("info", "--redis-url", url), ("--redis-url", url, "info")):
        code, out, err = cli(*argv)
        assert (code, err) == (0, "") and "simple" in out, argv
    code, out, _ = cli("list", "simple", "--state", "cancelled", "--redis-url", url)
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = cli("status", "simple:c010", "--redis-url", url)
    assert code == 0 and out.startswith("simple:c010: waiting")
    code, _, err = cli("info", "--redis-url", "http://example.com")
    assert code == 2
    assert one_line(err) == (
        "campaign-worker: configuration error: --redis-url: must be a redis://, rediss://, "
        "unix://, redis+sentinel:// or rediss+sentinel:// URL"
    )


def test_every_subcommand_takes_redis_url(cli: Any) -> None:
    from worker.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices is not None
    for name, command in sub.choices.items():
        assert any("--redis-url" in a.option_strings for a in command._actions), name


def test_version(cli: Any) -> None:
    code, out, err = cli("--version")
    assert (code, out, err) == (0, f"campaign-worker {app.__version__}\n", "")


def test_a_shard_count_other_than_the_recorded_one_exits_2(
    cli: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(settings)

    async def record() -> None:
        async with CampaignClient(settings=settings) as c:
            await c.redis.set(Keys(settings.key_prefix).shard_count, 1)

    asyncio.run(record())
    monkeypatch.setenv("CAMPAIGN_SHARDS", "4")
    for argv in (("info",), ("list", "simple")):
        code, _, err = cli(*argv)
        assert code == 2 and "CAMPAIGN_SHARDS: this Redis holds 1 shard(s)" in one_line(err)
