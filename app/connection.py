"""Redis connections shared by the client and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import serialization
from app.keys import Keys
from app.settings import (
    SENTINEL_SCHEMES,
    ConfigError,
    SentinelURL,
    Settings,
    parse_sentinel_url,
)

__all__ = [
    "REDIS_DOWN_ERRORS",
    "arq_redis",
    "check_shard_count",
    "close_redis",
    "connect",
    "connection_options",
    "create_redis",
    "is_cluster",
    "open_redis",
    "retarget",
    "wait_for_redis",
]

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now" (as opposed to a bad command).
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

_WAIT_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, RedisError)


#: Connection options that only TCP connections accept (a unix socket refuses them).
_TCP_ONLY = frozenset({"socket_keepalive", "socket_keepalive_options", "socket_type"})


def connection_options(url: str, **overrides: Any) -> dict[str, Any]:
    """The redis-py connection options for ``url``'s scheme, then ``overrides``.

    TCP keepalive applies to ``redis://`` and ``rediss://`` only (a unix socket connection
    refuses the option), and the TLS hostname check to ``rediss://`` only.
    """
    scheme = urlsplit(url).scheme
    options: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        # A command that hangs (a stalled or paused server) must fail rather than hold a
        # job until arq's timeout drops it. No command we send blocks by design.
        "socket_timeout": 10.0,
        "health_check_interval": 15,
    }
    if scheme in {"redis", "rediss"}:
        options["socket_keepalive"] = True
    if scheme == "rediss":
        options["ssl_check_hostname"] = True
    options.update(overrides)
    if scheme == "unix":
        options = {k: v for k, v in options.items() if k not in _TCP_ONLY}
    return options


def create_redis(settings: Settings, **kwargs: Any) -> ArqRedis:
    """An arq-capable Redis client for ``REDIS_URL`` with JSON job serialization.

    ``from_url`` understands auth, ``rediss://`` (TLS, hostname checked) and ``unix://``.
    Nothing is connected until the first command.
    """
    url = settings.redis_url.get_secret_value()
    redis: ArqRedis
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        redis = _sentinel_master(parse_sentinel_url(url), **kwargs)
    else:
        redis = ArqRedis.from_url(url, **connection_options(url, **kwargs))
    _configure(redis, settings)
    return redis


def _sentinel_master(address: SentinelURL, **overrides: Any) -> ArqRedis:
    """A client of the master the sentinels name; after a failover, its next connection
    goes to the new master (redis-py's ``SentinelConnectionPool``)."""
    from redis.asyncio.sentinel import Sentinel

    scheme = "rediss" if address.tls else "redis"
    options = connection_options(f"{scheme}://", **overrides)
    params = dict(address.params)
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in params:
            options[name] = float(params.pop(name))
    if "health_check_interval" in params:
        options["health_check_interval"] = int(params.pop("health_check_interval"))
    sentinel_auth = {"username": params.pop("sentinel_username", None),
                     "password": params.pop("sentinel_password", None)}  # fmt: skip
    tls: dict[str, Any] = {"ssl": True} if address.tls else {}
    for name in list(params):
        if name.startswith("ssl_"):
            tls[name] = params.pop(name)
    options.update(params)  # client_name
    sentinel_options = {k: v for k, v in options.items()
                        if k in {"socket_timeout", "socket_connect_timeout", "socket_keepalive"}}  # fmt: skip
    sentinel_options.update({k: v for k, v in sentinel_auth.items() if v}, **tls)
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_options,  # type: ignore[no-untyped-call]
                        username=address.username, password=address.password, db=address.db,
                        **options, **tls)  # fmt: skip
    redis: ArqRedis = sentinel.master_for(address.service, redis_class=ArqRedis)
    return redis


def is_cluster(redis: object) -> bool:
    """Whether ``redis`` is a Redis Cluster client (see :func:`open_redis`)."""
    return isinstance(redis, RedisCluster)


async def open_redis(settings: Settings, redis: ArqRedis | None = None) -> ArqRedis:
    """A client in the mode the server at ``REDIS_URL`` runs in: when it is a node of a Redis
    Cluster, a cluster client (``redis`` is closed), else ``redis`` (or a new one).

    One ``INFO cluster`` round trip; raises the connection error when Redis is down, and
    :class:`~app.settings.ConfigError` for a database other than 0 on a cluster."""
    redis = redis if redis is not None else create_redis(settings)
    url = settings.redis_url.get_secret_value()
    if is_cluster(redis) or urlsplit(url).scheme not in {"redis", "rediss"}:
        return redis
    try:
        info = await redis.info("cluster")
    except ResponseError as exc:
        raise_for_cluster_db(exc)
        raise
    if not int(info.get("cluster_enabled") or 0):
        return redis
    await redis.aclose()
    cluster = RedisCluster.from_url(url, **connection_options(url))
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    # RedisCluster serves every command the service sends (scripts, pipelines without
    # MULTI, reads): typed as ArqRedis so the code that uses it has one client type.
    return cast(ArqRedis, cluster)


def raise_for_cluster_db(exc: BaseException) -> None:
    """A connection with a database other than 0 to a cluster node fails on its SELECT:
    raise :class:`ConfigError` for it (nothing else says so; redis-py names it only in the
    message), else return."""
    if isinstance(exc, ResponseError) and "SELECT is not allowed in cluster mode" in str(exc):
        raise ConfigError("REDIS_URL: a Redis Cluster has database 0 only; use /0") from None


