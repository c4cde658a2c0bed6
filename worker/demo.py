"""``campaign-worker demo``: the whole system on one machine with no set-up.

An embedded Redis (unless ``REDIS_URL`` is set), a stand-in CRM over HTTP, a worker, the
example campaign from ``examples/demo.json`` with second-scale durations, a few hundred
contacts in mixed time zones, simulated replies, a live progress line and a summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from app.client import CampaignClient
from app.models import State
from app.settings import Settings
from worker.actions import default_registry
from worker.embedded_redis import EmbeddedRedis, free_port
from worker.http_server import HealthServer
from worker.main import serve
from worker.metrics import metrics

__all__ = ["find_demo_campaign", "run_demo"]

ZONES = ["America/New_York", "Europe/Berlin", "Asia/Tokyo", "Australia/Sydney",
         "America/Sao_Paulo", "Asia/Kathmandu", "UTC"]  # fmt: skip


def find_demo_campaign() -> Path:
    """``examples/demo.json`` from the source tree, else the copy installed with the package."""
    here = Path(__file__).resolve().parents[1] / "examples" / "demo.json"
    if here.exists():
        return here
    return Path(sys.prefix) / "share" / "campaign-scheduler" / "examples" / "demo.json"


class Crm:
    """The campaign service the ``http`` steps call: some contacts bounce, some calls fail."""

    def __init__(self, rng: random.Random, bounce_rate: float, error_rate: float) -> None:
        self.rng = rng
        self.bounce_rate = bounce_rate
        self.error_rate = error_rate
        self.calls: Counter[str] = Counter()
        self.keys: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def send(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls["total"] += 1
        self.keys.add(request.headers.get("Idempotency-Key", ""))
        if self.rng.random() < self.error_rate:
            self.calls["503"] += 1
            return web.Response(status=503, text="busy")
        if body["params"].get("template") == "welcome" and self.rng.random() < self.bounce_rate:
            return web.json_response({"outcome": "bounced"})
        return web.json_response({"outcome": "sent"})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/send", self.send)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _load_campaign(path: Path, crm_url: str) -> dict[str, Any]:
    text = path.read_text().replace("{crm}", crm_url)
    return dict(json.loads(text))


async def run_demo(
    settings: Settings,
    *,
    contacts: int = 300,
    reply_rate: float = 0.35,
    seed: int = 7,
    campaign_path: Path | None = None,
    out: Any = None,
    console: bool = False,
) -> int:
    """Run the demo; returns 0 when every enrollment ended without failure.

    With ``console`` the control API and console also serve on
    ``CAMPAIGN_API_HOST:CAMPAIGN_API_PORT`` (a token made for this run is printed, unless
    ``CAMPAIGN_API_TOKENS`` is set), and everything keeps running after the summary until
    Ctrl-C, so the campaign can be looked at and failures replayed."""
    out = out or sys.stdout
    rng = random.Random(seed)
    path = campaign_path or find_demo_campaign()
    if not path.exists():
        print(f"demo campaign not found at {path}; pass --campaign PATH", file=sys.stderr)
        return 2
    embedded: EmbeddedRedis | None = None
    if not os.environ.get("REDIS_URL"):
        embedded = EmbeddedRedis()
        embedded.start()
        print(f"embedded redis-server on {embedded.url} ({embedded.binary})", file=out)
    redis_url = embedded.url if embedded else settings.redis_url.get_secret_value()
    # Own key prefix and queue, so a demo never touches real campaigns on a shared Redis.
    settings = settings.model_copy(update={
        "redis_url": SecretStr(redis_url),
        "key_prefix": "campaign-demo", "queue_name": "",
        "http_port": settings.http_port if os.environ.get("CAMPAIGN_HTTP_PORT") else 0,
        "poll_delay": min(settings.poll_delay, 0.02),
    })  # fmt: skip
    crm = Crm(rng, bounce_rate=0.1, error_rate=0.05)
    crm_url = await crm.start()
    lateness: list[float] = []
    metrics.lateness_samples = lateness
    stop = asyncio.Event()
    actions = default_registry(settings.actions)
    worker_task = asyncio.create_task(
        serve(settings, actions, install_signal_handlers=False, stop=stop)
    )
    client = CampaignClient(settings=settings)
    api_server = None
    try:
        if console:
            api_server = await _start_console(client, settings, out)
        await client.redis.delete(
            *[k async for k in client.redis.scan_iter("campaign-demo*")] or ["-"]
        )
        definition = _load_campaign(path, crm_url)
        version = await client.register_campaign(definition)
        cid = definition["id"]
        print(f"campaign {cid!r} v{version} from {path}; enrolling {contacts} contacts", file=out)
        people: list[dict[str, Any]] = [{"contact_id": f"contact-{i:04d}", "timezone": rng.choice(ZONES),
                   "attributes": {"email": f"user{i}@example.com"}} for i in range(contacts)]  # fmt: skip
        started = time.monotonic()
        enrolled = await client.enroll_many(cid, people)
        repliers = {str(p["contact_id"]) for p in people if rng.random() < reply_rate}
        replies = asyncio.create_task(_simulate_replies(client, cid, repliers, rng))
        final = await _progress(client, cid, contacts, out)
        elapsed = time.monotonic() - started
        await replies
        final.update(await _breakdown(client, [f"{cid}:{p['contact_id']}" for p in people]))
        if api_server is not None:
            code = await _summary(final, enrolled, elapsed, lateness, crm, out)
            print(f"\nthe console keeps serving at {_console_url(settings, api_server.port)} "
                  "(Ctrl-C to stop)", file=out, flush=True)  # fmt: skip
            await _until_interrupted()
            return code
    finally:
        if api_server is not None:
            await api_server.stop()
        stop.set()
        await worker_task
        await client.close()
        await crm.stop()
        metrics.lateness_samples = None
        if embedded is not None:
            embedded.close()
    return await _summary(final, enrolled, elapsed, lateness, crm, out)


def _console_url(settings: Settings, port: int | None) -> str:
    host = settings.api_host if settings.api_host not in {"0.0.0.0", "::", ""} else "127.0.0.1"  # noqa: S104
    return f"http://{host}:{port}/ui/"


async def _start_console(client: CampaignClient, settings: Settings, out: Any) -> HealthServer:
    """The control API and console in this process, with this run's token unless
    ``CAMPAIGN_API_TOKENS`` names some (then those are used and none is printed)."""
    from worker.api.server import build_api, load_tokens

    own = settings.api_tokens is None
    token = secrets.token_urlsafe(24)
    if own:
        settings = settings.model_copy(update={"api_tokens": SecretStr(token)})
    server = HealthServer(build_api(client, settings, load_tokens(settings)), settings.api_host,
                          settings.api_port, variables=("CAMPAIGN_API_HOST", "CAMPAIGN_API_PORT"))  # fmt: skip
    await server.start()
    login = (
        f"log in with this run's token: {token}"
        if own
        else "log in with a CAMPAIGN_API_TOKENS token"
    )
    print(f"console: {_console_url(settings, server.port)} ({login})", file=out, flush=True)
    return server


async def _until_interrupted() -> None:
    """Wait for Ctrl-C or SIGTERM."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _simulate_replies(
    client: CampaignClient, cid: str, repliers: set[str], rng: random.Random
) -> None:
    """Each replier answers at a random moment of its wait (some too late: a no-op)."""

    async def reply(contact: str) -> None:
        eid = f"{cid}:{contact}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = await client.status(eid)
            if st.state == State.WAITING:
                await asyncio.sleep(rng.uniform(0.1, 4.5))
                await client.signal(eid, "replied", {"text": "sounds good"})
                return
            if st.is_terminal:
                return
            await asyncio.sleep(0.1)

    await asyncio.gather(*(reply(c) for c in sorted(repliers)))


