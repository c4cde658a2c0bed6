"""Redis key names, in one place so that the client, the worker and the scripts agree.

Every key starts with ``CAMPAIGN_KEY_PREFIX``. The keys of one enrollment (its record,
history, state index entries) and of its jobs (queue, leases, payloads, dead letters) live
in one *shard*, whose keys share a Redis Cluster hash tag (``{<n>}``), so every script
touches one slot. Campaign definitions live in a slot of their own (``{c}``).

    <prefix>:{<n>}:queue            ZSET job id -> due time (epoch ms)
    <prefix>:{<n>}:leases           ZSET job id -> lease expiry (epoch ms) of running jobs
    <prefix>:{<n>}:jobs             HASH job id -> payload (arq's JSON job format)
    <prefix>:{<n>}:dead             LIST dead letters (newest first, capped)
    <prefix>:{<n>}:enr:<id>         HASH one enrollment's record
    <prefix>:{<n>}:hist:<id>        LIST its history (capped)
    <prefix>:{<n>}:idx:<c>:<state>  SET enrollment ids of campaign <c> in <state>
    <prefix>:{<n>}:purged           HASH enrollment id -> last step of a purged enrollment
    <prefix>:{c}:campaign:<c>       HASH a campaign's versions
    <prefix>:{c}:campaigns          SET campaign ids
    <prefix>:workers                ZSET worker id -> last heartbeat (epoch s)
    <prefix>:shards                 STRING the shard count the data was written with
    <prefix>:reconcile              STRING where the reconciler's walk stopped
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property

__all__ = ["Keys", "ShardKeys"]


@dataclass(frozen=True)
class ShardKeys:
    """Key names of one shard (one hash tag)."""

    prefix: str
    shard: int

    @cached_property
    def base(self) -> str:
        """Common start of this shard's keys, hash tag included."""
        return f"{self.prefix}:{{{self.shard}}}:"

    @property
    def queue(self) -> str:
        """Due campaign jobs: job id -> due time in epoch ms."""
        return self.base + "queue"

    @property
    def leases(self) -> str:
        """Running campaign jobs: job id -> lease expiry in epoch ms."""
        return self.base + "leases"

    @property
    def jobs(self) -> str:
        """Job payloads: job id -> arq-format JSON."""
        return self.base + "jobs"

    @property
    def dead(self) -> str:
        """Dead letters: jobs dropped without running, with their reason."""
        return self.base + "dead"

    @property
    def tombstones(self) -> str:
        """Purged enrollments: enrollment id -> the last step it reached. An enrollment
        created again with that id goes on from there, so its idempotency keys
        (``{enrollment_id}:{step}``) never repeat."""
        return self.base + "purged"

    def enrollment(self, enrollment_id: str) -> str:
        """Hash holding one enrollment's record."""
        return f"{self.base}enr:{enrollment_id}"

    def history(self, enrollment_id: str) -> str:
        """List of one enrollment's transitions, newest last, capped."""
        return f"{self.base}hist:{enrollment_id}"

    def state_index(self, campaign_id: str, state: str) -> str:
        """Set of enrollment ids of a campaign in a state."""
        return f"{self.base}idx:{campaign_id}:{state}"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``CAMPAIGN_KEY_PREFIX``) and shard count."""

    prefix: str = "campaign"
    shards: int = 1

    def shard_of(self, enrollment_id: str) -> int:
        """The shard an enrollment lives in: a stable hash of its id."""
        if self.shards == 1:
            return 0
        return zlib.crc32(enrollment_id.encode("utf-8", "surrogatepass")) % self.shards

    def shard(self, n: int) -> ShardKeys:
        """Key names of shard ``n``."""
        return ShardKeys(self.prefix, n)

    def for_enrollment(self, enrollment_id: str) -> ShardKeys:
        """Key names of the shard holding ``enrollment_id``."""
        return self.shard(self.shard_of(enrollment_id))

    def all_shards(self) -> list[ShardKeys]:
        """Every shard, in order."""
        return [self.shard(n) for n in range(self.shards)]

    # -- keys outside the shards ---------------------------------------------------------

    @property
    def campaigns(self) -> str:
        """Set of registered campaign ids."""
        return f"{self.prefix}:{{c}}:campaigns"

    def campaign(self, campaign_id: str) -> str:
        """Hash of a campaign's versions: ``latest`` and ``v:<n>`` -> definition JSON."""
        return f"{self.prefix}:{{c}}:campaign:{campaign_id}"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (epoch seconds)."""
        return f"{self.prefix}:workers"

    @property
    def reconcile_cursor(self) -> str:
        """Where the reconciler's walk stopped (it goes on from there next run)."""
        return f"{self.prefix}:reconcile"

    @property
    def shard_count(self) -> str:
        """The ``CAMPAIGN_SHARDS`` this deployment's data was written with."""
        return f"{self.prefix}:shards"

    # -- shortcuts to the keys of one enrollment, in its own shard -------------------------

    def enrollment(self, enrollment_id: str) -> str:
        """Hash holding one enrollment's record."""
        return self.for_enrollment(enrollment_id).enrollment(enrollment_id)

    def history(self, enrollment_id: str) -> str:
        """List of one enrollment's transitions."""
        return self.for_enrollment(enrollment_id).history(enrollment_id)
