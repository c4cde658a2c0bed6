"""Sentry: a real worker reports failed steps to a local stand-in Sentry endpoint, with the
enrollment, campaign, node and trace id as tags; without SENTRY_DSN it never imports
sentry-sdk, and a DSN it cannot use stops it with exit 2 and one line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app import CampaignClient
from app.models import State
from app.settings import Settings
from tests.conftest import subprocess_env
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.stand_ins import HttpStandIn, Receiver
from tests.worker.test_processors import campaign, fast_retry, http, wait_state
from worker.embedded_redis import EmbeddedRedis

CLI = Path(sys.executable).parent / "campaign-worker"


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The items of a Sentry envelope: (item header, payload) pairs.

    An envelope is a header line, then per item a header line and a payload of
    ``length`` bytes (or up to the next newline when the header has no length)."""
    items = []
    _header, _, rest = body.partition(b"\n")
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        if not line.strip():
            continue
        item = json.loads(line)
        if "length" in item:
            payload, rest = rest[: item["length"]], rest[item["length"] :]
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item, payload))
    return items


class SentryStandIn(HttpStandIn):
    """Accepts envelope POSTs at ``/api/<project>/envelope/``, as Sentry's ingest does."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.auth: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/{project}/envelope/", self.envelope)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    async def envelope(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body[:2] == b"\x1f\x8b":  # gzip (aiohttp may have decompressed it already)
            body = gzip.decompress(body)
        self.auth.append(request.headers.get("X-Sentry-Auth", ""))
        for item, payload in parse_envelope(body):
            if item.get("type") == "event":
                self.events.append(json.loads(payload))
        return web.json_response({"id": "0" * 32})

    def for_enrollment(self, eid: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("tags", {}).get("enrollment_id") == eid]


@pytest.fixture
async def sentry() -> AsyncIterator[SentryStandIn]:
    s = SentryStandIn()
    await s.start()
    yield s
    await s.stop()


async def test_failed_steps_reach_sentry_with_their_tags(
    sentry: SentryStandIn, otlp: Receiver, svc: FakeService, redis_server: EmbeddedRedis,
    settings: Settings, redis: Any,
) -> None:  # fmt: skip
    worker = WorkerProcess(
        redis_server.url,
        SENTRY_DSN=sentry.dsn,
        **otlp.env(),
    ).start()
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(campaign("perm", {"first": http("/bad", svc)}))
            await client.register_campaign(campaign("tired", {
                "first": http("/ok", svc, "second"),
                "second": http("/flaky/9", svc, retry=fast_retry(2, 0.05)),
            }))  # fmt: skip
            perm = (await client.enroll("perm", "p1")).enrollment_id
            tired = (await client.enroll("tired", "t1")).enrollment_id
            perm_status = await wait_state(client, perm, State.FAILED)
            tired_status = await wait_state(client, tired, State.FAILED)
        await eventually(
            lambda: _now(sentry.for_enrollment(perm) and sentry.for_enrollment(tired)),
            15, what="both failures reported to Sentry",
        )  # fmt: skip
    finally:
        assert worker.stop() == 0

    [event] = sentry.for_enrollment(perm)  # one event per failure, not one per log line too
    tags = event["tags"]
    assert tags["campaign_id"] == "perm" and tags["node"] == "first"
    assert tags["step"] == "1" and tags["attempt"] == "1"
    assert tags["error_type"] == "PermanentError"
    assert perm_status.error is not None and perm_status.error.trace_id
    assert tags["trace_id"] == perm_status.error.trace_id  # the failed step's trace
    assert any(s["trace_id"] == tags["trace_id"] for s in otlp.spans)
    [exc] = event["exception"]["values"]
    assert exc["type"] == "PermanentError" and "HTTP 400" in exc["value"]
    assert exc["stacktrace"]["frames"], "the handled exception gives the event its stack"
    assert event["level"] == "error"
    assert event["fingerprint"] == ["campaign-enrollment-failed", "perm", "first", "PermanentError"]

    [exhausted] = sentry.for_enrollment(tired)  # a transient error out of attempts
    assert exhausted["tags"]["node"] == "second" and exhausted["tags"]["attempt"] == "2"
    assert exhausted["tags"]["error_type"] == "TransientError"
    assert tired_status.error is not None
    assert exhausted["tags"]["trace_id"] == tired_status.error.trace_id
    # the DSN's key is a credential: never in the logs
    assert sentry.auth and all("sentry_key=public" in a for a in sentry.auth)
    assert not any("public@" in line for line in worker.raw)
    assert "error tracking on" in worker.messages()


@pytest.fixture
def no_sentry_sdk(tmp_path: Path) -> tuple[Path, Path]:
    """A ``sentry_sdk`` that shadows the installed one: importing it leaves a marker file
    and fails as a missing module would. Returns (PYTHONPATH entry, marker)."""
    shadow = tmp_path / "shadow"
    marker = tmp_path / "sentry_imported"
    (shadow / "sentry_sdk").mkdir(parents=True)
    (shadow / "sentry_sdk" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "raise ModuleNotFoundError(\"No module named 'sentry_sdk'\", name='sentry_sdk')\n"
    )
    return shadow, marker


async def test_without_dsn_sentry_is_never_imported(
    no_sentry_sdk: tuple[Path, Path], private_redis: EmbeddedRedis
) -> None:
    shadow, marker = no_sentry_sdk
    # SENTRY_DSN empty: unset, even if the environment running the tests sets one
    worker = WorkerProcess(private_redis.url, PYTHONPATH=str(shadow), SENTRY_DSN="").start()
    try:
        await worker.wait_status("/readyz", 200)
    finally:
        assert worker.stop() == 0
    assert not marker.exists()
    assert "error tracking on" not in worker.messages()


def _run(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), "run"], env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=30)  # fmt: skip


def test_dsn_without_sentry_sdk_exits_2_naming_the_fix(no_sentry_sdk: tuple[Path, Path]) -> None:
    shadow, marker = no_sentry_sdk
    done = _run(SENTRY_DSN="https://secretkey@sentry.example.com/7", PYTHONPATH=str(shadow))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert marker.exists()  # it did try
    [line] = done.stderr.splitlines()
    assert line == (
        "campaign-worker: configuration error: SENTRY_DSN: is set but sentry-sdk is not "
        "installed; pip install 'campaign-scheduler[sentry]'"
    )
    assert "secretkey" not in done.stdout + done.stderr


def test_unusable_dsn_exits_2_without_echoing_it() -> None:
    done = _run(SENTRY_DSN="https://secretkey@/7")
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith("campaign-worker: configuration error: SENTRY_DSN: not a valid"), line
    assert "secretkey" not in done.stdout + done.stderr and "Traceback" not in done.stderr


async def _now(value: Any) -> Any:
    return value
