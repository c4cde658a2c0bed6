"""Campaign registry in Redis: registering an id again makes a new, immutable version."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import orjson
from arq.connections import ArqRedis

from app.campaigns import Campaign, Limits, load_campaign, parse_campaign
from app.errors import CampaignNotFound, CorruptRecord, InvalidRequest
from app.keys import Keys
from app.store import load_script

__all__ = ["CampaignRegistry"]

#: How long a process goes on enrolling into the version it last saw as the latest, after
#: another process registered a newer one (this process's own registrations count at once).
LATEST_TTL = 1.0
_CACHE_SIZE = 256


class CampaignRegistry:
    """Stores and loads campaign versions; versions never change, so they are cached.

    A version is validated once, when it is registered (with ``limits``); loading it
    later parses its stored form without the checks that can change over time (today's
    date, the installed ``holidays`` data, the configured limits), so it loads as it was
    accepted.
    """

    def __init__(self, redis: ArqRedis, keys: Keys, limits: Limits | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits or Limits()
        self._register = redis.register_script(load_script("app", "register.lua"))
        self._cache: OrderedDict[tuple[str, int], Campaign] = OrderedDict()
        #: campaign id -> (when read, latest version): "latest" is looked up again at most
        #: every LATEST_TTL seconds, so enrolling costs no extra round trip.
        self._latest: dict[str, tuple[float, int]] = {}

    async def register(self, definition: Any, limits: Limits | None = None) -> Campaign:
        """Validate and store a new version; returns it with ``version`` set.

        ``limits`` default to the registry's own. A :class:`Campaign` instance is
        validated again from its definition.
        """
        campaign = parse_campaign(definition, limits or self.limits)
        body = orjson.dumps(campaign.definition())
        version = int(
            await self._register(
                keys=[self.keys.campaign(campaign.id), self.keys.campaigns],
                args=[campaign.id, body],
            )
        )
        stored = campaign.model_copy(update={"version": version})
        self._remember(stored)
        self._latest[campaign.id] = (time.monotonic(), version)
        return stored

    async def get(self, campaign_id: str, version: int | None = None) -> Campaign:
        """A version (the latest when None); raises :class:`CampaignNotFound`, or
        :class:`CorruptRecord` when the stored version cannot be read."""
        if not isinstance(campaign_id, str) or not campaign_id:
            raise InvalidRequest("campaign_id must be a non-empty string")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise InvalidRequest(f"version must be a whole number of at least 1 (got {version!r})")
        if version is not None and (campaign_id, version) in self._cache:
            self._cache.move_to_end((campaign_id, version))
            return self._cache[(campaign_id, version)]
        key = self.keys.campaign(campaign_id)
        latest_read = False
        if version is None:
            seen = self._latest.get(campaign_id)
            if seen is not None and time.monotonic() - seen[0] < LATEST_TTL:
                return self._cache.get((campaign_id, seen[1])) or await self.get(
                    campaign_id, seen[1]
                )
            latest = await self.redis.hget(key, "latest")  # type: ignore[misc]
            if latest is None:
                raise CampaignNotFound(f"no campaign named {campaign_id[:200]!r} is registered")
            try:
                version = int(latest)
            except ValueError:
                raise CorruptRecord(
                    f"campaign {campaign_id!r}: stored field 'latest' is not a version number"
                ) from None
            if (campaign_id, version) in self._cache:
                self._latest[campaign_id] = (time.monotonic(), version)
                return self._cache[(campaign_id, version)]
            latest_read = True
        raw = await self.redis.hget(key, f"v:{version}")  # type: ignore[misc]
        if raw is None:
            raise CampaignNotFound(f"campaign {campaign_id[:200]!r} has no version {version}")
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            campaign = load_campaign(doc, version)
        except ValueError as exc:  # orjson.JSONDecodeError is one
            raise CorruptRecord(
                f"campaign {campaign_id!r} version {version}: the stored definition cannot be "
                f"read: {str(exc)[:300]}"
            ) from None
        self._remember(campaign)
        if latest_read:  # only a version that loaded is remembered as the latest
            self._latest[campaign_id] = (time.monotonic(), version)
        return campaign

    async def ids(self) -> list[str]:
        """Every registered campaign id, sorted."""
        members = await self.redis.smembers(self.keys.campaigns)  # type: ignore[misc]
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    def _remember(self, campaign: Campaign) -> None:
        assert campaign.version is not None
        self._cache[(campaign.id, campaign.version)] = campaign
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
