"""The admin CLI, run in-process against the private Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson

from app import CampaignClient
from app.jobs import JobTarget
from app.settings import Settings
from tests.conftest import ROOT
from tests.queue_view import claim_one

SIMPLE = {"id": "simple", "entry": "w",
          "nodes": {"w": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "done"},
                    "done": {"type": "exit"}}}  # fmt: skip


def test_register_enroll_status_signal_cancel(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(SIMPLE))
    assert cli("register", str(path))[:2] == (0, "registered campaign 'simple' version 1\n")
    code, out, _ = cli(
        "enroll", "simple", "bob", "--attributes", '{"tier": "gold"}', "--timezone", "Europe/Paris"
    )
    assert code == 0 and out.startswith("simple:bob: waiting node=w step=1")
    code, out, _ = cli("status", "simple:bob")
    assert code == 0 and "history:" in out and "-> waiting" in out
    code, out, _ = cli("status", "simple:bob", "--json")
    assert json.loads(out)["attributes"] == {"tier": "gold"}
    assert cli("signal", "simple:bob", "other")[0] == 1
    assert cli("cancel", "simple:bob", "--reason", "test")[:2] == (0, "cancelled\n")
    assert cli("cancel", "simple:bob")[0] == 1
    code, _, err = cli("status", "simple:nobody")
    assert code == 1 and "no enrollment 'simple:nobody'" in err


def test_user_mistakes_get_one_line_not_a_traceback(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SIMPLE, "entry": "nope"}))
    code, _, err = cli("register", str(bad))
    assert code == 1 and "entry: no node named 'nope'" in err and "Traceback" not in err
    code, _, err = cli("register", str(tmp_path / "missing.json"))
    assert code == 1 and "no such file" in err
    code, _, err = cli("enroll", "nope", "bob")
    assert code == 1 and "no campaign named 'nope'" in err
    code, _, err = cli("enroll", "simple", "bob", "--attributes", "[1]")
    assert code == 1 and "--attributes: must be a JSON object" in err


def test_enroll_file_shows_progress(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(SIMPLE))
    cli("register", str(path))
    contacts = tmp_path / "contacts.jsonl"
    contacts.write_text("\n".join(json.dumps({"contact_id": f"c{i}"}) for i in range(2500)))
    code, out, _ = cli("enroll-file", "simple", str(contacts), "--batch", "1000")
    assert code == 0
    assert out.count("read,") == 3 and "enrolled 2500 of 2500 contacts" in out
    code, out, _ = cli("enroll-file", "simple", str(contacts))
    assert "enrolled 0 of 2500 contacts (2500 already enrolled)" in out


def test_failures_grouped_and_replayed_by_group(cli: Any, settings: Settings) -> None:
    async def make_failures() -> None:
        async with CampaignClient(settings=settings) as c:
            await c.register_campaign({"id": "f", "entry": "a", "nodes": {
                "a": {"type": "action", "action": "log", "next": "done"}, "done": {"type": "exit"}}})  # fmt: skip
            for i in range(5):
                st = await c.enroll("f", f"p{i}")
                claim = await claim_one(c.service, st.enrollment_id)
                etype = "Boom" if i < 3 else "Other"
                await c.service.fail(JobTarget(st.enrollment_id, "f", 1, None), job_id=claim.job_id,
                                     node="a", step=st.step,
                                     attempt=1, error={"type": etype, "message": f"broke {i}", "trace_id": "ab" * 16})  # fmt: skip

    asyncio.run(make_failures())
    code, out, _ = cli("failures")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["3", "f:a:Boom"] and "broke" in lines[1]
    assert any(line.split()[:2] == ["2", "f:a:Other"] for line in lines)
    code, out, _ = cli("replay", "--group", "f:a:Boom")
    assert code == 0 and "replayed 3 of 3" in out
    code, out, _ = cli("failures")
    assert "f:a:Boom" not in out and "f:a:Other" in out
    assert cli("replay", "--group", "nonsense")[0] == 1


def test_dead_letters_listed(cli: Any, settings: Settings) -> None:
    async def poison() -> None:
        async with CampaignClient(settings=settings) as c:
            entry = {
                "job_id": "evil",
                "reason": "unable to deserialize job",
                "at": 0,
                "payload": "\\x80",
            }
            await c.redis.lpush(c.service.keys.shard(0).dead, orjson.dumps(entry))
            await c.redis.lpush(c.service.keys.shard(0).dead, b"\xff not json")

    assert cli("dead-letters")[1] == "no dead letters\n"
    asyncio.run(poison())
    code, out, _ = cli("dead-letters")
    assert code == 0 and "evil" in out and "2 of 2 shown" in out and "unreadable entry" in out


def test_demo_campaign_file_is_valid(cli: Any) -> None:
    code, out, _ = cli("register", str(ROOT / "examples" / "demo.json"))
    assert code == 0 and "demo-onboarding" in out
