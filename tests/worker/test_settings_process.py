"""Bad settings stop a real ``campaign-worker`` with exit 2 and one line, never a traceback.

Also: the HTTP server's bind failures, the ``OTEL_*`` numbers checked before the SDK reads
them, a worker on a ``unix://`` Redis URL, and passwords never printed.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from app.settings import ConfigError
from tests.conftest import start_redis, subprocess_env
from tests.helpers import WorkerProcess
from worker.embedded_redis import EmbeddedRedis, free_port
from worker.health import Health
from worker.http_server import HealthServer, bind_error, build_app
from worker.telemetry import check_otel_env

CLI = Path(sys.executable).parent / "campaign-worker"
PREFIX = "campaign-worker: configuration error: "


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *(args or ("run",))], env=subprocess_env(**env), capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip


def _assert_one_line(done: subprocess.CompletedProcess[str], variable: str) -> str:
    """Exit 2, and stderr is exactly one line naming ``variable``; returns that line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{PREFIX}{variable}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("CAMPAIGN_JOB_TIMEOUT", "inf"),
        ("CAMPAIGN_JOB_TIMEOUT", "1e300"),
        ("CAMPAIGN_JOB_TIMEOUT", "nan"),
        ("CAMPAIGN_KEEP_RESULT", "inf"),
        ("CAMPAIGN_JOB_EXPIRY_EXTRA", "inf"),
        ("CAMPAIGN_JOB_EXPIRY_EXTRA", "1e300"),
        ("CAMPAIGN_HISTORY_LIMIT", "100000000000000000000"),
        ("CAMPAIGN_LEASE", "inf"),
        ("CAMPAIGN_RECONCILE_EVERY", "7"),
        ("CAMPAIGN_SHARDS", "100000"),
        ("CAMPAIGN_HTTP_HOST", "not a host"),
        ("CAMPAIGN_KEY_PREFIX", "{x}"),
    ],
)
def test_bad_numbers_exit_2_with_one_line(env: str, value: str) -> None:
    line = _assert_one_line(_run(**{env: value}), env)
    assert repr(value) in line


def test_an_empty_http_action_secret_exits_2() -> None:
    line = _assert_one_line(_run(CAMPAIGN_HTTP_ACTION_SECRET=""), "CAMPAIGN_HTTP_ACTION_SECRET")
    assert "empty" in line


def test_redis_url_password_is_never_printed_on_a_settings_error() -> None:
    for url in (
        "redis://127.0.0.1:notaport/0?password=hunter2",
        "redis://:hunter2@127.0.0.1:6379/0?db=nope",
        "unix://:hunter2@/tmp/r.sock?socket_keepalive=1",
    ):
        done = _run(REDIS_URL=url)
        _assert_one_line(done, "REDIS_URL")
        assert "hunter2" not in done.stderr + done.stdout


def test_redis_url_password_is_never_printed_while_redis_is_down() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?db=0&password=hunter2"
    # An admin command: one line naming the redacted URL.
    done = _run("status", "c:x", REDIS_URL=url)
    assert done.returncode == 1 and "hunter2" not in done.stderr + done.stdout
    assert f"redis unreachable at {url.replace('hunter2', '***')}" in done.stderr
    # The worker: its "waiting for redis" log lines.
    worker = WorkerProcess(url, CAMPAIGN_REDIS_BACKOFF_MAX="0.3").start()
    try:
        with_url = [d for d in worker_lines(worker) if "waiting for redis" in str(d.get("msg"))]
        assert with_url and all("password=***" in str(d["msg"]) for d in with_url)
    finally:
        assert worker.stop() == 0
    assert worker.raw and not any("hunter2" in line for line in worker.raw)


