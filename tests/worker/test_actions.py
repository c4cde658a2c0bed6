"""Action handlers: the http handler's contract, backoff, and user handlers by import path."""

from __future__ import annotations

import hashlib
import hmac
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app import CampaignClient
from app.campaigns import RetryPolicy
from app.models import State
from app.settings import Settings
from tests.conftest import ROOT, subprocess_env
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess
from tests.worker.test_processors import wait_state
from worker.actions import (
    ATTEMPT_HEADER,
    SIGNATURE_HEADER,
    ActionContext,
    EgressPolicy,
    PermanentError,
    TransientError,
    default_registry,
    http_action,
    http_session,
)
from worker.embedded_redis import EmbeddedRedis, free_port
from worker.retries import backoff_delay


def ctx_for(url: str, session: aiohttp.ClientSession, **kw: Any) -> ActionContext:
    base: dict[str, Any] = {
        "enrollment_id": "c:1", "campaign_id": "c", "contact_id": "1", "node": "n", "step": 3,
        "attempt": 1, "params": {"url": url, "template": "t"}, "attributes": {"a": 1},
        "idempotency_key": "c:1:3", "timeout": 2.0, "http": session,
    }  # fmt: skip
    base.update(kw)
    return ActionContext(**base)


async def test_http_action_posts_json_with_key_and_signature(svc: FakeService) -> None:
    async with http_session(EgressPolicy()) as session:
        outcome = await http_action(ctx_for(svc.url("/outcome/bounced"), session, secret=b"s3cret"))
    assert outcome == "bounced"
    call = svc.calls[0]
    assert call.key == "c:1:3" and call.headers[ATTEMPT_HEADER] == "1"
    assert call.body["params"] == {"template": "t"} and call.body["attributes"] == {"a": 1}
    assert "attempt" not in call.body
    t, _, v1 = call.headers[SIGNATURE_HEADER].partition(",")
    assert t.startswith("t=") and v1.startswith("v1=")
    expected = hmac.new(b"s3cret", t[2:].encode() + b"." + call.raw, hashlib.sha256).hexdigest()
    assert v1[3:] == expected


async def test_http_action_classifies_failures(svc: FakeService) -> None:
    async with http_session(EgressPolicy()) as session:
        with pytest.raises(TransientError, match="HTTP 503"):
            await http_action(ctx_for(svc.url("/flaky/1"), session))
        with pytest.raises(TransientError) as rate:
            await http_action(ctx_for(svc.url("/ratelimit/7"), session))
        assert rate.value.retry_after == 7
        with pytest.raises(PermanentError, match="HTTP 400"):
            await http_action(ctx_for(svc.url("/bad"), session))
        with pytest.raises(TransientError, match="failed"):
            await http_action(ctx_for(f"http://127.0.0.1:{free_port()}/x", session))
        with pytest.raises(TransientError, match="timed out"):
            await http_action(ctx_for(svc.url("/hang"), session, timeout=0.2))
        with pytest.raises(PermanentError, match=r"params\.url"):
            await http_action(ctx_for("ftp://nope", session))
    assert all(SIGNATURE_HEADER not in c.headers for c in svc.calls)


def test_backoff_exponential_fixed_capped_jittered() -> None:
    exp = RetryPolicy(backoff="exponential", base_delay=timedelta(seconds=10),
                      max_delay=timedelta(seconds=60), jitter=False)  # fmt: skip
    assert [backoff_delay(exp, a).total_seconds() for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    fixed = exp.model_copy(update={"backoff": "fixed"})
    assert backoff_delay(fixed, 4).total_seconds() == 10
    jit = exp.model_copy(update={"jitter": True})
    rng = random.Random(1)
    samples = [backoff_delay(jit, 3, rng=rng).total_seconds() for _ in range(500)]
    assert 0 <= min(samples) < 5 and 35 < max(samples) <= 40
    assert backoff_delay(exp, 1, retry_after=120).total_seconds() == 60  # a floor, up to max_delay


async def test_user_handlers_from_import_path(
    redis_server: EmbeddedRedis, settings: Settings, redis: Any
) -> None:
    worker = WorkerProcess(
        redis_server.url, CAMPAIGN_ACTIONS="tests.user_actions", PYTHONPATH=str(ROOT)
    ).start()
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign({
                "id": "sms", "entry": "text",
                "nodes": {"text": {"type": "action", "action": "sms", "outcomes": {"vip": "vip"},
                                   "next": "done"},
                          "vip": {"type": "action", "action": "log", "next": "done"},
                          "done": {"type": "exit"}},
            })  # fmt: skip
            plain = await client.enroll("sms", "a")
            vip = await client.enroll("sms", "b", attributes={"vip": True})
            assert [
                h.node
                for h in (await wait_state(client, plain.enrollment_id, State.COMPLETED)).history
            ][-1] == "done"
            nodes = [
                h.node
                for h in (await wait_state(client, vip.enrollment_id, State.COMPLETED)).history
            ]
            assert "vip" in nodes
    finally:
        assert worker.stop() == 0


def test_bad_actions_setting_exits_2() -> None:
    exe = Path(sys.executable).parent / "campaign-worker"
    done = subprocess.run([str(exe), "run"], env=subprocess_env(CAMPAIGN_ACTIONS="no_such_module_xyz"),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "CAMPAIGN_ACTIONS" in done.stderr


def test_registry_rejects_sync_handlers() -> None:
    registry = default_registry()
    assert registry.names() == ["http", "log"]
    with pytest.raises(TypeError, match="async"):
        registry.register("bad", lambda ctx: None)  # type: ignore[arg-type]


def test_demo_runs_to_completion() -> None:
    exe = Path(sys.executable).parent / "campaign-worker"
    done = subprocess.run([str(exe), "demo", "--contacts", "80"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed                    0" in done.stdout
    assert "result: OK" in done.stdout


async def test_urls_in_errors_carry_no_credentials_or_query() -> None:
    async with http_session(EgressPolicy()) as session:
        url = f"http://bob:hunter2@127.0.0.1:{free_port()}/hook?api_key=SECRET123"
        with pytest.raises(TransientError) as err:
            await http_action(ctx_for(url, session))
    assert "hunter2" not in str(err.value) and "SECRET123" not in str(err.value)
    assert "/hook" in str(err.value)


async def test_an_invalid_url_is_permanent_and_not_echoed() -> None:
    async with http_session(EgressPolicy()) as session:
        with pytest.raises(PermanentError) as err:
            await http_action(ctx_for("http://user:s3cret@:8080/hook?token=abc", session))
    assert "s3cret" not in str(err.value) and "token" not in str(err.value)