async def _breakdown(client: CampaignClient, ids: list[str]) -> dict[str, int]:
    """How each enrollment went, read from its history."""
    out = Counter(by_reply=0, by_timeout=0, bounced=0)
    for eid in ids:
        text = " | ".join(h.reason for h in (await client.status(eid)).history)
        if "event replied" in text:
            out["by_reply"] += 1
        elif "timeout of wait_reply" in text:
            out["by_timeout"] += 1
        elif "outcome bounced" in text:
            out["bounced"] += 1
    return dict(out)


async def _progress(client: CampaignClient, cid: str, total: int, out: Any) -> dict[str, Any]:
    tty = getattr(out, "isatty", lambda: False)()
    last_print = 0.0
    deadline = time.monotonic() + 120
    while True:
        counts = await client.service.store.count_by_state(cid)
        done = counts["completed"] + counts["failed"] + counts["cancelled"]
        line = " ".join(f"{k}={v}" for k, v in counts.items())
        now = time.monotonic()
        if tty:
            print(f"\r[{done}/{total}] {line}   ", end="", file=out, flush=True)
        elif now - last_print >= 1.0:
            print(f"[{done}/{total}] {line}", file=out, flush=True)
            last_print = now
        if done >= total or now > deadline:
            if tty:
                print(file=out)
            return counts
        await asyncio.sleep(0.25)


async def _summary(
    counts: dict[str, Any], enrolled: int, elapsed: float, lateness: list[float], crm: Crm,
    out: Any,
) -> int:  # fmt: skip
    steps = int(
        sum(v for (fn, oc), v in _job_counts().items() if fn == "run_step" and oc == "success")
    )
    p50 = statistics.median(lateness) * 1000 if lateness else 0.0
    p99 = _percentile(lateness, 0.99) * 1000 if lateness else 0.0
    rows = [
        ("enrolled", f"{enrolled}"),
        ("completed", f"{counts['completed']}"),
        ("  by reply", f"{counts['by_reply']}"),
        ("  by timeout (nudged)", f"{counts['by_timeout']}"),
        ("  bounced at welcome", f"{counts['bounced']}"),
        ("failed", f"{counts['failed']}"),
        ("still active", f"{counts['scheduled'] + counts['running'] + counts['waiting']}"),
        ("steps run", f"{steps}"),
        ("steps per second", f"{steps / elapsed:.1f}" if elapsed else "-"),
        ("job lateness p50", f"{p50:.1f} ms"),
        ("job lateness p99", f"{p99:.1f} ms"),
        ("CRM calls (503s retried)", f"{crm.calls['total']} ({crm.calls['503']})"),
        ("wall time", f"{elapsed:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nsummary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    ok = counts["failed"] == 0 and counts["completed"] == enrolled
    print("result: " + ("OK, every enrollment completed" if ok else "NOT OK"), file=out)
    return 0 if ok else 1


def _job_counts() -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for metric in metrics.jobs.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[(sample.labels["function"], sample.labels["outcome"])] = sample.value
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
