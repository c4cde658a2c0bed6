"""Campaign definitions several test modules run."""

from __future__ import annotations

from typing import Any

from tests.fake_service import FakeService


def reply_timeout(
    svc: FakeService,
    *,
    timeout: float = 1.0,
    fail_path: str = "/ok",
    max_attempts: int | None = 1,
) -> dict[str, Any]:
    """``rt``: a first http step (to ``fail_path``), a wait for "replied" (``timeout``
    seconds), then ``thanks`` or ``nudge`` and ``done``. ``max_attempts`` of each step
    (None: the default retry policy)."""

    def act(path: str, nxt: str) -> dict[str, Any]:
        node: dict[str, Any] = {"type": "action", "action": "http",
                                "params": {"url": svc.url(path)}, "next": nxt}  # fmt: skip
        if max_attempts is not None:
            node["retry"] = {"max_attempts": max_attempts}
        return node

    return {
        "id": "rt",
        "entry": "first",
        "nodes": {
            "first": act(fail_path, "wait"),
            "wait": {
                "type": "wait",
                "event": "replied",
                "timeout": timeout,
                "on_event": "thanks",
                "on_timeout": "nudge",
            },
            "thanks": act("/ok", "done"),
            "nudge": act("/ok", "done"),
            "done": {"type": "exit"},
        },
    }
