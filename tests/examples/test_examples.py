"""examples/README.md, run as written: the receiver and the commands a user types, against a
private redis-server and a real ``campaign-worker run``.

The blocks marked ``<!-- example-test: NAME -->`` are taken from the file itself, so the
document cannot drift from what works; the port and Redis come in through the environment
variables the blocks read (``REDIS_URL``, ``RECEIVER_URL``), never by editing the text.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app import CampaignClient
from app.errors import EnrollmentNotFound
from app.models import EnrollmentStatus, State
from app.settings import Settings
from tests.conftest import subprocess_env
from tests.helpers import WorkerProcess, eventually
from worker.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
README = EXAMPLES / "README.md"
CAMPAIGN = EXAMPLES / "onboarding.json"
ENROLLMENT = "onboarding-example:alice"

_MARKED_BLOCK = re.compile(
    r"<!-- example-test: (?P<name>[\w-]+) -->\n```(?:bash|sh)\n(?P<body>.*?)\n```", re.DOTALL
)


def marked_blocks() -> dict[str, str]:
    """The fenced shell blocks of examples/README.md marked for this test, by name."""
    blocks = {m["name"]: m["body"] for m in _MARKED_BLOCK.finditer(README.read_text())}
    assert set(blocks) == {"start", "reply"}, f"marked blocks: {sorted(blocks)}"
    return blocks


def example_env(redis_url: str, receiver_url: str) -> dict[str, str]:
    """What a user's shell has: the project's Python and campaign-worker first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = subprocess_env(REDIS_URL=redis_url, RECEIVER_URL=receiver_url)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.pop("CAMPAIGN_LOG_FORMAT", None)  # as a user's terminal would have it
    return env


