"""The local Redis Cluster and Sentinel setups of tests/topologies.py form, route keys and
fail over (checked with redis-py's synchronous clients, not the product code)."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster

from tests.topologies import (
    CLUSTER_SLOTS,
    LocalCluster,
    LocalSentinel,
    TopologyError,
)


def test_cluster_forms_with_three_masters_and_routes_by_hash_tag(
    redis_cluster: LocalCluster,
) -> None:
    masters, replicas = redis_cluster.masters(), redis_cluster.replicas()
    assert len(masters) == 3
    assert len(replicas) == 3
    assert set(masters) | set(replicas) == set(redis_cluster.ports)
    assert sorted(len(redis_cluster.replicas_of(m)) for m in masters) == [1, 1, 1]
    nodes = redis_cluster.nodes
    assert sorted(n.role for n in nodes) == ["master"] * 3 + ["replica"] * 3
    assert all(n.pid > 0 for n in nodes)
    assert redis_cluster.url == f"redis://127.0.0.1:{masters[0]}/0"
    for port in redis_cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port, decode_responses=True) as r:
            info = r.cluster("INFO")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_ok"]) == CLUSTER_SLOTS

    # (One test, not two: each cluster takes ~2s to form.)
    owners = {redis_cluster.master_for_key(f"{{shard:3}}:{part}") for part in ("q", "job", "e")}
    assert len(owners) == 1
    assert owners <= set(redis_cluster.masters())
    spread = {redis_cluster.master_for_key(f"{{{i}}}") for i in range(8)}
    assert len(spread) > 1, spread

    with RedisCluster.from_url(redis_cluster.url, decode_responses=True) as client:
        for i in range(8):
            client.set(f"{{{i}}}:k", str(i))
        assert [client.get(f"{{{i}}}:k") for i in range(8)] == [str(i) for i in range(8)]
        client.set("{shard:3}:a", "1")
        client.set("{shard:3}:b", "2")
        assert client.mget("{shard:3}:a", "{shard:3}:b") == ["1", "2"]  # one slot: one call

    # Each key sits on the master master_for_key names (asked without redirection).
    owner = redis_cluster.master_for_key("{shard:3}:a")
    with redis.Redis(host="127.0.0.1", port=owner, decode_responses=True) as direct:
        assert direct.get("{shard:3}:a") == "1"
    stats = redis_cluster.command_stats()
    assert set(stats) == set(redis_cluster.masters())
    assert sum(calls.get("set", 0) for calls in stats.values()) == 10
    assert sum(1 for calls in stats.values() if calls.get("set")) > 1


def test_cluster_promotes_the_replica_of_a_killed_master(redis_cluster: LocalCluster) -> None:
    victim = redis_cluster.masters()[-1]  # not the one in .url
    key = next(
        f"{{{i}}}:k" for i in range(100) if redis_cluster.master_for_key(f"{{{i}}}") == victim
    )
    (heir,) = redis_cluster.replicas_of(victim)
    with redis.Redis(host="127.0.0.1", port=victim, decode_responses=True) as direct:
        direct.set(key, "before")
        assert direct.execute_command("WAIT", 1, 2000) == 1  # on the replica before the kill

    redis_cluster.kill(victim)
    # Nothing can notice a death before cluster-node-timeout: a wait that short times out,
    # and says what it saw.
    with pytest.raises(TopologyError) as failed:
        redis_cluster.wait_failover(victim, timeout=0.01)
    assert "last CLUSTER INFO" in str(failed.value)
    assert "log tail" in str(failed.value)

    waited = redis_cluster.wait_failover(victim, timeout=20)
    print(f"cluster failover took {waited:.2f}s (cluster-node-timeout 1000ms)")

    assert redis_cluster.masters() == sorted(redis_cluster.masters(), key=redis_cluster.ports.index)
    assert victim not in redis_cluster.masters()
    assert heir in redis_cluster.masters()
    assert len(redis_cluster.masters()) == 3
    assert redis_cluster.master_for_key(key) == heir
    assert {n.port: n.role for n in redis_cluster.nodes}[victim] == "dead"
    with RedisCluster.from_url(redis_cluster.url, decode_responses=True) as client:
        assert client.get(key) == "before"
        client.set(key, "after")
        assert client.get(key) == "after"


def test_sentinel_reports_the_master_then_the_promoted_replica(
    redis_sentinel: LocalSentinel,
) -> None:
    sentinels = ",".join(f"127.0.0.1:{p}" for p in redis_sentinel.sentinels)
    assert redis_sentinel.url == f"redis+sentinel://{sentinels}/mymaster/0"
    master = redis_sentinel.master_port()
    (replica,) = redis_sentinel.replica_ports()
    assert {master, replica} == set(redis_sentinel.data_ports)
    with redis.Redis(host="127.0.0.1", port=master, decode_responses=True) as r:
        assert r.info("replication")["role"] == "master"
        r.set("k", "v")
        assert r.execute_command("WAIT", 1, 2000) == 1

    old = redis_sentinel.kill_master()
    assert old == master
    waited = redis_sentinel.wait_failover(old, timeout=20)
    print(f"sentinel failover took {waited:.2f}s (down-after 1000ms)")

    assert redis_sentinel.master_port() == replica
    for port in redis_sentinel.sentinels:
        with redis.Redis(host="127.0.0.1", port=port, decode_responses=True) as s:
            host, reported = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            assert (host, int(reported)) == ("127.0.0.1", replica)
    with redis.Redis(host="127.0.0.1", port=replica, decode_responses=True) as r:
        assert r.info("replication")["role"] == "master"
        assert r.get("k") == "v"
        r.set("k", "w")
