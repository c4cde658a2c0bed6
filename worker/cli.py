"""``campaign-worker``: run the worker, the demo, and admin commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from app.errors import CampaignError
from app.models import State
from app.settings import ConfigError, Settings

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_ERROR = 1
#: What a command killed by SIGPIPE exits with in a shell (128 + 13): its reader went away.
EXIT_BROKEN_PIPE = 141


def _parser() -> argparse.ArgumentParser:
    from app import __version__

    parser = argparse.ArgumentParser(
        prog="campaign-worker",
        description="Campaign scheduler worker and admin commands. Settings come from the "
        "environment (REDIS_URL, CAMPAIGN_*, OTEL_*); see the README.",
    )
    parser.add_argument("--version", action="version", version=f"campaign-worker {__version__}")
    parser.add_argument("--redis-url", metavar="URL", default=None, help=_REDIS_URL_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the worker and its HTTP server until SIGTERM")
    sub.add_parser(
        "api",
        help="serve the control API and console on CAMPAIGN_API_HOST:CAMPAIGN_API_PORT "
        "(needs CAMPAIGN_API_TOKENS) until SIGTERM",
    )

    demo = sub.add_parser(
        "demo", help="the whole system on this machine: embedded Redis, a worker, a demo campaign"
    )
    demo.add_argument("--contacts", type=int, default=300, help="contacts to enroll (default 300)")
    demo.add_argument("--reply-rate", type=float, default=0.35, help="share that replies (0.35)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (7)")
    demo.add_argument(
        "--campaign", type=Path, default=None, help="campaign JSON (examples/demo.json)"
    )
    demo.add_argument("--console", action="store_true",
                      help="also serve the console on CAMPAIGN_API_PORT (8000) and keep running "
                      "after the summary until Ctrl-C")  # fmt: skip

    ping = sub.add_parser("ping", help="enqueue a ping job and wait for a worker to answer it")
    ping.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")

    reg = sub.add_parser("register", help="register a campaign JSON file (a new version)")
    reg.add_argument("file", type=Path)

    enr = sub.add_parser("enroll", help="enroll one contact")
    enr.add_argument("campaign")
    enr.add_argument("contact")
    enr.add_argument("--attributes", default="{}", help="JSON object of attributes")
    enr.add_argument("--timezone", default=None, help="IANA zone of the contact")
    enr.add_argument("--node", default=None,
                     help="start at this node instead of the entry (moving a contact over)")  # fmt: skip
    enr.add_argument("--run-at", default=None, metavar="ISO8601",
                     help="due time at --node (a wait's deadline), with an offset")  # fmt: skip

    enf = sub.add_parser("enroll-file", help="enroll the contacts of a JSON-lines file")
    enf.add_argument("campaign")
    enf.add_argument(
        "file", type=Path, help='one {"contact_id": ..., "attributes": {...}} per line'
    )
    enf.add_argument("--batch", type=int, default=1000, help="contacts per round trip (1000)")

    imp = sub.add_parser(
        "import", help="import enrollments from a JSON-lines file (moving off another system)"
    )
    imp.add_argument("file", type=Path, help="rows of campaign_id, contact_id and optional "
                     "node, run_at, attributes, timezone")  # fmt: skip
    imp.add_argument("--batch", type=int, default=1000, help="rows per round trip (1000)")

    pur = sub.add_parser("purge", help="delete finished enrollments with their history")
    pur.add_argument("--finished-before", required=True, metavar="DURATION|DATE",
                     help="an ISO 8601 duration (finished more than that long ago; PT0S: all) "
                     "or an instant with an offset")  # fmt: skip
    pur.add_argument("--campaign", default=None, help="only this campaign")
    pur.add_argument("--dry-run", action="store_true", help="count, delete nothing")

    sig = sub.add_parser("signal", help="deliver an event to an enrollment")
    sig.add_argument("enrollment")
    sig.add_argument("event")
    sig.add_argument("--payload", default="{}", help="JSON object")

    st = sub.add_parser("status", help="show an enrollment and its history")
    st.add_argument("enrollment")
    st.add_argument("--json", action="store_true", help="print JSON")

    can = sub.add_parser("cancel", help="cancel an enrollment")
    can.add_argument("enrollment")
    can.add_argument("--reason", default="", help="recorded in the history")

    rep = sub.add_parser("replay", help="replay a failed enrollment, or a whole failure group")
    target = rep.add_mutually_exclusive_group(required=True)
    target.add_argument("enrollment", nargs="?", help="enrollment id")
    target.add_argument("--group", help="CAMPAIGN:NODE:ERROR, as listed by 'failures'")

    rep.add_argument("--to-version", type=int, default=None, metavar="N",
                     help="replay on this version of the campaign (a fixed definition)")  # fmt: skip

    mig = sub.add_parser("migrate", help="move enrollments to another version of their campaign")
    mig.add_argument("campaign")
    mig.add_argument("--to-version", type=int, required=True, metavar="N")
    mig.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                     help="put enrollments at node OLD at node NEW (repeatable)")  # fmt: skip
    mig.add_argument("--state", action="append", default=None, choices=["failed", "scheduled", "waiting"],
                     help="only enrollments in this state (repeatable; default all three)")  # fmt: skip
    mig.add_argument("--dry-run", action="store_true", help="report, change nothing")

    fail = sub.add_parser("failures", help="failed enrollments grouped by campaign, node and error")
    fail.add_argument("--campaign", default=None)
    fail.add_argument("--limit", type=int, default=50, help="groups to show (50)")

    dl = sub.add_parser("dead-letters", help="poison jobs dropped from the queue")
    dl.add_argument("--limit", type=int, default=20, help="letters to show (20)")
    dl_action = dl.add_mutually_exclusive_group()
    dl_action.add_argument("--requeue", nargs="?", const="", default=None, metavar="ID",
                           help="re-create the job of the enrollment a letter's job id names, "
                           "and drop the letter (ID, or --all)")  # fmt: skip
    dl_action.add_argument("--purge", action="store_true", help="delete every dead letter")
    dl.add_argument("--all", action="store_true", help="with --requeue: every letter")

    sub.add_parser(
        "info", help="the queue per shard, workers alive, campaigns with counts by state"
    )

    ls = sub.add_parser(
        "list", help="a campaign's enrollments, one 'id<TAB>state<TAB>node' line each"
    )
    ls.add_argument("campaign")
    ls.add_argument("--state", default=None,
                    help=f"only enrollments in this state: {', '.join(s.value for s in State)}")  # fmt: skip
    ls.add_argument("--node", default=None, help="only enrollments at this node")
    ls.add_argument("--limit", type=int, default=100, help="enrollments to list, 1 to 1000 (100)")
    ls.add_argument("--cursor", default=None,
                    help="go on from the 'next:' cursor a previous list printed")  # fmt: skip

    for command in sub.choices.values():  # every subcommand takes it too; SUPPRESS keeps
        command.add_argument(  # a value given before the subcommand
            "--redis-url", metavar="URL", default=argparse.SUPPRESS, help=_REDIS_URL_HELP
        )
    return parser


_REDIS_URL_HELP = "Redis to use (overrides REDIS_URL)"


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise CampaignError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise CampaignError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CampaignError(f"{name}: must be a JSON object")
    return value


async def _with_client(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    from redis.exceptions import RedisError

    from app.client import CampaignClient
    from app.connection import REDIS_DOWN_ERRORS

    client = CampaignClient(settings=settings)
    try:
        await client.connect()  # cluster or not, and the shard count, before any command
        return await fn(client)
    except BrokenPipeError:
        raise  # our reader went away (``| head``): not Redis; main() exits quietly
    except REDIS_DOWN_ERRORS as exc:
        print(
            f"campaign-worker: redis unreachable at {settings.redacted_redis_url()}: {exc}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except RedisError as exc:  # up but refusing: OOM, MISCONF, READONLY, NOPERM...
        print(f"campaign-worker: redis refused the command: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    finally:
        await client.close()


def _admin(args: argparse.Namespace, settings: Settings) -> int:
    from worker import admin

    out = sys.stdout
    cmd = args.command
    if cmd == "ping":
        return asyncio.run(admin.ping_workers(settings, args.timeout))
    if cmd == "register":
        return asyncio.run(_with_client(settings, lambda c: admin.register(c, args.file, out)))
    if cmd == "enroll":
        attrs = _json_object(args.attributes, "--attributes")
        return asyncio.run(_with_client(
            settings, lambda c: admin.enroll(c, args.campaign, args.contact, attrs, args.timezone,
                                             out, node=args.node, run_at=args.run_at)))  # fmt: skip
    if cmd == "import":
        from worker.importer import import_file

        if not 1 <= args.batch <= 100_000:
            raise CampaignError("--batch must be from 1 to 100000")
        return asyncio.run(_with_client(
            settings, lambda c: import_file(c, args.file, args.batch, out)))  # fmt: skip
    if cmd == "enroll-file":
        return asyncio.run(_with_client(
            settings, lambda c: admin.enroll_file(c, args.campaign, args.file, args.batch, out)))  # fmt: skip
    if cmd == "purge":
        before = admin.parse_finished_before(args.finished_before)
        return asyncio.run(_with_client(settings, lambda c: admin.purge(
            c, before, args.campaign, args.dry_run, out)))  # fmt: skip
    if cmd == "signal":
        payload = _json_object(args.payload, "--payload")

        async def signal(c: Any) -> int:
            ok = await c.signal(args.enrollment, args.event, payload)
            print(
                "delivered"
                if ok
                else f"not delivered: {args.enrollment} is not waiting for {args.event!r}"
            )
            return 0 if ok else EXIT_ERROR

        return asyncio.run(_with_client(settings, signal))
    if cmd == "status":
        return asyncio.run(
            _with_client(settings, lambda c: admin.show_status(c, args.enrollment, args.json, out))
        )
    if cmd == "cancel":

        async def cancel(c: Any) -> int:
            ok = await c.cancel(args.enrollment, args.reason)
            print("cancelled" if ok else f"not cancelled: {args.enrollment} had already ended")
            return 0 if ok else EXIT_ERROR

        return asyncio.run(_with_client(settings, cancel))
    if cmd == "replay":
        return asyncio.run(
            _with_client(
                settings,
                lambda c: admin.replay(
                    c, args.enrollment, args.group, out, to_version=args.to_version
                ),
            )
        )
    if cmd == "migrate":
        mapping = admin.parse_maps(args.map)
        return asyncio.run(_with_client(settings, lambda c: admin.migrate(
            c, args.campaign, args.to_version, mapping, args.state, args.dry_run, out)))  # fmt: skip
    if cmd == "failures":
        return asyncio.run(
            _with_client(settings, lambda c: admin.failures(c, args.campaign, args.limit, out))
        )
    if cmd == "dead-letters":
        if args.requeue is not None or args.purge or args.all:
            return asyncio.run(_with_client(settings, lambda c: admin.dead_letter_action(
                c, args.requeue, args.all, args.purge, out)))  # fmt: skip
        return asyncio.run(_with_client(settings, lambda c: admin.dead_letters(c, args.limit, out)))
    if cmd == "info":
        return asyncio.run(_with_client(settings, lambda c: admin.info(c, out)))
    if cmd == "list":
        return asyncio.run(_with_client(settings, lambda c: admin.list_enrollments(
            c, args.campaign, args.state, args.node, args.limit, args.cursor, out, sys.stderr)))  # fmt: skip
    raise AssertionError(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    Output piped to a reader that stops early (``campaign-worker status X | head -1``)
    ends the command quietly with exit code 141, as SIGPIPE would: no traceback, no
    message.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit does not raise again (the
    way the Python documentation handles SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or closed
        pass


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    try:
        if args.redis_url is not None:
            try:
                settings = Settings.load(redis_url=args.redis_url)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("REDIS_URL:", "--redis-url:", 1)) from None
        else:
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
        if args.command == "api":
            from worker.api.server import run_api

            return asyncio.run(run_api(settings))
        if args.command == "demo":
            from worker.demo import run_demo

            if "CAMPAIGN_LOG_LEVEL" not in os.environ:
                configure_logging("WARNING", settings.log_format)  # keep the progress readable
            if args.redis_url is not None:  # the demo runs its own Redis unless REDIS_URL is set
                os.environ["REDIS_URL"] = args.redis_url
            return asyncio.run(run_demo(settings, contacts=args.contacts, reply_rate=args.reply_rate,
                                        seed=args.seed, campaign_path=args.campaign,
                                        console=args.console))  # fmt: skip
        return _admin(args, settings)
    except ConfigError as exc:
        print(f"campaign-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CampaignError as exc:
        print(f"campaign-worker: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