def receiver_calls(receiver_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(receiver_url + "/calls", timeout=5) as resp:
        doc: dict[str, Any] = json.load(resp)
    return doc


class Shell:
    """A block run by bash in its own session (its background jobs too), output kept."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        """End the session this test started (bash and the receiver it put in the
        background), by its process group id."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def worker(redis_server: EmbeddedRedis, redis: object) -> Iterator[WorkerProcess]:
    """A real ``campaign-worker run`` on the emptied private Redis."""
    proc = WorkerProcess(redis_server.url).start()
    yield proc
    proc.stop()


async def _status(settings: Settings) -> EnrollmentStatus | None:
    async with CampaignClient(settings=settings) as client:
        try:
            return await client.status(ENROLLMENT)
        except EnrollmentNotFound:  # not enrolled yet
            return None


async def test_readme_commands_run_the_campaign_effectively_once(
    redis_server: EmbeddedRedis, settings: Settings, worker: WorkerProcess
) -> None:
    await worker.wait_status("/readyz", 200)
    receiver_url = f"http://127.0.0.1:{free_port()}"
    env = example_env(redis_server.url, receiver_url)
    blocks = marked_blocks()
    assert "python examples/receiver.py &" in blocks["start"]

    # `wait` keeps bash (and so the background receiver) until the test ends it.
    start = Shell(blocks["start"] + "\nwait\n", env)
    try:
        enrolled_at = datetime.now(UTC)

        async def waiting() -> EnrollmentStatus | None:
            st = await _status(settings)
            return st if st is not None and st.state is State.WAITING else None

        st = await eventually(waiting, 20, 0.05, f"alice waiting; shell: {start.lines}")
        assert st is not None
        assert st.node == "wait_reply" and st.timezone == "Europe/Berlin"
        assert st.deadline is not None
        assert abs(st.deadline - (enrolled_at + timedelta(days=3))) < timedelta(minutes=1)
        assert any(f"{ENROLLMENT}: " in line for line in start.lines), start.lines
        assert any("registered campaign 'onboarding-example'" in ln for ln in start.lines)

        calls = receiver_calls(receiver_url)
        assert [(c["node"], c["template"], c["attempt"]) for c in calls["calls"]] == [
            ("welcome", "welcome", "1")
        ]
        welcome_key = calls["calls"][0]["idempotency_key"]
        assert welcome_key.startswith(f"{ENROLLMENT}:")
        hint = f"receiver: to reply as the contact: campaign-worker signal {ENROLLMENT} replied"
        await eventually(lambda: _async(hint in start.lines), 5, 0.05, "the reply hint")
        # The README shows the receiver's log lines as they are.
        logged = [ln for ln in start.lines if ln.startswith("receiver: POST")]
        assert logged[0] == (
            f"receiver: POST /send welcome to alice  Idempotency-Key={welcome_key}  "
            "X-Campaign-Attempt=1  -> 200 (sent)"
        )
        assert logged[0] in README.read_text(), "update the log lines shown in the README"
        assert hint in README.read_text()

        reply = subprocess.run(
            ["bash", "-c", blocks["reply"]], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert reply.returncode == 0, reply.stdout + reply.stderr
        assert reply.stdout.splitlines()[0].startswith(f"{ENROLLMENT}: waiting node=wait_reply")
        assert reply.stdout.splitlines()[-1] == "delivered"

        async def completed() -> EnrollmentStatus | None:
            st = await _status(settings)
            return st if st is not None and st.state is State.COMPLETED else None

        done = await eventually(completed, 20, 0.05, "alice completed")
        assert done is not None
        assert done.node is None or done.node == "done"

        calls = receiver_calls(receiver_url)
        assert [c["template"] for c in calls["calls"]] == ["welcome", "thanks"]
        assert all(n == 1 for n in calls["received_per_key"].values()), calls
        assert calls["sent"] == 2

        # A re-run of the welcome step (same key, a later attempt) is answered as before
        # and not sent again: effectively once.
        first = calls["calls"][0]
        request = urllib.request.Request(
            receiver_url + "/send",
            data=json.dumps({"node": "welcome", "contact_id": "alice"}).encode(),
            headers={"Idempotency-Key": welcome_key, "X-Campaign-Attempt": "2",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
            again = json.load(resp)
        assert again["message_id"] == "msg-1"
        calls = receiver_calls(receiver_url)
        assert calls["sent"] == 2 and calls["received_per_key"][welcome_key] == 2
        assert calls["calls"][-1]["duplicate"] is True and first["duplicate"] is False
        await eventually(
            lambda: _async(any("(duplicate: already sent" in ln for ln in start.lines)), 5
        )
    finally:
        start.stop()


async def _async(value: bool) -> bool:
    return value


async def test_receiver_replies_by_itself(
    redis_server: EmbeddedRedis, settings: Settings, worker: WorkerProcess
) -> None:
    """``receiver.py --reply-after`` signals ``replied`` through the client."""
    await worker.wait_status("/readyz", 200)
    port = free_port()
    env = example_env(redis_server.url, f"http://127.0.0.1:{port}")
    receiver = Shell("exec python examples/receiver.py --reply-after 0.2", env)
    try:
        await eventually(lambda: _async(any("listening on" in ln for ln in receiver.lines)), 10)
        async with CampaignClient(settings=settings) as client:
            definition = json.loads(
                CAMPAIGN.read_text().replace("http://127.0.0.1:8787", f"http://127.0.0.1:{port}")
            )
            await client.register_campaign(definition)
            await client.enroll("onboarding-example", "alice", timezone="America/Chicago")

        async def completed() -> bool:
            st = await _status(settings)
            return st is not None and st.state is State.COMPLETED

        await eventually(completed, 20, 0.05, f"completed; receiver: {receiver.lines}")
        summary = receiver_calls(f"http://127.0.0.1:{port}")
        assert [c["template"] for c in summary["calls"]] == ["welcome", "thanks"]
        assert f"receiver: replied as the contact: {ENROLLMENT} got 'replied'" in receiver.lines
    finally:
        receiver.stop()


def test_campaign_is_shipped_and_points_at_the_receiver_default() -> None:
    """The URLs the README's `sed` replaces are the receiver's default address, and the
    example files are installed next to demo.json."""
    definition = json.loads(CAMPAIGN.read_text())
    urls = {n["params"]["url"] for n in definition["nodes"].values() if n.get("action") == "http"}
    assert urls == {"http://127.0.0.1:8787/send"}
    assert 'DEFAULT_URL = "http://127.0.0.1:8787"' in (EXAMPLES / "receiver.py").read_text()
    assert definition["nodes"]["follow_up"]["business_hours"] is True
    assert definition["nodes"]["wait_reply"]["timeout"] == "P3D"
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    shipped = set(data_files["share/campaign-scheduler/examples"])
    assert shipped == {f"examples/{p.name}" for p in EXAMPLES.iterdir() if p.is_file()}


def test_marked_blocks_are_plain_commands() -> None:
    """The start block is the two commands (receiver, register && enroll) after the
    variables; REDIS_URL keeps a value the reader already exported."""
    start = marked_blocks()["start"].splitlines()
    assert start[0].startswith("export REDIS_URL=${REDIS_URL:-")
    assert start[1].startswith("export RECEIVER_URL=${RECEIVER_URL:-http://127.0.0.1:8787}")
    commands = start[2:]
    assert len(commands) == 2
    assert commands[0] == "python examples/receiver.py &"
    assert "campaign-worker register" in commands[1] and "campaign-worker enroll" in commands[1]
