"""BullMQ no-op throughput, callable from Python, to compare against the same Redis.

    .venv/bin/python bench/bullmq_runner.py [--jobs N] [--concurrency C] [--repeats R]

``bullmq_rate(redis_url, jobs, concurrency)`` runs ``bench/bullmq/noop.mjs`` under Node:
a fresh queue, N no-op jobs added with ``addBulk`` (chunks of 1000, removeOnComplete and
removeOnFail), then one BullMQ Worker (concurrency C, processor ``async () => null``)
timed from its start until the N-th 'completed' event. It returns jobs/s, or ``None``
after one line on stderr when Node or npm is missing or ``npm ci`` fails (the first call
installs ``bench/bullmq/node_modules`` from the committed package-lock.json). Any other
failure of the benchmark itself raises ``RuntimeError``.

Run as a script, each repeat starts a private redis-server and prints the rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.embedded_redis import EmbeddedRedis

__all__ = ["bullmq_rate"]

BULLMQ_DIR = Path(__file__).resolve().parent / "bullmq"
SCRIPT = BULLMQ_DIR / "noop.mjs"
TIMEOUT = 300.0
NPM_CI_TIMEOUT = 600.0


def _say(message: str) -> None:
    print(f"bullmq benchmark skipped: {message}", file=sys.stderr)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _ensure_node_modules(npm: str) -> bool:
    """``npm ci`` once if ``node_modules`` is missing; False (after saying why) on failure."""
    if (BULLMQ_DIR / "node_modules" / "bullmq").is_dir():
        return True
    try:
        proc = subprocess.run(
            [npm, "ci", "--silent"],
            cwd=BULLMQ_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _say(f"npm ci in {BULLMQ_DIR} failed: {exc}")
        return False
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        detail = _last_line(output) if output else f"no output; run `npm ci` in {BULLMQ_DIR}"
        _say(f"npm ci in {BULLMQ_DIR} exited with {proc.returncode}: {detail}")
        return False
    return True


def _parse(stdout: str) -> float:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and isinstance(result.get("rate"), int | float):
            return float(result["rate"])
    raise RuntimeError(f"noop.mjs printed no result line: {stdout.strip()[-500:]!r}")


def bullmq_rate(redis_url: str, jobs: int, concurrency: int = 50) -> float | None:
    """BullMQ no-op jobs per second through one Worker on ``redis_url``.

    ``None`` (after one line on stderr) when ``node``/``npm`` is not on PATH or ``npm ci``
    fails; ``RuntimeError`` when the benchmark itself fails or exceeds 300 s.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _say(f"{'node' if node is None else 'npm'} not found on PATH")
        return None
    if not _ensure_node_modules(npm):
        return None
    args = [node, str(SCRIPT), "--redis-url", redis_url]
    args += ["--jobs", str(jobs), "--concurrency", str(concurrency)]
    try:
        proc = subprocess.run(
            args, cwd=BULLMQ_DIR, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"noop.mjs did not finish {jobs} jobs within {TIMEOUT:.0f}s") from exc
    if proc.returncode != 0:
        detail = _last_line(proc.stderr or proc.stdout)
        raise RuntimeError(f"noop.mjs exited with {proc.returncode}: {detail}")
    return _parse(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeats):
        with EmbeddedRedis() as redis:
            rate = bullmq_rate(redis.url, args.jobs, args.concurrency)
        if rate is None:
            raise SystemExit(1)
        print(f"bullmq no-op: {args.jobs} jobs, concurrency {args.concurrency}: {rate:,.0f} jobs/s")


if __name__ == "__main__":
    main()
