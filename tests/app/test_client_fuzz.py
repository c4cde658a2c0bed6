"""Issue 10: random JSON fed to the client's entry points; only its named errors
(:class:`app.errors.CampaignError` subclasses) may ever escape.

Runs on the session's private Redis (the ``client`` fixture). The strategies mix plain
random JSON (with huge integers, NaN, infinities, lone surrogates, deep nesting) with
definitions and requests shaped like real ones, so that validation is reached past the
first type check.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import CampaignClient
from app.errors import CampaignError

# Text with any code point, lone surrogates and control characters included.
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None))
TEXT = st.one_of(st.text(max_size=20), ANY_TEXT, st.text(min_size=120, max_size=300))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**64, 2**64 - 1, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
DEEP = st.integers(min_value=50, max_value=400).map(
    lambda n: _nest(n, {"k": 1}) if n % 2 else _nest(n, [1])
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five: random input that often gets past type checks."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 0 else good)


ANY_JSON = mostly(JSON, DEEP)


DURATION = mostly(
    st.sampled_from(["PT10S", "P3D", "P999999999D", "P3650D", "-PT1S", "P9999999999D", "x", 5]),
    st.one_of(
        st.integers(min_value=-(10**20), max_value=10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        ANY_JSON,
    ),
)
NAME = mostly(st.sampled_from(["a", "b", "done", "", "x" * 200]), TEXT)
ZONE = mostly(
    st.sampled_from([None, "UTC", "Europe/Berlin"]),
    st.one_of(
        st.sampled_from(
            ["x" * 10_000, "../../etc/passwd", "/etc/localtime", "\x00", "", "UTC\ud800"]
        ),
        TEXT,
        ANY_JSON,
    ),
)


def _nest(depth: int, leaf: Any) -> Any:
    doc = leaf
    for _ in range(depth):
        doc = {"x": doc} if isinstance(leaf, dict) else [doc]
    return doc


def _node() -> st.SearchStrategy[Any]:
    """A node of each type with its required fields (mostly good), or anything."""
    to_b = mostly(st.just("b"), st.one_of(st.none(), NAME))
    retry = st.fixed_dictionaries(
        {},
        optional={
            "max_attempts": mostly(st.integers(1, 5), ANY_JSON),
            "base_delay": DURATION,
            "max_delay": DURATION,
            "jitter": mostly(st.booleans(), ANY_JSON),
        },
    )
    action = st.fixed_dictionaries(
        {"type": st.just("action"), "action": mostly(st.just("log"), st.one_of(NAME, ANY_JSON))},
        optional={
            "params": mostly(st.dictionaries(st.text(max_size=5), JSON, max_size=3), ANY_JSON),
            "next": to_b,
            "outcomes": mostly(st.dictionaries(NAME, to_b, max_size=3), ANY_JSON),
            "retry": mostly(retry, ANY_JSON),
            "timeout": DURATION,
            "business_hours": mostly(st.booleans(), ANY_JSON),
        },
    )
    delay = st.fixed_dictionaries(
        {"type": st.just("delay"), "duration": DURATION, "next": to_b},
        optional={"business_time": mostly(st.booleans(), ANY_JSON)},
    )
    event = mostly(st.just("e"), st.one_of(NAME, st.lists(NAME, max_size=3), ANY_JSON))
    wait = st.fixed_dictionaries(
        {"type": st.just("wait"), "event": event, "timeout": DURATION, "on_event": to_b},
        optional={"on_timeout": to_b, "business_time": mostly(st.booleans(), ANY_JSON)},
    )
    anything = st.dictionaries(st.sampled_from(["type", "next", "action", "x"]), ANY_JSON)
    return mostly(
        st.one_of(action, delay, wait, st.just({"type": "exit"})), st.one_of(anything, ANY_JSON)
    )


BUSINESS_HOURS = mostly(
    st.fixed_dictionaries(
        {"weekly": mostly(st.just({"mon": ["09:00-17:00"]}), ANY_JSON)},
        optional={
            "holidays": mostly(st.just(["2026-12-25"]), ANY_JSON),
            "holiday_country": mostly(
                st.sampled_from(["US", "DE", "XX"]), st.one_of(TEXT, ANY_JSON)
            ),
            "holiday_subdivision": mostly(st.sampled_from(["CA", "BY", "ZZ"]), TEXT),
            "spread": DURATION,
            "timezone": ZONE,
        },
    ),
    st.one_of(st.none(), ANY_JSON),
)
DEFINITION = mostly(
    st.fixed_dictionaries(
        {
            "id": mostly(
                st.just("fz"), st.one_of(st.sampled_from(["a:b", "", "c" * 129]), TEXT, ANY_JSON)
            ),
            "entry": mostly(st.just("a"), NAME),
            "nodes": mostly(
                st.builds(lambda n: {"a": n, "b": {"type": "exit"}}, _node()),
                st.one_of(st.dictionaries(NAME, _node(), min_size=1, max_size=4), ANY_JSON),
            ),
        },
        optional={
            "timezone": ZONE,
            "business_hours": BUSINESS_HOURS,
            "reentry": mostly(st.booleans(), ANY_JSON),
            "version": mostly(st.sampled_from([None, 1]), ANY_JSON),
        },
    ),
    ANY_JSON,
)

WAITING = {
    "id": "fuzz",
    "entry": "w",
    "nodes": {
        "w": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "d"},
        "d": {"type": "exit"},
    },
}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _only_named_errors(call: Any) -> Any:
    try:
        return await call
    except CampaignError:
        return None


@FUZZ
@given(definition=DEFINITION)
async def test_register_campaign_raises_only_named_errors(
    client: CampaignClient, definition: Any
) -> None:
    await _only_named_errors(client.register_campaign(definition))


@FUZZ
@given(
    campaign_id=st.one_of(st.just("fuzz"), TEXT, ANY_JSON),
    contact_id=st.one_of(st.sampled_from(["c1", "c 2", "", "x" * 300]), TEXT, ANY_JSON),
    attributes=st.one_of(st.none(), st.dictionaries(TEXT, ANY_JSON, max_size=4), ANY_JSON),
    timezone=ZONE,
    rows=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"contact_id": st.one_of(TEXT, ANY_JSON)},
                optional={"attributes": ANY_JSON, "timezone": ZONE},
            ),
            ANY_JSON,
        ),
        max_size=4,
    ),
)
async def test_enroll_raises_only_named_errors(
    client: CampaignClient,
    campaign_id: Any,
    contact_id: Any,
    attributes: Any,
    timezone: Any,
    rows: list[Any],
) -> None:
    await client.register_campaign(WAITING)
    await _only_named_errors(client.enroll(campaign_id, contact_id, attributes, timezone))
    await _only_named_errors(client.enroll("fuzz", contact_id, attributes, timezone))
    await _only_named_errors(client.enroll_many("fuzz", rows, batch_size=2))
    await _only_named_errors(client.enroll_many(campaign_id, rows))


@FUZZ
@given(
    enrollment_id=st.one_of(st.just("fuzz:target"), TEXT, ANY_JSON),
    event=st.one_of(st.just("replied"), NAME, ANY_JSON),
    payload=st.one_of(st.none(), st.dictionaries(TEXT, ANY_JSON, max_size=4), ANY_JSON),
    reason=st.one_of(st.just(""), TEXT, ANY_JSON),
)
async def test_signal_and_cancel_raise_only_named_errors(
    client: CampaignClient, enrollment_id: Any, event: Any, payload: Any, reason: Any
) -> None:
    await client.register_campaign(WAITING)
    await _only_named_errors(client.enroll("fuzz", "target"))
    await _only_named_errors(client.signal(enrollment_id, event, payload))
    await _only_named_errors(client.signal("fuzz:target", event, payload))
    await _only_named_errors(client.status(enrollment_id))
    await _only_named_errors(client.cancel(enrollment_id, reason))
    await _only_named_errors(client.replay(enrollment_id))
