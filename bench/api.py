"""The control API (``campaign-worker api``) against the in-process client, in the same run.

    .venv/bin/python bench/api.py [--contacts N] [--batches 1000,5000] [--lookups L]
        [--concurrency 1,32] [--runs R] [--deadline S]

Starts a private redis-server with the project's ``deploy/redis/redis.conf`` (AOF
``appendfsync everysec``, as bench/enroll.py) and ``campaign-worker api`` as its own
process on a free port (the deployment: the API is a process of its own, reached over
HTTP); the bench process talks to it with one ``aiohttp.ClientSession``. Both sides use
the same Redis, flushed before each enrollment run. Per run (R runs, medians reported):

- enrolling: N contacts (each with a small attributes dict) into a one-action campaign,
  per batch size B: ``CampaignClient.enroll_many(batch_size=B)`` in this process, then
  ``POST /v1/campaigns/{id}/enrollments/batch`` with B contacts per request, one request
  in flight (the JSON encoding of each body counted, as a caller pays it). The campaign is
  registered through ``POST /v1/campaigns`` for the API rows;
- looking up: L status lookups over the enrolled ids (seeded shuffle), C in flight at a
  time, per C: ``client.status(id)`` in this process, then ``GET /v1/enrollments/{id}``
  (each body parsed and its id checked); per-call latency p50 and p99.

Every count is checked (each run enrolls N, the store holds N, every lookup answers 200
with its id, the API's own ``/metrics`` counted no error); a mismatch exits non-zero.
The token is random per run and never printed (the API's log is shown only on a failure,
with the token masked). ``--deadline S``: after S seconds print every stack of this
process, make the API process print its own (SIGABRT under PYTHONFAULTHANDLER) and exit
3, instead of hanging silently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp
import orjson

from app.client import CampaignClient
from app.settings import Settings
from worker.embedded_redis import EmbeddedRedis, free_port

REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
CAMPAIGN = "bench"
DEFINITION = {
    "id": CAMPAIGN,
    "entry": "send",
    "nodes": {"send": {"type": "action", "action": "log"}},
}
EXE = Path(sys.executable).parent / "campaign-worker"
JSON = {"Content-Type": "application/json"}


class BenchFailure(Exception):
    """A count that does not add up: the bench exits non-zero."""


def code_version() -> str:
    """The commit the code is at, ``-dirty`` when app/ or worker/ have uncommitted changes."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "app", "worker"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def contacts_of(n: int) -> list[dict[str, Any]]:
    return [
        {
            "contact_id": f"contact-{i}",
            "attributes": {"email": f"contact-{i}@example.com", "plan": "pro", "n": i},
        }
        for i in range(n)
    ]


# --- the API process ----------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The API process gets SIGTERM when this process dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ApiProcess:
    """``campaign-worker api`` as a subprocess, its output in a file (shown masked on a
    failure only)."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.log_path = log_dir / "api.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CAMPAIGN_", "OTEL_", "REDIS_URL"))
        }
        env.update(
            REDIS_URL=redis_url,
            CAMPAIGN_API_HOST="127.0.0.1",
            CAMPAIGN_API_PORT=str(self.port),
            CAMPAIGN_API_TOKENS=self.token,
            CAMPAIGN_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",  # SIGABRT at the deadline prints its stacks
            # the API runs the code this bench is in (a worktree too), not the installed one
            PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def start(self, session: aiohttp.ClientSession, within: float = 20.0) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - quick; the watchdog thread uses it too
                [str(EXE), "api"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchFailure(f"campaign-worker api exited {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.base + "/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise BenchFailure(f"campaign-worker api not ready within {within}s")

    def log(self, tail: int = 4000) -> str:
        """The end of the API's output, the token masked."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:].replace(self.token, "<token>")

    def abort(self) -> None:
        """SIGABRT: the faulthandler prints the process's Python stacks into its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 15 s); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


#: Set when the deadline passed: the watchdog thread stops everything and exits.
FIRED = threading.Event()


def leave_it_to_the_watchdog() -> None:
    """After the deadline, the main thread (its calls failing as the API is aborted) only
    waits for the watchdog's exit, so that the stacks and its exit code are what is seen."""
    if FIRED.is_set():
        while True:
            time.sleep(1)


