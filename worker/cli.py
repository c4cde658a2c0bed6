"""``campaign-worker``: run the worker, the demo, and admin commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.settings import ConfigError, Settings

__all__ = ["main"]

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaign-worker",
        description="Campaign scheduler worker and admin commands. Settings come from the "
        "environment (REDIS_URL, CAMPAIGN_*, OTEL_*); see the README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the worker and its HTTP server until SIGTERM")
    demo = sub.add_parser(
        "demo",
        help="run the whole system on this machine: embedded Redis, a worker, a demo campaign",
    )
    demo.add_argument("--contacts", type=int, default=300, help="contacts to enroll (default 300)")
    demo.add_argument("--reply-rate", type=float, default=0.35, help="share that replies (0.35)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (7)")
    demo.add_argument(
        "--campaign", type=Path, default=None, help="campaign JSON (examples/demo.json)"
    )
    ping = sub.add_parser("ping", help="enqueue a ping job and wait for a worker to answer it")
    ping.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"campaign-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from worker.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "run":
            from worker.main import run

            return asyncio.run(run(settings))
        if args.command == "demo":
            from worker.demo import run_demo

            if settings.log_level == "INFO" and "CAMPAIGN_LOG_LEVEL" not in os.environ:
                configure_logging("WARNING", settings.log_format)  # keep the progress readable
            return asyncio.run(run_demo(settings, contacts=args.contacts, reply_rate=args.reply_rate,
                                        seed=args.seed, campaign_path=args.campaign))  # fmt: skip
        if args.command == "ping":
            from worker.admin import ping_workers

            return asyncio.run(ping_workers(settings, args.timeout))
    except ConfigError as exc:
        print(f"campaign-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
