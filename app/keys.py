"""Redis key names, in one place so that the client, the worker and scripts agree."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``CAMPAIGN_KEY_PREFIX``)."""

    prefix: str = "campaign"

    @property
    def poison(self) -> str:
        """Capped list of jobs dropped without running (dead letters)."""
        return f"{self.prefix}:poison"

    @property
    def campaigns(self) -> str:
        """Set of registered campaign ids."""
        return f"{self.prefix}:campaigns"

    def campaign(self, campaign_id: str) -> str:
        """Hash of a campaign's versions: ``latest`` and ``v:<n>`` -> definition JSON."""
        return f"{self.prefix}:campaign:{campaign_id}"

    def enrollment(self, enrollment_id: str) -> str:
        """Hash holding one enrollment's record."""
        return f"{self.prefix}:enr:{enrollment_id}"

    def history(self, enrollment_id: str) -> str:
        """List of one enrollment's transitions, newest last, capped."""
        return f"{self.prefix}:hist:{enrollment_id}"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (epoch seconds)."""
        return f"{self.prefix}:workers"

    def state_index(self, campaign_id: str, state: str) -> str:
        """Set of enrollment ids of a campaign in a state."""
        return f"{self.prefix}:idx:{campaign_id}:{state}"
