"""``campaign-worker run`` as a real subprocess: probes, Redis outages, SIGTERM, bad settings."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

from app.connection import create_redis
from app.settings import Settings
from tests.conftest import subprocess_env
from tests.helpers import WorkerProcess, eventually
from worker.embedded_redis import EmbeddedRedis, free_port


async def _ping(server_url: str, seconds: float = 0.0) -> tuple[Any, str]:
    settings = Settings(redis_url=server_url)  # type: ignore[arg-type]
    client = create_redis(settings)
    token = uuid.uuid4().hex
    await client.enqueue_job("ping", token, seconds, _job_id=settings.arq_job_id(f"ping:{token}"))
    return client, settings.arq_job_id(f"pong:{token}")


async def _answered(server_url: str, seconds: float = 0.0, timeout: float = 15.0) -> dict[str, Any]:
    client, key = await _ping(server_url, seconds)
    try:
        raw = await eventually(lambda: client.get(key), timeout, what="ping answered")
        return dict(orjson.loads(raw))
    finally:
        await client.aclose()


async def test_probes_and_metrics_answer(private_redis: EmbeddedRedis) -> None:
    worker = WorkerProcess(private_redis.url).start()
    try:
        await worker.wait_status("/readyz", 200)
        assert (await worker.get("/livez"))[0] == 200
        code, body = await worker.get("/metrics")
        assert code == 200 and "campaign_redis_up 1.0" in body
        await _answered(private_redis.url)
    finally:
        assert worker.stop() == 0


async def test_readyz_follows_redis_and_work_resumes(private_redis: EmbeddedRedis) -> None:
    worker = WorkerProcess(private_redis.url, CAMPAIGN_REDIS_BACKOFF_MAX="0.5").start()
    try:
        await worker.wait_status("/readyz", 200)
        private_redis.stop()
        body = await worker.wait_status("/readyz", 503)
        assert "redis" in body["reason"]
        assert (await worker.get("/livez"))[0] == 200  # liveness never depends on Redis
        private_redis.start()
        await worker.wait_status("/readyz", 200)
        await _answered(private_redis.url)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        assert worker.stop() == 0
    assert "redis is back, resuming the step loop" in worker.messages()


async def test_starts_while_redis_is_down(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "late", port=free_port())
    worker = WorkerProcess(server.url, CAMPAIGN_REDIS_BACKOFF_MAX="0.3").start()
    try:
        body = await worker.wait_status("/readyz", 503)
        assert "redis unreachable" in body["reason"]
        await eventually(
            lambda: _true(any("waiting for redis" in str(d.get("msg")) for d in worker.lines)),
            what="a logged connection attempt",
        )
        server.start()
        await worker.wait_status("/readyz", 200)
        await _answered(server.url)
    finally:
        assert worker.stop() == 0
        server.close()
    attempts = [d for d in worker.lines if "waiting for redis" in str(d.get("msg"))]
    assert attempts and all("attempt" in d for d in attempts)
    assert all("password" not in str(d) for d in worker.lines)


async def test_sigterm_lets_the_running_job_finish(private_redis: EmbeddedRedis) -> None:
    worker = WorkerProcess(private_redis.url, CAMPAIGN_SHUTDOWN_GRACE="10").start()
    await worker.wait_status("/readyz", 200)
    client, key = await _ping(private_redis.url, seconds=1.5)
    try:
        await eventually(
            lambda: _true(_started(worker)),
            what="the ping job to start",
        )
        worker.signal()
        assert worker.wait(20) == 0
        assert await client.get(key) is not None  # it finished, not cancelled
    finally:
        worker.kill()
        await client.aclose()
    assert "draining" in worker.messages()


def test_bad_settings_exit_2_with_one_line() -> None:
    exe = Path(sys.executable).parent / "campaign-worker"
    for env, name in (
        ({"REDIS_URL": "notaurl"}, "REDIS_URL"),
        ({"CAMPAIGN_MAX_JOBS": "-1"}, "CAMPAIGN_MAX_JOBS"),
        ({"CAMPAIGN_POLL_DELAY": "soon"}, "CAMPAIGN_POLL_DELAY"),
    ):
        done = subprocess.run(
            [str(exe), "run"], env=subprocess_env(**env), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], lines
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_secret_in_bad_redis_url_is_not_echoed() -> None:
    exe = Path(sys.executable).parent / "campaign-worker"
    done = subprocess.run(
        [str(exe), "run"],
        env=subprocess_env(REDIS_URL="redis://user:hunter2@host:notaport/0"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "hunter2" not in done.stderr and "REDIS_URL" in done.stderr


def _started(worker: WorkerProcess) -> bool:
    return any(d.get("msg") == "job started" and d.get("function") == "ping" for d in worker.lines)


async def _true(value: bool) -> bool:
    return value


async def test_read_only_failover_pauses_then_resumes(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    primary = EmbeddedRedis(data_dir=tmp_path / "primary")
    primary.start()
    worker = WorkerProcess(private_redis.url, CAMPAIGN_REDIS_BACKOFF_MAX="0.3").start()
    client = create_redis(Settings(redis_url=private_redis.url))  # type: ignore[arg-type]
    try:
        await worker.wait_status("/readyz", 200)
        await client.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        body = await worker.wait_status("/readyz", 503)
        assert "ReadOnlyError" in body["reason"]
        await client.execute_command("REPLICAOF", "NO", "ONE")
        await worker.wait_status("/readyz", 200)
        await _answered(private_redis.url)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        await client.aclose()
        assert worker.stop() == 0
        primary.close()