async def close_redis(redis: ArqRedis) -> None:
    """Close a client and what it holds: a Sentinel client's connections to the sentinels
    too (closing the master's client leaves them open)."""
    pool = redis.connection_pool if not is_cluster(redis) else None
    await redis.aclose()
    manager = getattr(pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        with contextlib.suppress(Exception):
            await sentinel.aclose()


async def check_shard_count(redis: ArqRedis, settings: Settings, *, record: bool = False) -> None:
    """Raise :class:`ConfigError` when Redis holds data written with another
    ``CAMPAIGN_SHARDS`` (its enrollments would be looked for in the wrong shards);
    ``record`` stores the count when none is (a worker's first start)."""
    key = Keys(settings.key_prefix).shard_count
    raw = await redis.get(key)
    if raw is None and record:  # written once: a full Redis refuses writes, not reads
        await redis.set(key, settings.shards, nx=True)
        raw = await redis.get(key)
    recorded = raw.decode("utf-8", "replace") if raw is not None else str(settings.shards)
    if recorded != str(settings.shards):
        raise ConfigError(
            f"CAMPAIGN_SHARDS: this Redis holds {recorded[:20]} shard(s) under prefix "
            f"{settings.key_prefix!r} (key {key}), not {settings.shards}"
        )


class _SlotMasterPool(ConnectionPool):
    """Connections to the master that serves one hash slot of a cluster. :meth:`locate`
    asks the cluster which node that is now (after a failover); until then the cluster
    client's slot map says."""

    def __init__(self, cluster: RedisCluster, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cluster = cluster
        self._key = key
        self._slot = key_slot(key.encode())
        self._master: tuple[str, int] | None = None

    def make_connection(self) -> Any:
        if self._master is None:
            node = self._cluster.get_node_from_key(self._key)
            if node is None:
                raise RedisConnectionError(f"no node serves the slot of {self._key!r}")
            self._master = (node.host, int(node.port))
        host, port = self._master
        self.connection_kwargs.update(host=host, port=port)
        return super().make_connection()  # type: ignore[no-untyped-call]

    async def locate(self) -> None:
        """Ask the nodes the cluster client knows (CLUSTER SLOTS) which master serves the
        slot now. Its own slot map is left to redis-py: refreshing it from here would race
        with the refresh redis-py starts after an error."""
        options = {k: v for k, v in self.connection_kwargs.items() if k not in {"host", "port"}}
        for node in list(self._cluster.get_nodes()):  # a snapshot: the map may change
            probe = Redis(connection_pool=ConnectionPool(
                **{**options, "host": node.host, "port": node.port}))  # fmt: skip
            try:
                ranges = await probe.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                continue
            finally:
                await probe.aclose()
                await probe.connection_pool.disconnect()
            for start, end, master, *_replicas in ranges:
                if int(start) <= self._slot <= int(end):
                    host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                    self._master = (host or node.host, int(master[1]))
                    return


async def retarget(redis: ArqRedis) -> None:
    """Drop the connections of an :func:`arq_redis` client of a cluster, so that the next
    ones go to the master that serves its slot now."""
    pool = redis.connection_pool
    if isinstance(pool, _SlotMasterPool):
        await pool.locate()
        with contextlib.suppress(Exception):
            await pool.disconnect()
        pool.reset()  # type: ignore[no-untyped-call]


def arq_redis(settings: Settings, redis: ArqRedis) -> ArqRedis:
    """The connection arq uses (its queue, ping, maintenance jobs): ``redis`` itself on one
    server; on a cluster, a plain client of the master that serves arq's hash tag, since
    arq's transactions (WATCH/MULTI) need one node. Raises :class:`ConfigError` when
    ``CAMPAIGN_QUEUE_NAME`` has no hash tag on a cluster."""
    if not isinstance(redis, RedisCluster):
        return redis
    queue = settings.arq_queue
    if key_slot(queue.encode()) != key_slot(b"arq:abort"):
        raise ConfigError(
            f"CAMPAIGN_QUEUE_NAME: on Redis Cluster arq's queue must hold the hash tag "
            f"{{arq:abort}} (arq's fixed key arq:abort must share its slot), e.g. "
            f"{settings.key_prefix}:{{arq:abort}}, not {queue!r}"
        )
    url = settings.redis_url.get_secret_value()
    kwargs = {**parse_url(url), **connection_options(url)}
    kwargs.pop("db", None)
    pool = _SlotMasterPool(redis, queue, **kwargs)
    client = cast(ArqRedis, ArqRedis.from_pool(pool))  # closing the client closes the pool
    _configure(client, settings)
    return client


def _configure(redis: ArqRedis, settings: Settings) -> None:
    redis.job_serializer = serialization.dumps
    redis.job_deserializer = serialization.loads
    redis.default_queue_name = settings.arq_queue
    redis.expires_extra_ms = int(settings.job_expiry_extra * 1000)


async def wait_for_redis(
    redis: ArqRedis,
    *,
    backoff_max: float,
    stop: asyncio.Event | None = None,
    on_attempt: Callable[[int, BaseException], None] | None = None,
) -> bool:
    """PING until Redis answers, backing off exponentially up to ``backoff_max`` seconds.

    Returns False if ``stop`` was set first.
    """
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            await redis.ping()
            return True
        except _WAIT_ERRORS as exc:
            raise_for_cluster_db(exc)  # waiting would not help
            if on_attempt is not None:
                on_attempt(attempt, exc)
        if stop is not None:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return False
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max)


async def connect(settings: Settings) -> ArqRedis:
    """Create a client and check it answers (raises the connection error if not)."""
    redis = create_redis(settings)
    try:
        await redis.ping()
    except BaseException:
        await redis.aclose()
        raise
    return redis
