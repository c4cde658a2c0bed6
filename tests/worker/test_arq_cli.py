"""``arq worker.settings.WorkerSettings`` starts the same worker as ``campaign-worker run``:
steps run, /readyz answers, ping is served, and SIGTERM drains running steps, then exits 0."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from app import CampaignClient
from app.models import State
from app.settings import Settings
from tests.conftest import ROOT, subprocess_env
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.worker.test_error_tracking import SentryStandIn, sentry
from tests.worker.test_processors import campaign, http, wait_state
from worker.embedded_redis import EmbeddedRedis

__all__ = ["sentry"]  # the fixture, imported for pytest

ARQ = Path(sys.executable).parent / "arq"
TARGET = "worker.settings.WorkerSettings"


class ArqWorker(WorkerProcess):
    """``arq worker.settings.WorkerSettings`` as a real subprocess (same env and log reader)."""

    def start(self, *args: str) -> ArqWorker:
        self.proc = subprocess.Popen(
            [str(ARQ), TARGET, *args], env=self.env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self


async def test_arq_cli_runs_the_campaign_worker(
    redis_server: EmbeddedRedis, settings: Settings, redis: Any, svc: FakeService,
    sentry: SentryStandIn,
) -> None:  # fmt: skip
    worker = ArqWorker(
        redis_server.url, CAMPAIGN_SHUTDOWN_GRACE="10", SENTRY_DSN=sentry.dsn
    ).start()
    try:
        await worker.wait_status("/readyz", 200)
        code, body = await worker.get("/metrics")
        assert code == 200 and "campaign_redis_up 1.0" in body
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(campaign("viaarq", {"first": http("/ok", svc)}))
            done = (await client.enroll("viaarq", "a1")).enrollment_id
            await wait_state(client, done, State.COMPLETED)
            # a failed step reaches Sentry here too
            await client.register_campaign(campaign("broken", {"first": http("/bad", svc)}))
            bad = (await client.enroll("broken", "b1")).enrollment_id
            await wait_state(client, bad, State.FAILED)
            await eventually(lambda: _now(sentry.for_enrollment(bad)), what="the Sentry event")
            # ping, one of arq's own jobs, is served too
            assert await client.redis.enqueue_job(
                "ping", "t", 0.0, _job_id=settings.arq_job_id("ping:viaarq")
            )
            await eventually(lambda: client.redis.get(settings.arq_job_id("pong:t")),
                             what="ping answered")  # fmt: skip
            # a step still running at SIGTERM is drained: it finishes, then the process exits
            await client.register_campaign(campaign("slow", {"first": http("/hang", svc)}))
            slow = (await client.enroll("slow", "s1")).enrollment_id
            await eventually(lambda: _now(svc.hung.is_set()), what="the step to be running")
            worker.signal()
            await worker.wait_status("/readyz", 503)  # draining: no more traffic
            await eventually(lambda: _now("draining" in worker.messages()), what="the drain")
            svc.release.set()
            code = await _exit_code(worker)
            await wait_state(client, slow, State.COMPLETED, timeout=5)
    finally:
        worker.kill()
    assert code == 0, worker.raw[-10:]
    messages = worker.messages()
    assert "worker started" in messages and "worker stopped" in messages
    started = next(d for d in worker.lines if d.get("msg") == "worker started")
    assert {"run_step", "fire_timeout", "ping"} <= set(started["functions"])
    assert any("reconcile" in f for f in started["functions"])


def test_arq_cli_bad_setting_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [str(ARQ), TARGET], env=subprocess_env(CAMPAIGN_JOB_TIMEOUT="inf"), cwd=ROOT,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith("campaign-worker: configuration error: CAMPAIGN_JOB_TIMEOUT: "), line


async def test_arq_cli_another_shard_count_exits_2(redis_server: EmbeddedRedis, redis: Any) -> None:
    await redis.set("campaign:shards", 4)
    worker = ArqWorker(redis_server.url).start()
    try:
        code = await _exit_code(worker, 20)
    finally:
        worker.kill()
    errors = [line for line in worker.raw if "CAMPAIGN_SHARDS" in line]
    assert code == 2 and len(errors) == 1 and "holds 4 shard(s)" in errors[0], worker.raw[-5:]
    assert not any("Traceback" in line for line in worker.raw)


async def _exit_code(worker: WorkerProcess, timeout: float = 15.0) -> int:
    async def exited() -> int | None:
        assert worker.proc is not None
        code = worker.proc.poll()
        return None if code is None else code + 1  # +1: an exit code of 0 is falsy

    return await eventually(exited, timeout, 0.05, "the worker to exit") - 1


async def _now(value: Any) -> Any:
    return value
