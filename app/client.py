"""The async client the API imports (docs/client.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from arq.connections import ArqRedis

from app.campaigns import Campaign, Limits
from app.connection import check_shard_count, close_redis, create_redis, open_redis
from app.migration import DEFAULT_STATES, MigrationReport, migrate_enrollments
from app.models import EnrollManyResult, EnrollmentStatus
from app.overview import Page, list_enrollments
from app.retention import PurgeResult, finished_cutoff, purge_finished
from app.scheduling import SchedulingService
from app.settings import Settings, get_settings

__all__ = ["CampaignClient"]


class CampaignClient:
    """Register campaigns, enroll contacts, deliver events, cancel, inspect and replay.

    Use as ``async with CampaignClient.from_settings() as client: ...`` or with an explicit
    ``redis_url``. Every method raises a typed :mod:`app.errors` exception on bad input or
    a corrupt record (:class:`~app.errors.CorruptRecord`); input past a limit
    (the ``CAMPAIGN_MAX_*`` settings) is an ``InvalidRequest``/``InvalidCampaign``
    naming the field and the limit.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        redis: ArqRedis | None = None,
    ) -> None:
        if settings is None:
            settings = Settings.load(redis_url=redis_url) if redis_url else get_settings()
        elif redis_url is not None:
            settings = settings.model_copy(
                update={"redis_url": Settings.load(redis_url=redis_url).redis_url}
            )
        self.settings = settings
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else create_redis(settings)
        self.service = SchedulingService(self.redis, settings)
        self.limits = Limits.from_settings(settings)
        self._ready = False
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> CampaignClient:
        """A client configured from the environment (``REDIS_URL``, ``CAMPAIGN_*``)."""
        return cls(settings=settings or get_settings())

    async def __aenter__(self) -> CampaignClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Find out what ``REDIS_URL`` points at, once (every method does this first): on a
        node of a Redis Cluster the client switches to a cluster client. Checks that
        ``CAMPAIGN_SHARDS`` matches the count the data was written with, else raises
        :class:`~app.settings.ConfigError`. Raises the connection error when Redis is down
        (a later call tries again)."""
        if self._ready:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._ready:
                return
            if self._owns_redis:
                redis = await open_redis(self.settings, self.redis)
                if redis is not self.redis:
                    self.redis = redis
                    self.service = SchedulingService(redis, self.settings)
            # Recorded here too (SET NX): a client that writes before any worker has
            # started must still pin the count.
            await check_shard_count(self.redis, self.settings, record=True)
            self._ready = True

    async def close(self) -> None:
        """Close the Redis connections this client opened."""
        if self._owns_redis:
            await close_redis(self.redis)

    async def register_campaign(self, definition: Mapping[str, Any] | Campaign) -> int:
        """Validate and store a campaign; returns its new version (1 for a new id).

        Raises :class:`~app.errors.InvalidCampaign` naming every bad field, or a limit
        passed (definition size, node count, name length, durations). A
        :class:`~app.campaigns.Campaign` instance is validated again from its definition.
        """
        await self.connect()
        return (await self.service.registry.register(definition, self.limits)).version or 0

    async def get_campaign(self, campaign_id: str, version: int | None = None) -> Campaign:
        """A registered campaign version (the latest when None)."""
        await self.connect()
        return await self.service.registry.get(campaign_id, version)

    async def enroll(
        self,
        campaign_id: str,
        contact_id: str,
        attributes: Mapping[str, Any] | None = None,
        timezone: str | None = None,
        *,
        node: str | None = None,
        run_at: datetime | str | None = None,
    ) -> EnrollmentStatus:
        """Enroll a contact in the campaign's latest version.

        ``node`` and ``run_at`` place the contact part-way through the campaign (moving it
        from another system): an ``action`` node is scheduled at ``run_at``, a ``wait``
        node waits with ``run_at`` as its deadline, a ``delay`` node ends at ``run_at``.
        ``run_at`` is an aware datetime or an ISO 8601 string with an offset; a past one
        is due at once. Without them the contact starts at the entry node now.

        Raises :class:`~app.errors.CampaignNotFound`, :class:`~app.errors.AlreadyEnrolled`
        or :class:`~app.errors.InvalidRequest` (bad contact id, time zone, attributes, node
        or run_at).
        """
        await self.connect()
        return await self.service.enroll(
            campaign_id, contact_id, attributes, timezone, node=node, run_at=run_at
        )

    async def enroll_many(
        self, campaign_id: str, contacts: Iterable[Mapping[str, Any]], *, batch_size: int = 1000
    ) -> EnrollManyResult:
        """Enroll many contacts (dicts with ``contact_id`` and optional ``attributes``,
        ``timezone``, ``node`` and ``run_at``, as for :meth:`enroll`), one pipelined round trip per ``batch_size``; returns how many were
        enrolled (an ``int``; see :class:`~app.models.EnrollManyResult` for the rows it
        skipped and why). Contacts already enrolled are skipped, not raised; so are contacts
        whose job id is still taken by a leftover job of an earlier enrollment with the
        same id (listed in ``.conflicts``).

        When it stops part-way (a bad row, a Redis error, the iterable raising) it raises
        :class:`~app.errors.EnrollManyError` (for a bad row :class:`~app.errors.InvalidRow`,
        also an ``InvalidRequest``) with ``.enrolled``, ``.row`` and ``.processed``; see
        :meth:`app.scheduling.SchedulingService.enroll_many`.
        """
        await self.connect()
        return await self.service.enroll_many(campaign_id, contacts, batch_size=batch_size)

    async def signal(
        self, enrollment_id: str, event: str, payload: Mapping[str, Any] | None = None
    ) -> bool:
        """Deliver an event; False when the enrollment is not waiting for that event.

        ``payload`` must be a JSON object of at most ``CAMPAIGN_MAX_PAYLOAD_BYTES``.
        """
        await self.connect()
        return await self.service.signal(enrollment_id, event, payload)

    async def cancel(self, enrollment_id: str, reason: str = "") -> bool:
        """Cancel an active enrollment (final); False when it had already ended.

        ``reason`` (kept in the history) is at most ``CAMPAIGN_MAX_REASON_LENGTH`` characters.
        """
        await self.connect()
        return await self.service.cancel(enrollment_id, reason)

    async def status(self, enrollment_id: str) -> EnrollmentStatus:
        """State, node, step, attempt, run_at, deadline, error and history."""
        await self.connect()
        return await self.service.status(enrollment_id)

    async def replay(
        self, enrollment_id: str, *, to_version: int | None = None
    ) -> EnrollmentStatus:
        """Bring a failed enrollment back: it runs the failed node again as a new step
        (with ``to_version``, on that version of its campaign: a fixed definition)."""
        await self.connect()
        return await self.service.replay(enrollment_id, to_version=to_version)

    async def migrate(
        self,
        campaign_id: str,
        to_version: int,
        *,
        mapping: Mapping[str, str] | None = None,
        states: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> MigrationReport:
        """Move enrollments (by default failed, scheduled and waiting ones) to another
        version, keeping state, node (or ``mapping[node]``), run time and history; see
        :mod:`app.migration`. Enrollments whose node cannot be kept are reported in
        ``.left`` and left alone."""
        await self.connect()
        return await migrate_enrollments(
            self.service, campaign_id, to_version, mapping=mapping,
            states=DEFAULT_STATES if states is None else states, dry_run=dry_run,
        )  # fmt: skip

    async def list_enrollments(
        self,
        campaign_id: str,
        *,
        state: str | None = None,
        node: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of a campaign's enrollment ids (filtered by state and node), with the
        cursor of the next page (None at the end); see :func:`app.overview.list_enrollments`."""
        await self.connect()
        return await list_enrollments(self.redis, self.service.keys, campaign_id, state=state,
                                      node=node, limit=limit, cursor=cursor)  # fmt: skip

    async def purge(
        self,
        finished_before: datetime | timedelta,
        *,
        campaign_id: str | None = None,
        dry_run: bool = False,
    ) -> PurgeResult:
        """Delete finished enrollments (completed, failed, cancelled) that finished at or
        before an instant (or more than a duration ago; ``timedelta(0)``: all of them), with
        their history and index entries; ``dry_run`` only counts. Returns the counts."""
        cutoff = finished_cutoff(finished_before)  # InvalidRequest: negative, naive, too long
        await self.connect()
        campaigns = None
        if campaign_id is not None:
            await self.service.registry.get(campaign_id)  # CampaignNotFound names it
            campaigns = [campaign_id]
        return await purge_finished(self.redis, self.service.keys, cutoff,
                                    campaigns=campaigns, dry_run=dry_run)  # fmt: skip
