"""Retry delays: exponential or fixed backoff, capped, with full jitter."""

from __future__ import annotations

import random
from datetime import timedelta

from app.campaigns import RetryPolicy

__all__ = ["backoff_delay"]


def backoff_delay(
    policy: RetryPolicy,
    attempt: int,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> timedelta:
    """The delay before attempt ``attempt + 1``.

    Exponential: ``base * 2**(attempt-1)``; fixed: ``base``; both capped at ``max_delay``.
    Full jitter draws uniformly from [0, delay] so that a burst of failures does not retry
    in lockstep. A server's ``Retry-After`` is a floor: we never come back sooner.
    """
    base = policy.base_delay.total_seconds()
    delay = base * 2 ** max(attempt - 1, 0) if policy.backoff == "exponential" else base
    delay = min(delay, policy.max_delay.total_seconds())
    if policy.jitter:
        delay = (rng or random).uniform(0, delay)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=delay)
