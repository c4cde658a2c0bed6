"""Liveness and readiness state shared by the worker loop and the HTTP server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Health"]


@dataclass
class Health:
    """What the probes report. The worker loop writes it; the HTTP handlers read it."""

    poll_delay: float = 0.05
    started_at: float = field(default_factory=time.time)
    redis_ok: bool = False
    redis_error: str | None = "not connected yet"
    worker_running: bool = False
    draining: bool = False
    last_poll: float = 0.0

    def polled(self) -> None:
        self.last_poll = time.time()
        self.redis_ok = True
        self.redis_error = None

    def redis_down(self, error: BaseException) -> None:
        self.redis_ok = False
        self.redis_error = f"{type(error).__name__}: {error}"

    def stall_limit(self) -> float:
        """Seconds without a poll after which the loop counts as stuck."""
        return max(10.0, self.poll_delay * 100)

    def not_ready_reason(self, now: float | None = None) -> str | None:
        """None when ready, else why not."""
        now = time.time() if now is None else now
        if self.draining:
            return "draining: shutting down"
        if not self.redis_ok:
            return f"redis unreachable: {self.redis_error}"
        if not self.worker_running:
            return "worker loop not running"
        if now - self.last_poll > self.stall_limit():
            return f"worker loop stalled: last poll {now - self.last_poll:.1f}s ago"
        return None