def worker_lines(worker: WorkerProcess, timeout: float = 15) -> list[dict[str, object]]:
    """Wait for two "waiting for redis" log lines, then return every line so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum("waiting for redis" in m for m in worker.messages()) >= 2:
            break
        time.sleep(0.05)
    return list(worker.lines)


# --- the HTTP server: a bad host or a port in use ----------------------------------------


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_exits_2_with_one_line(held_port: int) -> None:
    done = _run(
        CAMPAIGN_HTTP_HOST="127.0.0.1", CAMPAIGN_HTTP_PORT=str(held_port),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", CAMPAIGN_LOG_FORMAT="json",
    )  # fmt: skip
    line = _assert_one_line(done, "CAMPAIGN_HTTP_PORT")
    assert f"cannot listen on 127.0.0.1:{held_port}: address already in use" in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never local
        ("no-such-host.invalid", "cannot resolve it"),
    ],
)
def test_bad_http_host_exits_2_with_one_line(host: str, fragment: str) -> None:
    done = _run(
        CAMPAIGN_HTTP_HOST=host, CAMPAIGN_HTTP_PORT=str(free_port()),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", CAMPAIGN_LOG_FORMAT="json",
    )  # fmt: skip
    line = _assert_one_line(done, "CAMPAIGN_HTTP_HOST")
    assert f"cannot listen on {host}:" in line and fragment in line


async def test_health_server_start_raises_config_error(held_port: int) -> None:
    app = build_app(Health(), CollectorRegistry())
    server = HealthServer(app, "127.0.0.1", held_port)
    with pytest.raises(ConfigError, match=r"^CAMPAIGN_HTTP_PORT: cannot listen on 127\.0\.0\.1"):
        await server.start()
    # The runner was cleaned up: a fresh server on a free port still starts.
    ok = HealthServer(build_app(Health(), CollectorRegistry()), "127.0.0.1", 0)
    await ok.start()
    assert ok.port
    await ok.stop()


def test_bind_error_lines() -> None:
    assert bind_error("::1", 80, PermissionError(errno.EACCES, "Permission denied")) == (
        "CAMPAIGN_HTTP_PORT: cannot listen on [::1]:80: "
        "permission denied (ports below 1024 need privileges)"
    )
    odd = bind_error("h", 1, OSError(errno.EIO, "I/O error"))
    assert odd == "CAMPAIGN_HTTP_HOST/CAMPAIGN_HTTP_PORT: cannot listen on h:1: I/O error"
    assert bind_error("h\x00", 1, ValueError("embedded null")).endswith("not a valid address")


# --- OTEL_* numbers ----------------------------------------------------------------------

TRACING = {"OTEL_TRACES_EXPORTER": "console"}


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("OTEL_BSP_SCHEDULE_DELAY", "-5"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_BSP_SCHEDULE_DELAY", "1e3"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", ""),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-1"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ("OTEL_SPAN_EVENT_COUNT_LIMIT", "-1"),
        ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "big"),
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "99999999999999999999"),
    ],
)
def test_bad_otel_numbers_are_named(env: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_otel_env({**TRACING, env: value})
    assert str(err.value).startswith(f"{env}: must be ") and "\n" not in str(err.value)


def test_otel_cross_checks_and_good_values() -> None:
    with pytest.raises(ConfigError, match=r"^OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must not exceed"):
        check_otel_env({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"})  # default queue is 2048
    with pytest.raises(ConfigError, match=r"^OTEL_TRACES_SAMPLER_ARG: must be a ratio"):
        check_otel_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"})
    with pytest.raises(ConfigError, match=r"^OTEL_TRACES_SAMPLER_ARG: must be a ratio"):
        check_otel_env(
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"}
        )
    check_otel_env({})
    check_otel_env({
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_BSP_MAX_QUEUE_SIZE": "8192",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096", "OTEL_BSP_EXPORT_TIMEOUT": "30000",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "",
        "OTEL_SPAN_EVENT_COUNT_LIMIT": "unset", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "0",
        "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
    })  # fmt: skip


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("OTEL_BSP_SCHEDULE_DELAY", "-5"),
        ("OTEL_SPAN_LINK_COUNT_LIMIT", "-3"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf"),
    ],
)
def test_bad_otel_numbers_exit_2_with_one_line(env: str, value: str) -> None:
    done = _run(
        **TRACING, **{env: value}, CAMPAIGN_HTTP_PORT=str(free_port()),
        CAMPAIGN_HTTP_HOST="127.0.0.1", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )  # fmt: skip
    line = _assert_one_line(done, env)
    assert repr(value) in line


# --- a worker on a unix:// Redis URL -----------------------------------------------------


@pytest.fixture
def unix_redis() -> Iterator[tuple[EmbeddedRedis, Path]]:
    sock_dir = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    sock = sock_dir / "redis.sock"
    server = start_redis(sock_dir / "data", "--unixsocket", str(sock), "--unixsocketperm", "700")
    yield server, sock
    server.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


async def test_worker_runs_on_a_unix_socket_url(unix_redis: tuple[EmbeddedRedis, Path]) -> None:
    _server, sock = unix_redis
    worker = WorkerProcess(f"unix://{sock}?db=1").start()
    try:
        body = await worker.wait_status("/readyz", 200)
        assert body == {"status": "ok"}
        done = _run("ping", "--timeout", "10", REDIS_URL=f"unix://{sock}?db=1")
        assert done.returncode == 0, done.stderr
    finally:
        assert worker.stop() == 0
    assert not any("Traceback" in line or "TypeError" in line for line in worker.raw)
