"""Every command a reader would type in README.md and docs/ runs (docs/contributing.md).

Each session (a page, or a part of one after ``<!-- docs-test: session NAME -->``) runs
its ``console`` blocks' ``$`` commands in order, each in ``bash``, against the private
redis-server of the test session (emptied first), in a new working directory that links
to the repository's files. Shell state carries from one command to the next: variables
(``set -a`` exports them), ``export``, ``cd``. What the docs call ``localhost`` is
127.0.0.1, and their well-known ports are mapped to free ones: 6379 is the private
server, 6380 a second Redis (a restore), 8080 and 8081 worker HTTP ports, 8000 the
control API (``campaign-worker api``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_py

from tests.conftest import subprocess_env
from tests.docs.blocks import ROOT, RUN_LANG, SHELL_LANGS, Command, Session, blocks, pages, sessions
from worker.embedded_redis import EmbeddedRedis, free_port

SESSIONS = sessions()
DOC_PORTS = (6379, 6380, 8000, 8080, 8081)
COMMAND_TIMEOUT = 120.0
_DROPPED_ENV = {"_", "SHLVL", "PWD", "OLDPWD", "__rc"}


@dataclass
class Background:
    proc: subprocess.Popen[bytes]
    log: Path
    command: Command


@dataclass
class DocShell:
    """A shell session as a reader would have it, against private servers."""

    work: Path
    env: dict[str, str]
    ports: dict[int, int]
    cwd: Path = Path()
    background: list[Background] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        text = re.sub(r"\blocalhost\b", "127.0.0.1", text)
        for doc_port, port in self.ports.items():
            text = re.sub(rf"(?<![\d.]){doc_port}(?!\d)", str(port), text)
        return text

    def run(self, command: Command, where: str) -> None:
        text = self.substitute(command.text)
        self.transcript.append(f"$ {text}")
        if command.background:
            self._start(text.rstrip().removesuffix("&").rstrip(), command, where)
            return
        state = self.work.parent / "state"
        script = f"set -a\n{text}\n__rc=$?\nenv -0 > {state}.env; pwd > {state}.cwd\nexit $__rc\n"
        started = time.monotonic()
        try:
            done = subprocess.run(
                ["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True,
                text=True, timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            self.fail(where, command, f"did not finish within {COMMAND_TIMEOUT:g}s: {exc}")
        took = time.monotonic() - started
        self.transcript.append(f"{done.stdout}{done.stderr}[exit {done.returncode}, {took:.1f}s]")
        if done.returncode != command.expected_exit:
            self.fail(
                where, command,
                f"exit {done.returncode}, expected {command.expected_exit}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}",
            )  # fmt: skip
        if Path(f"{state}.env").exists():
            pairs = Path(f"{state}.env").read_text().split("\0")
            self.env = {
                k: v for k, _, v in (p.partition("=") for p in pairs if "=" in p)
                if k not in _DROPPED_ENV and not k.startswith("BASH_FUNC_")
            }  # fmt: skip
            self.cwd = Path(Path(f"{state}.cwd").read_text().strip())

    def _start(self, text: str, command: Command, where: str) -> None:
        log = self.work.parent / f"background-{len(self.background)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", text], cwd=self.cwd, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        bg = Background(proc, log, command)
        self.background.append(bg)
        if "campaign-worker run" in text:
            found = re.search(r"CAMPAIGN_HTTP_PORT=(\d+)", text)
            port = int(found[1]) if found else int(self.env.get("CAMPAIGN_HTTP_PORT", "8080"))
            self._wait(bg, where, f"/readyz on {port}", lambda: _http_ok(port, "/readyz"))
        elif "campaign-worker api" in text:
            found = re.search(r"CAMPAIGN_API_PORT=(\d+)", text)
            port = int(found[1]) if found else int(self.env.get("CAMPAIGN_API_PORT", "8000"))
            self._wait(bg, where, f"/readyz on {port}", lambda: _http_ok(port, "/readyz"))
        elif "redis-server" in text:
            found = re.search(r"--port\s+(\d+)", text)
            if found:
                port = int(found[1])
                self._wait(bg, where, f"redis on {port}", lambda: _redis_answers(port))

    def _wait(self, bg: Background, where: str, what: str, check: object) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if bg.proc.poll() is not None:
                self.fail(where, bg.command, f"exited {bg.proc.returncode}:\n{_tail(bg.log)}")
            if check():  # type: ignore[operator]
                return
            time.sleep(0.05)
        self.fail(where, bg.command, f"no {what} within 30 s:\n{_tail(bg.log)}")

    def fail(self, where: str, command: Command, detail: str) -> None:
        logs = "\n".join(
            f"--- background `{b.command.text}`:\n{_tail(b.log)}" for b in self.background
        )
        pytest.fail(
            f"{where}:{command.line}: `{command.text}`: {detail}\n{logs}\n"
            f"--- transcript:\n" + "\n".join(self.transcript)[-6000:],
            pytrace=False,
        )

    def close(self) -> None:
        for bg in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bg.proc.pid, signal.SIGTERM)
        for bg in self.background:
            try:
                bg.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(bg.proc.pid, signal.SIGKILL)
                bg.proc.wait(10)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


def _shutdown_redis(port: int) -> None:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        s.sendall(b"SHUTDOWN NOSAVE\r\n")
        s.recv(64)


def workdir(base: Path, server: EmbeddedRedis) -> tuple[Path, dict[str, str]]:
    """A working directory linking to the repository's files, and its environment: the
    fixture's redis-server and redis-cli first on PATH, then the project's venv."""
    work = base / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".pytest_cache", ".ruff_cache", ".mypy_cache", "site"}:
            (work / entry.name).symlink_to(entry)
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(server.binary)
    cli = Path(server.binary).with_name("redis-cli")
    (bin_dir / "redis-cli").symlink_to(cli if cli.exists() else shutil.which("redis-cli") or cli)
    env = subprocess_env(PATH=f"{bin_dir}:{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    env.update(HOME=str(base), VIRTUAL_ENV=str(ROOT / ".venv"), CAMPAIGN_HTTP_HOST="127.0.0.1")
    env.pop("CAMPAIGN_LOG_FORMAT", None)  # as a reader has it: text on a terminal, else JSON
    return work, env


@contextlib.contextmanager
def doc_shell(base: Path, server: EmbeddedRedis, *, flush: bool = True) -> Iterator[DocShell]:
    """A fresh session: emptied Redis (unless ``flush`` is false), new directory, doc
    ports mapped to free ones."""
    if flush:
        client = redis_py.Redis.from_url(server.url)
        try:
            client.flushall()
        finally:
            client.close()
    work, env = workdir(base, server)
    ports = {6379: server.port, **{p: free_port() for p in DOC_PORTS if p != 6379}}
    env.update(
        REDIS_URL=server.url, CAMPAIGN_HTTP_PORT=str(ports[8080]),
        CAMPAIGN_API_PORT=str(ports[8000]),
    )  # fmt: skip
    shell = DocShell(work, env, ports)
    shell.cwd = work
    try:
        yield shell
    finally:
        shell.close()
        for doc_port, port in ports.items():
            if doc_port != 6379:
                _shutdown_redis(port)


@pytest.mark.parametrize("session", SESSIONS, ids=[s.id for s in SESSIONS])
def test_documented_commands_run(
    session: Session, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    with doc_shell(tmp_path, redis_server) as shell:
        for block in session.blocks:
            if block.lang != RUN_LANG or block.skip is not None:
                continue
            for command in block.commands():
                shell.run(command, str(block.path.relative_to(ROOT)))


def test_every_shell_block_is_run_or_marked_not_run() -> None:
    """A shell block is either a ``console`` block (run) or marked ``docs-test: skip``,
    with a reason; a ``console`` block has commands; ``$`` prompts only in console."""
    problems = []
    for page in pages():
        for block, _ in blocks(page):
            if block.lang in SHELL_LANGS and block.skip is None:
                if block.lang != RUN_LANG:
                    problems.append(f"{block.where}: `{block.lang}` block: use `console` "
                                    "(run by the tests) or mark it <!-- docs-test: skip REASON -->")  # fmt: skip
                elif not block.commands():
                    problems.append(f"{block.where}: console block without a `$ ` command")
            if block.skip == "unspecified":
                problems.append(f"{block.where}: docs-test: skip needs a reason")
            if block.lang not in SHELL_LANGS and any(ln.startswith("$ ") for ln in block.body):
                problems.append(f"{block.where}: `$ ` prompts in a `{block.lang}` block")
    assert not problems, "\n".join(problems)


def test_the_sessions_cover_the_pages_with_commands() -> None:
    """Every page that shows a runnable command is in some session, and there are enough
    of them that a parsing mistake (no commands found) cannot pass silently."""
    covered = {s.page for s in SESSIONS}
    for page in pages():
        runnable = [b for b, _ in blocks(page) if b.lang == RUN_LANG and b.skip is None]
        if runnable:
            assert page in covered, page
    assert sum(len(s.commands()) for s in SESSIONS) >= 40
    assert any(s.page.name == "README.md" for s in SESSIONS)
