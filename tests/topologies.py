"""Real local Redis topologies for the tests: a Redis Cluster and a Sentinel setup.

Both are built from the same ``redis-server``/``redis-cli`` binaries the rest of the suite
uses, on free loopback ports, with short timeouts so a failover takes seconds, not minutes:

- ``start_cluster(base_dir)`` -> ``LocalCluster``: N masters with M replicas each, created
  with ``redis-cli --cluster create``;
- ``start_sentinel(base_dir)`` -> ``LocalSentinel``: 1 master, 1 replica and 3 sentinels.

Every wait is a poll with a deadline; a timeout raises ``TopologyError`` with each server's
last answer and the tail of its log. Every server started here is killed by ``close()`` (the
fixtures and ``with`` blocks call it) and, failing that, at interpreter exit.

The fixtures ``redis_cluster`` and ``redis_sentinel`` (function scope, in the test's
``tmp_path``) are defined here and re-exported by ``tests/conftest.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.embedded_redis import EmbeddedRedis, free_port

__all__ = [
    "CLUSTER_SLOTS",
    "ClusterNode",
    "LocalCluster",
    "LocalSentinel",
    "TopologyError",
    "redis_cluster",
    "redis_sentinel",
    "start_cluster",
    "start_sentinel",
]

CLUSTER_SLOTS = 16384
HOST = "127.0.0.1"

#: Every server started here and not killed yet: killed at interpreter exit if a test
#: (or a crashed fixture) did not get to ``close()``.
_LIVE: set[EmbeddedRedis] = set()


def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()
    _LIVE.clear()


atexit.register(_kill_leftovers)


class TopologyError(RuntimeError):
    """A local cluster or sentinel setup did not start, form or fail over in time."""


# -- helpers ---------------------------------------------------------------------------------


def _client(port: int, timeout: float = 1.0) -> redis.Redis:
    """A short-lived synchronous client on one server (strings, short timeouts)."""
    return redis.Redis(
        host=HOST,
        port=port,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def _call(port: int, *args: str | int) -> Any:
    """One raw command (no redis-py reply parsing) on one server."""
    with _client(port) as r:
        return r.execute_command(*args)


def _info(port: int, section: str) -> dict[str, Any]:
    """``INFO <section>`` of one server, as redis-py parses it (numbers as numbers)."""
    with _client(port) as r:
        return dict(r.info(section))


def _info_lines(text: str) -> dict[str, str]:
    """``key:value`` lines of an INFO-like reply (CLUSTER INFO, INFO <section>)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


