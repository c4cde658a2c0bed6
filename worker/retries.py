"""Retry delays: exponential or fixed backoff, capped, with full jitter."""

from __future__ import annotations

import math
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
    in lockstep. A server's ``Retry-After`` is a floor, honoured up to ``max_delay``
    (docs/campaigns.md, retries): we never come back sooner than it asks unless it asks for
    more than the node allows. A ``retry_after`` that is not a finite, positive number
    is ignored; none of them raises.
    """
    cap = policy.max_delay.total_seconds()
    base = policy.base_delay.total_seconds()
    if policy.backoff == "exponential":
        # 2**(attempt-1) past ~1024 would overflow a float; the cap is reached long before.
        exponent = min(max(attempt - 1, 0), 64)
        delay = base * 2.0**exponent
    else:
        delay = base
    delay = min(delay, cap)
    if policy.jitter:
        delay = (rng or random).uniform(0, delay)
    if retry_after is not None:
        try:
            floor = float(retry_after)
        except OverflowError:  # an integer too large for a float
            floor = math.inf if retry_after > 0 else math.nan
        except (TypeError, ValueError):
            floor = math.nan
        if math.isfinite(floor) and floor > 0:
            delay = max(delay, min(floor, cap))
        elif floor == math.inf:
            delay = cap
    return timedelta(seconds=delay)