def arm_deadline(seconds: float, api: ApiProcess, server: EmbeddedRedis) -> Callable[[], None]:
    """As bench/cluster.py's --deadline (a hang prints its stacks instead of being killed
    silently), and the API's stacks too; the subprocesses are stopped before exiting.
    Returns the disarm function."""

    def fire() -> None:
        FIRED.set()
        print(f"\n--deadline {seconds:g}s passed; stacks of the bench process:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        api.abort()
        print("\nend of campaign-worker api's output (its stacks, if it hung):", file=sys.stderr)
        print(api.log(20_000), file=sys.stderr)
        api.stop()
        server.close()
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    # The backstop when the watchdog thread never gets to run (the GIL held in C code).
    faulthandler.dump_traceback_later(seconds + 30, exit=True)

    def disarm() -> None:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    return disarm


# --- timed runs ---------------------------------------------------------------------------


async def reset(client: CampaignClient) -> None:
    await client.redis.flushall()


async def stored(client: CampaignClient) -> int:
    return sum((await client.service.store.count_by_state(CAMPAIGN)).values())


async def enroll_in_process(
    client: CampaignClient, contacts: list[dict[str, Any]], batch: int
) -> tuple[float, list[float]]:
    """Contacts/s of enroll_many on an emptied database (and no latencies: one call
    writes every batch, planning the next while the previous is written)."""
    await reset(client)
    await client.register_campaign(DEFINITION)
    n = len(contacts)
    started = time.perf_counter()
    enrolled = await client.enroll_many(CAMPAIGN, contacts, batch_size=batch)
    elapsed = time.perf_counter() - started
    if enrolled != n or await stored(client) != n:
        raise BenchFailure(f"enroll_many enrolled {int(enrolled)} of {n}")
    return n / elapsed, []  # one call for all batches: no latency per batch


async def enroll_over_http(
    session: aiohttp.ClientSession,
    api: ApiProcess,
    client: CampaignClient,
    contacts: list[dict[str, Any]],
    batch: int,
) -> tuple[float, list[float]]:
    """(contacts/s, seconds per request) of POST .../enrollments/batch, one in flight."""
    await reset(client)
    async with session.post(
        f"{api.base}/v1/campaigns", data=orjson.dumps(DEFINITION), headers=api.headers | JSON
    ) as r:
        if r.status != 201:
            raise BenchFailure(f"POST /v1/campaigns: {r.status} {await r.text()}")
    url = f"{api.base}/v1/campaigns/{CAMPAIGN}/enrollments/batch"
    n = len(contacts)
    enrolled = skipped = 0
    per_request: list[float] = []
    started = time.perf_counter()
    for start in range(0, n, batch):
        t = time.perf_counter()
        body = orjson.dumps({"contacts": contacts[start : start + batch]})
        async with session.post(url, data=body, headers=api.headers | JSON) as r:
            reply = await r.read()
            if r.status != 200:
                raise BenchFailure(f"POST {url}: {r.status} {reply[:2000]!r}")
        result = orjson.loads(reply)
        per_request.append(time.perf_counter() - t)
        enrolled += result["enrolled"]
        skipped += result["skipped"]
    elapsed = time.perf_counter() - started
    if enrolled != n or skipped or await stored(client) != n:
        raise BenchFailure(f"the API enrolled {enrolled} of {n} ({skipped} skipped)")
    return n / elapsed, per_request


async def concurrently(
    op: Callable[[str], Awaitable[None]], ids: list[str], in_flight: int
) -> tuple[float, list[float]]:
    """(calls/s, seconds per call) of ``op`` over ``ids`` with ``in_flight`` calls at a time."""
    it = iter(ids)
    latencies: list[float] = []

    async def lane() -> None:
        for eid in it:  # one shared iterator: each id is looked up once
            t = time.perf_counter()
            await op(eid)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    if len(latencies) != len(ids):
        raise BenchFailure(f"{len(latencies)} of {len(ids)} lookups made")
    return len(ids) / elapsed, latencies


def status_in_process(client: CampaignClient) -> Callable[[str], Awaitable[None]]:
    async def op(eid: str) -> None:
        status = await client.status(eid)
        if status.enrollment_id != eid:
            raise BenchFailure(f"client.status({eid!r}) answered {status.enrollment_id!r}")

    return op


def status_over_http(
    session: aiohttp.ClientSession, api: ApiProcess
) -> Callable[[str], Awaitable[None]]:
    headers = api.headers

    async def op(eid: str) -> None:
        async with session.get(f"{api.base}/v1/enrollments/{eid}", headers=headers) as r:
            body = await r.read()
            if r.status != 200:
                raise BenchFailure(f"GET /v1/enrollments/{eid}: {r.status} {body[:500]!r}")
        if orjson.loads(body)["enrollment_id"] != eid:
            raise BenchFailure(f"GET /v1/enrollments/{eid} answered another enrollment")

    return op


# --- the API's own view -------------------------------------------------------------------

_SAMPLE = re.compile(r"^(campaign_api_\w+)\{(.*)\} ([0-9.e+-]+)$")  # route labels hold braces


async def api_metrics(session: aiohttp.ClientSession, api: ApiProcess) -> dict[str, Any]:
    """Requests by status and mean server-side handling time by route, from its /metrics."""
    async with session.get(f"{api.base}/metrics") as r:
        text = await r.text()
    statuses: Counter[str] = Counter()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = (
            m.group(1),
            dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))),
            m.group(3),
        )
        key = f"{labels.get('method')} {labels.get('route')}"
        if name == "campaign_api_requests_total":
            statuses[labels.get("status", "?")] += int(float(value))
        elif name == "campaign_api_request_duration_seconds_sum":
            sums[key] = float(value)
        elif name == "campaign_api_request_duration_seconds_count":
            counts[key] = float(value)
    means = {k: sums[k] / counts[k] for k in sums if counts.get(k)}
    return {"statuses": statuses, "means": means, "counts": counts}


