"""Campaign registry in Redis: registering an id again makes a new, immutable version."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson
from arq.connections import ArqRedis

from app.campaigns import Campaign, parse_campaign
from app.errors import CampaignNotFound
from app.keys import Keys
from app.store import load_script

__all__ = ["CampaignRegistry"]

_CACHE_SIZE = 256


class CampaignRegistry:
    """Stores and loads campaign versions; versions never change, so they are cached."""

    def __init__(self, redis: ArqRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._register = redis.register_script(load_script("app", "register.lua"))
        self._cache: OrderedDict[tuple[str, int], Campaign] = OrderedDict()

    async def register(self, definition: Any) -> Campaign:
        """Validate and store a new version; returns it with ``version`` set."""
        campaign = parse_campaign(definition)
        body = orjson.dumps(campaign.definition())
        version = int(
            await self._register(
                keys=[self.keys.campaign(campaign.id), self.keys.campaigns],
                args=[campaign.id, body],
            )
        )
        stored = campaign.model_copy(update={"version": version})
        self._remember(stored)
        return stored

    async def get(self, campaign_id: str, version: int | None = None) -> Campaign:
        """A version (the latest when None); raises :class:`CampaignNotFound`."""
        if version is not None and (campaign_id, version) in self._cache:
            self._cache.move_to_end((campaign_id, version))
            return self._cache[(campaign_id, version)]
        key = self.keys.campaign(campaign_id)
        if version is None:
            latest = await self.redis.hget(key, "latest")  # type: ignore[misc]
            if latest is None:
                raise CampaignNotFound(f"no campaign named {campaign_id!r} is registered")
            version = int(latest)
            if (campaign_id, version) in self._cache:
                return self._cache[(campaign_id, version)]
        raw = await self.redis.hget(key, f"v:{version}")  # type: ignore[misc]
        if raw is None:
            raise CampaignNotFound(f"campaign {campaign_id!r} has no version {version}")
        campaign = Campaign.model_validate({**orjson.loads(raw), "version": version})
        self._remember(campaign)
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