def _pairs(reply: list[Any]) -> dict[str, str]:
    """A flat ``[k1, v1, k2, v2, ...]`` reply (SENTINEL MASTER and friends) as a dict."""
    return {str(reply[i]): str(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}


def _log_tail(server: EmbeddedRedis, lines: int = 15) -> str:
    log = server.data_dir / "redis.log"
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait(
    check: Callable[[], str | None],
    timeout: float,
    what: str,
    diagnose: Callable[[], str],
    interval: float = 0.05,
) -> float:
    """Poll ``check`` (``None`` = done, else why not yet) until it passes or ``timeout``.

    Connection errors count as "not yet". Returns the seconds waited; raises
    ``TopologyError`` naming ``what``, the last reason and ``diagnose()`` on timeout.
    """
    start = time.monotonic()
    deadline = start + timeout
    reason = "never checked"
    while True:
        try:
            reason_or_none = check()
        except (redis.RedisError, OSError) as exc:
            reason_or_none = f"{type(exc).__name__}: {exc}"
        if reason_or_none is None:
            return time.monotonic() - start
        reason = reason_or_none
        if time.monotonic() >= deadline:
            raise TopologyError(
                f"{what}: not done after {timeout:.1f}s; last: {reason}\n{diagnose()}"
            )
        time.sleep(interval)


def _start_server(
    data_dir: Path, args: Callable[[], tuple[str, ...]], config: Path | None = None
) -> EmbeddedRedis:
    """Start one server on a ``free_port()``, retrying with new ports if one was taken
    between picking and binding (``args()`` is called per attempt, for fresh bus ports)."""
    last: Exception | None = None
    for _ in range(3):
        server = EmbeddedRedis(config=config, data_dir=data_dir, extra_args=args())
        try:
            server.start()
        except RuntimeError as exc:  # e.g. "Address already in use": try other ports
            last = exc
            server.kill()
            continue
        _LIVE.add(server)
        return server
    raise TopologyError(f"redis-server in {data_dir} did not start: {last}")


def _kill(server: EmbeddedRedis) -> None:
    _LIVE.discard(server)
    with contextlib.suppress(Exception):
        server.kill()


def _other_port(taken: set[int]) -> int:
    """A ``free_port()`` not in ``taken`` (it is added)."""
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


# -- Redis Cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One server of a ``LocalCluster``: its port, pid and current role.

    ``role`` is ``"master"`` or ``"replica"`` as the cluster reports it, or ``"dead"`` once
    ``kill()``-ed (``pid`` is then the pid it had).
    """

    port: int
    pid: int
    role: str


@dataclass(frozen=True)
class _NodeLine:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: int  # how many slots this node serves, in this view

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})


def _parse_nodes(text: str) -> list[_NodeLine]:
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0]  # ip:port@cport[,hostname]
        slots = 0
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated/imported
                continue
            low, _, high = item.partition("-")
            slots += int(high or low) - int(low) + 1
        nodes.append(
            _NodeLine(
                node_id=parts[0],
                port=int(address.rsplit(":", 1)[1]) if ":" in address else 0,
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                slots=slots,
            )
        )
    return nodes


class LocalCluster:
    """A running local Redis Cluster (see ``start_cluster``); a context manager.

    Ports are of the client port of each node; every query asks the live nodes, so the
    answers follow failovers.
    """

    def __init__(
        self,
        base_dir: Path,
        servers: list[EmbeddedRedis],
        masters: int,
        replicas: int,
        node_timeout_ms: int,
    ) -> None:
        self.base_dir = base_dir
        self.node_timeout_ms = node_timeout_ms
        self.expected_masters = masters
        self.expected_replicas = masters * replicas
        self._servers: dict[int, EmbeddedRedis] = {s.port: s for s in servers}
        self._order = [s.port for s in servers]
        self._pids: dict[int, int] = {
            s.port: s.process.pid for s in servers if s.process is not None
        }
        self._killed: set[int] = set()
        self._last_info: dict[int, str] = {}
        self.node_ids: dict[int, str] = {}
        self._master_at_start: dict[int, str] = {}  # replica port -> its master's node id
        self._seed = self._order[0]

    # -- what the tests use

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port of the first master at creation>/0``."""
        return f"redis://{HOST}:{self._seed}/0"

    @property
    def ports(self) -> list[int]:
        """Every node's port, killed or not, in start order."""
        return list(self._order)

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node with its pid and its role as the cluster reports it now."""
        roles = {n.port: ("master" if n.is_master else "replica") for n in self._view()}
        return [
            ClusterNode(
                port=port,
                pid=self._pids[port],
                role="dead" if port in self._killed else roles.get(port, "unknown"),
            )
            for port in self._order
        ]

    def alive(self) -> list[int]:
        """Ports of the nodes not killed."""
        return [p for p in self._order if p not in self._killed]

    def masters(self) -> list[int]:
        """Ports of the live masters serving slots, per CLUSTER NODES of a live node (in
        start order)."""
        return self._in_order(
            n.port
            for n in self._view()
            if n.is_master and n.slots and not n.failed and n.port not in self._killed
        )

    def replicas(self) -> list[int]:
        """Ports of the live replicas, per CLUSTER NODES of a live node (in start order)."""
        return self._in_order(
            n.port
            for n in self._view()
            if not n.is_master and not n.failed and n.port not in self._killed
        )

    def replicas_of(self, master_port: int) -> list[int]:
        """Ports of the live replicas of one master."""
        view = self._view()
        ids = {n.port: n.node_id for n in view}
        master_id = ids.get(master_port) or self.node_ids.get(master_port)
        return self._in_order(
            n.port
            for n in view
            if n.master_id == master_id and not n.failed and n.port not in self._killed
        )

    def keyslot(self, key: str) -> int:
        """CLUSTER KEYSLOT of ``key``."""
        return int(_call(self._live_port(), "CLUSTER", "KEYSLOT", key))

    def master_for_key(self, key: str) -> int:
        """Port of the master that owns ``key``'s slot (CLUSTER KEYSLOT + CLUSTER SLOTS)."""
        slot = self.keyslot(key)
        for entry in _call(self._live_port(), "CLUSTER", "SLOTS"):
            low, high, master = int(entry[0]), int(entry[1]), entry[2]
            if low <= slot <= high:
                return int(master[1])
        raise TopologyError(f"no master serves slot {slot} of {key!r}")

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would (AOF ``everysec``: up to ~1s of writes lost)."""
        server = self._servers[port]
        _kill(server)
        self._killed.add(port)

    def wait_failover(self, dead_port: int, timeout: float = 15.0) -> float:
        """Wait until a replica of the dead master ``dead_port`` is promoted and every
        surviving node sees it serving slots, the dead node failed, and ``cluster_state:ok``
        with all slots covered. Returns the seconds waited."""
        dead_id = self.node_ids[dead_port]
        former = {
            port
            for port, node_id in self.node_ids.items()
            if port not in self._killed and self._master_at_start.get(port) == dead_id
        }
        if not former:
            raise TopologyError(f"{dead_port} had no live replica to promote")

        def promoted() -> str | None:
            for port in self.alive():
                info = self._cluster_info(port)
                if info.get("cluster_state") != "ok":
                    return f"{port}: cluster_state:{info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                    return f"{port}: cluster_slots_ok:{info.get('cluster_slots_ok')}"
                view = {n.node_id: n for n in _parse_nodes(_call(port, "CLUSTER", "NODES"))}
                dead = view.get(dead_id)
                if dead is not None and ("fail" not in dead.flags or dead.slots):
                    return f"{port} sees {dead_port} as {','.join(sorted(dead.flags))}"
                if not any(
                    (n := view.get(self.node_ids[p])) is not None and n.is_master and n.slots
                    for p in former
                ):
                    return f"{port} does not yet see any of {sorted(former)} as a master"
            return None

        return _wait(promoted, timeout, f"failover of {dead_port}", self.diagnose)

    def command_stats(self) -> dict[int, dict[str, int]]:
        """Per live master: ``INFO commandstats`` as ``{command: calls}`` (``cluster|info``
        style names for subcommands)."""
        stats: dict[int, dict[str, int]] = {}
        for port in self.masters():
            stats[port] = {
                key.removeprefix("cmdstat_"): int(value["calls"])
                for key, value in _info(port, "commandstats").items()
                if key.startswith("cmdstat_")
            }
        return stats

    def reset_stats(self) -> None:
        """CONFIG RESETSTAT on every live node (zeroes ``command_stats()``)."""
        for port in self.alive():
            _call(port, "CONFIG", "RESETSTAT")

    def flushall(self) -> None:
        """FLUSHALL on every live master (replicas follow)."""
        for port in self.masters():
            _call(port, "FLUSHALL")

    def close(self) -> None:
        """SIGKILL every node and remove their directories."""
        for port, server in self._servers.items():
            _kill(server)
            self._killed.add(port)
        for server in self._servers.values():
            shutil.rmtree(server.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _in_order(self, ports: Iterable[int]) -> list[int]:
        wanted = set(ports)
        return [p for p in self._order if p in wanted]

    def _live_port(self) -> int:
        alive = self.alive()
        if not alive:
            raise TopologyError("every node of the cluster was killed")
        return self._seed if self._seed in alive else alive[0]

    def _view(self) -> list[_NodeLine]:
        """CLUSTER NODES from the first live node that answers."""
        last: Exception | None = None
        for port in self.alive():
            try:
                return _parse_nodes(_call(port, "CLUSTER", "NODES"))
            except (redis.RedisError, OSError) as exc:
                last = exc
        raise TopologyError(f"no live node answers CLUSTER NODES: {last}")

    def _cluster_info(self, port: int) -> dict[str, str]:
        text = _call(port, "CLUSTER", "INFO")
        self._last_info[port] = text
        return _info_lines(text)

    def diagnose(self) -> str:
        """Each node's last CLUSTER INFO (state, slots, known nodes), its CLUSTER NODES
        (live ones) and the tail of its log: for failure messages."""
        out = []
        for port in self._order:
            server = self._servers[port]
            status = "killed" if port in self._killed else "alive"
            info = _info_lines(self._last_info.get(port, ""))
            brief = " ".join(
                f"{k}:{info[k]}"
                for k in ("cluster_state", "cluster_slots_ok", "cluster_known_nodes")
                if k in info
            )
            nodes = ""
            if port not in self._killed:
                try:
                    nodes = _call(port, "CLUSTER", "NODES")
                except (redis.RedisError, OSError) as exc:
                    nodes = f"(CLUSTER NODES failed: {exc})"
            out.append(
                f"--- node {port} ({status}, id {self.node_ids.get(port, '?')[:8]}) "
                f"last CLUSTER INFO: {brief or '(none)'}\n{nodes.strip()}\n"
                f"log tail:\n{_log_tail(server)}"
            )
        return "\n".join(out)

    def _wait_formed(self, timeout: float) -> float:
        """Wait until every node says cluster_state:ok with all slots covered, sees the
        whole topology, and every replica's link to its master is up."""
        total = self.expected_masters + self.expected_replicas

        def formed() -> str | None:
            for port in self._order:
                info = self._cluster_info(port)
                if info.get("cluster_state") != "ok":
                    return f"{port}: cluster_state:{info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                    return f"{port}: cluster_slots_ok:{info.get('cluster_slots_ok')}"
                if info.get("cluster_known_nodes") != str(total):
                    return f"{port}: cluster_known_nodes:{info.get('cluster_known_nodes')}"
                view = _parse_nodes(_call(port, "CLUSTER", "NODES"))
                masters = [n for n in view if n.is_master and n.slots]
                replicas = [n for n in view if not n.is_master and n.master_id]
                wanted_replicas = len(self._order) - self.expected_masters
                if len(masters) != self.expected_masters or len(replicas) != wanted_replicas:
                    return f"{port} sees {len(masters)} masters, {len(replicas)} replicas"
                if any(n.failed for n in view):
                    return f"{port} sees a node failed or in handshake"
                me = next(n for n in view if "myself" in n.flags)
                if not me.is_master:
                    replication = _info(port, "replication")
                    if replication.get("master_link_status") != "up":
                        return f"replica {port}: master_link_status not up"
            return None

        waited = _wait(formed, timeout, "cluster forming", self.diagnose)
        view = self._view()
        self.node_ids = {n.port: n.node_id for n in view}
        self._master_at_start = {n.port: n.master_id for n in view if n.master_id}
        self._seed = next(p for p in self._order if p in {n.port for n in view if n.is_master})
        return waited


def start_cluster(
    base_dir: Path,
    masters: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 1000,
    timeout: float = 30.0,
) -> LocalCluster:
    """Start ``masters * (1 + replicas)`` cluster-enabled servers under ``base_dir`` and join
    them with ``redis-cli --cluster create``; return once every node reports the cluster ok.

    Timings favour quick failovers: ``cluster-node-timeout`` ``node_timeout_ms``, a replica
    may always fail over (``cluster-replica-validity-factor 0``), no replica migration, and
    diskless replication without delay so replicas sync at once.
    """
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        raise TopologyError("redis-cli is not on PATH (it comes with redis-server)")
    base_dir.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()

    def node_args() -> tuple[str, ...]:
        return (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-port", str(_other_port(taken)),  # the bus: port+10000 may be > 65535
            "--cluster-replica-no-failover", "no",
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            "--cluster-require-full-coverage", "yes",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--repl-ping-replica-period", "1",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
        )  # fmt: skip

    servers: list[EmbeddedRedis] = []
    try:
        for i in range(masters * (1 + replicas)):
            servers.append(_start_server(base_dir / f"node{i}", node_args))
        cluster = LocalCluster(base_dir, servers, masters, replicas, node_timeout_ms)
        create = [
            redis_cli, "--cluster", "create",
            *(f"{HOST}:{s.port}" for s in servers),
            "--cluster-replicas", str(replicas),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TopologyError(
                f"redis-cli --cluster create did not finish in {timeout}s: {exc.stdout!r}\n"
                f"{cluster.diagnose()}"
            ) from exc
        if done.returncode != 0:
            raise TopologyError(
                f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}\n"
                f"{done.stderr}\n{cluster.diagnose()}"
            )
        cluster._wait_formed(timeout)
        return cluster
    except BaseException:
        for server in servers:
            _kill(server)
            shutil.rmtree(server.data_dir, ignore_errors=True)
        raise


# -- Sentinel --------------------------------------------------------------------------------


class LocalSentinel:
    """A running master + replica watched by 3 sentinels (see ``start_sentinel``); a
    context manager."""

    def __init__(
        self,
        service: str,
        data: list[EmbeddedRedis],
        sentinels: list[EmbeddedRedis],
    ) -> None:
        self.service = service
        self._data: dict[int, EmbeddedRedis] = {s.port: s for s in data}
        self._sentinels: dict[int, EmbeddedRedis] = {s.port: s for s in sentinels}
        self._killed: set[int] = set()

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/<service>/0``."""
        hosts = ",".join(f"{HOST}:{port}" for port in self._sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def sentinels(self) -> list[int]:
        """The sentinels' ports."""
        return list(self._sentinels)

    @property
    def data_ports(self) -> list[int]:
        """The ports of the master and the replica as started (killed or not)."""
        return list(self._data)

    def master_port(self) -> int:
        """The master's port per the first sentinel that answers
        (SENTINEL GET-MASTER-ADDR-BY-NAME)."""
        last: Exception | None = None
        for port in self._live_sentinels():
            try:
                _, master = _call(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                return int(master)
            except (redis.RedisError, OSError, TypeError, ValueError) as exc:
                last = exc
        raise TopologyError(f"no sentinel answers for {self.service}: {last}")

    def replica_ports(self) -> list[int]:
        """Ports of the replicas a sentinel knows and does not consider down."""
        port = self._live_sentinels()[0]
        replicas = [_pairs(r) for r in _call(port, "SENTINEL", "REPLICAS", self.service)]
        return [
            int(r["port"])
            for r in replicas
            if "s_down" not in r.get("flags", "") and "disconnected" not in r.get("flags", "")
        ]

    def kill(self, port: int) -> None:
        """SIGKILL one server (a data node or a sentinel)."""
        _kill(self._data.get(port) or self._sentinels[port])
        self._killed.add(port)

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.kill(port)
        return port

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> float:
        """Wait until every live sentinel reports a master other than ``old_port`` and that
        server says ``role:master``. Returns the seconds waited."""

        def switched() -> str | None:
            seen = set()
            for port in self._live_sentinels():
                _, master = _call(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                seen.add(int(master))
            if len(seen) != 1:
                return f"sentinels disagree: {sorted(seen)}"
            (new,) = seen
            if new == old_port:
                return f"sentinels still report {old_port}"
            role = _info(new, "replication").get("role")
            if role != "master":
                return f"{new} says role:{role}"
            return None

        return _wait(switched, timeout, f"sentinel failover from {old_port}", self.diagnose)

    def close(self) -> None:
        """SIGKILL every server and remove their directories."""
        for server in [*self._sentinels.values(), *self._data.values()]:
            _kill(server)
            self._killed.add(server.port)
            shutil.rmtree(server.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_sentinels(self) -> list[int]:
        return [p for p in self._sentinels if p not in self._killed]

    def diagnose(self) -> str:
        """Each sentinel's view of the service and each server's log tail."""
        out = []
        for port, server in [*self._data.items(), *self._sentinels.items()]:
            kind = "sentinel" if port in self._sentinels else "redis"
            status = "killed" if port in self._killed else "alive"
            view = ""
            if port not in self._killed:
                try:
                    if kind == "sentinel":
                        master = _pairs(_call(port, "SENTINEL", "MASTER", self.service))
                        view = " ".join(
                            f"{k}={master.get(k)}"
                            for k in ("port", "flags", "num-slaves", "num-other-sentinels")
                        )
                    else:
                        repl = _info(port, "replication")
                        view = " ".join(
                            f"{k}={repl.get(k)}"
                            for k in ("role", "master_port", "master_link_status")
                        )
                except (redis.RedisError, OSError) as exc:
                    view = f"({type(exc).__name__}: {exc})"
            out.append(f"--- {kind} {port} ({status}) {view}\nlog tail:\n{_log_tail(server)}")
        return "\n".join(out)


def start_sentinel(
    base_dir: Path,
    service: str = "mymaster",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    timeout: float = 30.0,
) -> LocalSentinel:
    """Start a master, a replica of it and 3 sentinels (quorum 2) under ``base_dir``; return
    once every sentinel knows the master, the replica (link up) and the 2 other sentinels."""
    base_dir.mkdir(parents=True, exist_ok=True)
    data_args = (
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--repl-diskless-sync", "yes",
        "--repl-diskless-sync-delay", "0",
        "--repl-ping-replica-period", "1",
    )  # fmt: skip
    started: list[EmbeddedRedis] = []
    try:
        master = _start_server(base_dir / "master", lambda: data_args)
        started.append(master)
        replica = _start_server(
            base_dir / "replica", lambda: (*data_args, "--replicaof", HOST, str(master.port))
        )
        started.append(replica)

        # The replica in sync before the sentinels start: their first INFO of it sees the
        # link up (the next would be 10s later).
        def synced() -> str | None:
            link = _info(replica.port, "replication").get("master_link_status")
            return None if link == "up" else f"replica {replica.port}: master_link_status {link}"

        _wait(
            synced,
            timeout,
            "replica syncing",
            lambda: f"master log:\n{_log_tail(master)}\nreplica log:\n{_log_tail(replica)}",
        )
        sentinels = []
        for i in range(3):
            directory = base_dir / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"  # copied to <dir>/redis.conf, which it rewrites
            conf.write_text(
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {service} {HOST} {master.port} 2\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
            sentinel = _start_server(directory, lambda: ("--sentinel",), config=conf)
            started.append(sentinel)
            sentinels.append(sentinel)
        topology = LocalSentinel(service, [master, replica], sentinels)
        defaults: dict[str, str] = {}

        def known() -> str | None:
            for port in topology.sentinels:
                state = _pairs(_call(port, "SENTINEL", "MASTER", service))
                if state.get("port") != str(master.port) or state.get("flags") != "master":
                    return f"sentinel {port}: master {state.get('port')} {state.get('flags')}"
                others = [_pairs(o) for o in _call(port, "SENTINEL", "SENTINELS", service)]
                connected = [o for o in others if o.get("flags") == "sentinel"]
                if len(connected) != 2:
                    return f"sentinel {port} is connected to {len(connected)} other sentinels"
                replicas = [_pairs(r) for r in _call(port, "SENTINEL", "REPLICAS", service)]
                if not any(
                    r.get("port") == str(replica.port)
                    and r.get("flags") == "slave"
                    and r.get("master-link-status") == "ok"
                    for r in replicas
                ):
                    return f"sentinel {port} does not see replica {replica.port} in sync"
            return None

        # Sentinels find each other by hello messages every 2s and retry a refused
        # connection only after their 1s ping period. SENTINEL DEBUG (made for tests) sets
        # both to 100ms while they form; the hello period then goes back to its default,
        # the ping period stays short so a dead master is seen down `down_after_ms` after
        # its death, not up to a second later.
        # (SENTINEL DEBUG is Redis 7.0+: older sentinels just form at their own pace.)
        with contextlib.suppress(redis.ResponseError):
            defaults = _pairs(_call(sentinels[0].port, "SENTINEL", "DEBUG"))
            for sentinel in sentinels:
                _call(sentinel.port, "SENTINEL", "DEBUG", "PUBLISH-PERIOD", 100, "PING-PERIOD", 100)
        _wait(known, timeout, "sentinels discovering each other", topology.diagnose)
        if defaults:
            for sentinel in sentinels:
                _call(
                    sentinel.port, "SENTINEL", "DEBUG", "PUBLISH-PERIOD", defaults["PUBLISH-PERIOD"]
                )
        return topology
    except BaseException:
        for server in started:
            _kill(server)
            shutil.rmtree(server.data_dir, ignore_errors=True)
        raise


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A 3-master, 3-replica Redis Cluster of the test's own (killed afterwards)."""
    with start_cluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    """A master, a replica and 3 sentinels of the test's own (killed afterwards)."""
    with start_sentinel(tmp_path / "sentinel") as topology:
        yield topology
