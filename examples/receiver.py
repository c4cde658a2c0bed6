"""A tiny stand-in for your messaging service, for examples/onboarding.json.

It answers every ``POST`` from the worker's ``http`` action with 200, logs each call with
its ``Idempotency-Key`` and ``X-Campaign-Attempt`` headers, and de-duplicates by the key:
a retry or re-run of a step it already handled (same key) is answered as before and not
"sent" again. That is how a receiver turns the worker's at-least-once delivery into
effectively-once. ``GET /calls`` lists what it received, as JSON.

    python examples/receiver.py &                  # listens on $RECEIVER_URL (127.0.0.1:8787)
    python examples/receiver.py --reply-after 2 &  # also replies as the contact (signal)

With ``--reply-after SECONDS`` it delivers the ``replied`` event to the enrollment that
many seconds after its welcome message, through the Python client (``app``, so run it
with the project's Python and ``REDIS_URL`` set); without it, it prints the
``campaign-worker signal`` command for you to run. Only the standard library is needed
otherwise. Stop it with Ctrl-C (or ``kill %1``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8787"


class Ledger:
    """The calls received, and the answer given to each idempotency key (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, dict[str, Any]] = {}  # idempotency key -> answer sent
        self.calls: list[dict[str, Any]] = []

    def record(self, call: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the answer for this call's key, whether the key was new)."""
        key = call["idempotency_key"]
        with self.lock:
            seen = self.answers.get(key)
            call["duplicate"] = seen is not None
            self.calls.append(call)
            if seen is not None:
                return seen, False
            answer = {"ok": True, "message_id": f"msg-{len(self.answers) + 1}"}
            self.answers[key] = answer
            return answer, True

    def summary(self) -> dict[str, Any]:
        with self.lock:
            counts: dict[str, int] = {}
            for call in self.calls:
                counts[call["idempotency_key"]] = counts.get(call["idempotency_key"], 0) + 1
            return {"calls": list(self.calls), "received_per_key": counts,
                    "sent": len(self.answers)}  # fmt: skip


def log(text: str) -> None:
    print(f"receiver: {text}", flush=True)


def send_reply(enrollment_id: str, delay: float) -> None:
    """Deliver ``replied`` to the enrollment after ``delay`` seconds, as the contact would.

    The worker records the welcome step after this server answered it, so the enrollment
    may not be waiting yet: try again for a few seconds.
    """
    from app import CampaignClient  # only needed with --reply-after

    async def reply() -> None:
        await asyncio.sleep(delay)
        async with CampaignClient.from_settings() as client:
            deadline = time.monotonic() + 30
            while True:
                if await client.signal(enrollment_id, "replied", {"text": "Thanks!"}):
                    log(f"replied as the contact: {enrollment_id} got 'replied'")
                    return
                if time.monotonic() > deadline:
                    log(f"could not reply: {enrollment_id} is not waiting for 'replied'")
                    return
                await asyncio.sleep(0.2)

    threading.Thread(target=asyncio.run, args=(reply(),), daemon=True).start()


def make_handler(ledger: Ledger, reply_after: float | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
                return
            key = self.headers.get("Idempotency-Key")
            if not key:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "no Idempotency-Key"})
                return
            params = body.get("params") or {}
            call = {
                "path": self.path,
                "idempotency_key": key,
                "attempt": self.headers.get("X-Campaign-Attempt"),
                "enrollment_id": body.get("enrollment_id"),
                "contact_id": body.get("contact_id"),
                "node": body.get("node"),
                "template": params.get("template"),
            }
            answer, new = ledger.record(call)
            what = "sent" if new else "duplicate: already sent, answered as before"
            log(
                f"POST {self.path} {call['template'] or call['node']} to {call['contact_id']}"
                f"  Idempotency-Key={key}  X-Campaign-Attempt={call['attempt']}  -> 200 ({what})"
            )
            self._answer(HTTPStatus.OK, answer)
            if new and call["node"] == "welcome" and call["enrollment_id"]:
                if reply_after is not None:
                    send_reply(call["enrollment_id"], reply_after)
                else:
                    log(f"to reply as the contact: campaign-worker signal "
                        f"{call['enrollment_id']} replied")  # fmt: skip

        def do_GET(self) -> None:
            if self.path == "/calls":
                self._answer(HTTPStatus.OK, ledger.summary())
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": "GET /calls lists the calls"})

        def _answer(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per call is printed above

    return Handler


def main(argv: list[str] | None = None) -> int:
    url = urlsplit(os.environ.get("RECEIVER_URL") or DEFAULT_URL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=url.hostname or "127.0.0.1",
                        help="address to listen on (default: the host of $RECEIVER_URL)")  # fmt: skip
    parser.add_argument("--port", type=int, default=url.port or 8787,
                        help="port to listen on (default: the port of $RECEIVER_URL, else 8787)")  # fmt: skip
    parser.add_argument("--reply-after", type=float, default=None, metavar="SECONDS",
                        help="reply as the contact this long after the welcome message")  # fmt: skip
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(Ledger(), args.reply_after))
    log(f"listening on http://{args.host}:{server.server_port} (GET /calls lists the calls)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