# --- main ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Row:
    def __init__(self, name: str, base: Row | None = None) -> None:
        self.name, self.base = name, base
        self.rates: list[float] = []
        self.p50: list[float] = []
        self.p99: list[float] = []

    def add(self, rate: float, latencies: list[float]) -> None:
        self.rates.append(rate)
        if latencies:
            self.p50.append(pct(latencies, 0.50))
            self.p99.append(pct(latencies, 0.99))

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def line(self) -> str:
        ratio = f"{self.median / self.base.median:.2f}x" if self.base else "1.00x"
        if self.base:
            ratio = f"**{ratio}**"
        p50 = f"{statistics.median(self.p50) * 1000:.2f}" if self.p50 else "-"
        p99 = f"{statistics.median(self.p99) * 1000:.2f}" if self.p99 else "-"
        runs = ", ".join(f"{r:,.0f}" for r in self.rates)
        return f"| {self.name} | {self.median:,.0f} | {ratio} | {p50} | {p99} | {runs} |"


async def run(args: argparse.Namespace) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    flights = [int(c) for c in args.concurrency.split(",")]
    n = args.contacts
    contacts = contacts_of(n)
    ids = [f"{CAMPAIGN}:contact-{i % n}" for i in range(args.lookups)]
    random.Random(7).shuffle(ids)
    rows: dict[str, Row] = {}
    for b in batches:
        base = rows[f"e{b}"] = Row(f"`enroll_many`, batches of {b} (in-process)")
        rows[f"h{b}"] = Row(f"`POST .../enrollments/batch`, {b} per request", base)
    for c in flights:
        base = rows[f"s{c}"] = Row(f"`client.status(id)`, {c} in flight (in-process)")
        rows[f"g{c}"] = Row(f"`GET /v1/enrollments/{{id}}`, {c} in flight", base)

    server = EmbeddedRedis(config=REDIS_CONF if REDIS_CONF.exists() else None)
    server.start()
    log_dir = tempfile.TemporaryDirectory(prefix="bench-api-")
    api = ApiProcess(server.url, Path(log_dir.name))
    disarm = arm_deadline(args.deadline, api, server) if args.deadline else None
    code = 0
    try:
        settings = Settings(redis_url=server.url)  # type: ignore[arg-type]
        connector = aiohttp.TCPConnector(limit=max(flights) + 4)
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            CampaignClient(settings=settings) as client,
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        ):
            await api.start(session)
            info = await client.redis.info("server")
            for _ in range(args.runs):  # interleaved, so that drift hits every row alike
                for b in batches:
                    rows[f"e{b}"].add(*await enroll_in_process(client, contacts, b))
                    rows[f"h{b}"].add(*await enroll_over_http(session, api, client, contacts, b))
                # the N enrollments the last row made (through the API) are looked up
                for c in flights:
                    rows[f"s{c}"].add(*await concurrently(status_in_process(client), ids, c))
                    rows[f"g{c}"].add(*await concurrently(status_over_http(session, api), ids, c))
            seen = await api_metrics(session, api)
        bad = {s: k for s, k in seen["statuses"].items() if not s.startswith("2")}
        expected = args.runs * (
            len(batches) + sum(-(-n // b) for b in batches) + len(flights) * len(ids)
        )
        v1 = sum(k for route, k in seen["counts"].items() if " /v1/" in route)
        if bad or v1 != expected:
            raise BenchFailure(f"the API counted {v1} /v1 requests (expected {expected}), "
                               f"statuses {dict(seen['statuses'])}")  # fmt: skip

        print(
            f"{n:,} contacts (attributes: email, plan, n) per enrollment run; batch sizes "
            f"{', '.join(map(str, batches))}; {len(ids):,} status lookups per concurrency; "
            f"median of {args.runs} runs"
        )
        print(
            f"Python {sys.version.split()[0]}, redis-server {info['redis_version']} "
            "(deploy/redis/redis.conf: AOF everysec); campaign-worker api in its own process, "
            "aiohttp.ClientSession in the bench process, same Redis (flushed per run); "
            f"code at {code_version()}"
        )
        print()
        print("| what | median/s | vs in-process client | p50 ms | p99 ms | runs/s |")
        print("|---|---:|---:|---:|---:|---|")
        for row in rows.values():
            print(row.line())
        print()
        print(
            "(enrolling rows: contacts/s, latency per batch; lookup rows: lookups/s, latency per call)"
        )
        means = ", ".join(
            f"{route}: {mean * 1000:.2f} ms" for route, mean in sorted(seen["means"].items())
            if route.startswith(("POST /v1/campaigns/", "GET /v1/enrollments"))
        )  # fmt: skip
        print(f"server-side mean handling time (the API's /metrics): {means}")
        print(f"API requests by status: {dict(seen['statuses'])}")
    except BenchFailure as exc:
        leave_it_to_the_watchdog()
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"end of campaign-worker api's output:\n{api.log()}", file=sys.stderr)
        code = 1
    except BaseException:
        leave_it_to_the_watchdog()
        raise
    finally:
        exit_code = api.stop()
        server.close()
        log_dir.cleanup()
        if disarm is not None:
            disarm()
    if exit_code not in (0, None) and code == 0:
        print(f"FAILED: campaign-worker api exited {exit_code} on SIGTERM", file=sys.stderr)
        code = 1
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--contacts", type=int, default=20_000)
    ap.add_argument("--batches", default="1000,5000", help="batch sizes, comma-separated")
    ap.add_argument("--lookups", type=int, default=5000, help="status lookups per concurrency")
    ap.add_argument("--concurrency", default="1,32", help="lookups in flight, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds after which to print every stack (this process's and the "
                    "API's) and exit 3 (0: none)")  # fmt: skip
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
