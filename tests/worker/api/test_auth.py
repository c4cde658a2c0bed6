"""Tokens and console sessions (worker.api.auth), without a server."""

from __future__ import annotations

import time

import pytest

from worker.api.auth import SESSION_SECONDS, Tokens

RW = "rw-token-0123456789abcdef"
RO = "ro-token-0123456789abcdef"


def test_tokens_and_their_rights() -> None:
    tokens = Tokens(f"{RW}, ro:{RO}")
    assert len(tokens) == 2
    assert tokens.bearer(f"Bearer {RW}").may_write is True  # type: ignore[union-attr]
    assert tokens.bearer(f"bearer {RO}").may_write is False  # type: ignore[union-attr]
    for header in (None, "", "Bearer", "Bearer ", f"Basic {RW}", f"Bearer {RW}x", RW,
                   "Bearer \udcff\udcfe", "Bearer tok\u00e9n-0123456789abcdef"):  # fmt: skip
        assert tokens.bearer(header) is None, header


def test_a_session_lasts_its_time_and_ends_with_its_token() -> None:
    tokens = Tokens(f"{RW},ro:{RO}")
    now = time.time()
    cookie = tokens.open_session(RW, now)
    assert cookie is not None and tokens.open_session("nope-0123456789abcdef") is None
    principal, csrf = tokens.session(cookie, now + 60)  # type: ignore[misc]
    assert principal.may_write and len(csrf) == 64
    assert tokens.session(cookie, now + SESSION_SECONDS + 1) is None  # expired
    # a different session has a different CSRF token
    other = tokens.open_session(RW, now)
    assert tokens.session(other, now)[1] != csrf  # type: ignore[index]
    # the token removed from the configuration: its sessions end
    assert Tokens(f"ro:{RO}").session(cookie, now) is None


@pytest.mark.parametrize("mutate", [
    lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # MAC changed
    lambda c: ".".join([*c.split(".")[:1], str(int(c.split(".")[1]) + 999), *c.split(".")[2:]]),
    lambda c: c.replace(".", "..", 1),
    lambda c: c + ".x",
    lambda c: ".".join([c.split(".")[0], "\u00b2", *c.split(".")[2:]]),  # a digit int() refuses
    lambda c: ".".join([c.split(".")[0], "9" * 5000, *c.split(".")[2:]]),
    lambda c: c[:-2] + "\u00e9\u00e9",
])  # fmt: skip
def test_a_forged_or_malformed_cookie_is_no_session(mutate: object) -> None:
    tokens = Tokens(RW)
    cookie = tokens.open_session(RW)
    assert cookie is not None
    assert tokens.session(mutate(cookie)) is None  # type: ignore[operator]
