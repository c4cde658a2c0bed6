"""A user's action handlers, loaded by the worker through ``CAMPAIGN_ACTIONS`` in tests."""

from __future__ import annotations

from worker.actions import ActionContext, action


@action("sms")
async def send_sms(ctx: ActionContext) -> str | None:
    """Pretend to text the contact; the 'vip' attribute picks another branch."""
    return "vip" if ctx.attributes.get("vip") else None
