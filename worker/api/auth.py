"""Who may call: bearer tokens for the API, a signed cookie for the console, CSRF tokens.

Nothing is stored server-side, so any number of API replicas accept the same cookie. A
console session is ``<token id>.<expiry>.<nonce>.<mac>``: the token id is a hash prefix of
the token it was opened with, and the MAC is keyed with that token, so removing a token
from ``CAMPAIGN_API_TOKENS`` ends its sessions. A form's CSRF token is a MAC of the
session's nonce, checked on every POST under ``/ui/``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from app.settings import MAX_TOKEN_LENGTH, parse_api_tokens

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "Principal", "Tokens"]

SESSION_COOKIE = "campaign_session"
#: How long a console login lasts.
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``token_id`` names the token without revealing it (for logs)."""

    token_id: str
    may_write: bool


#: What a token may be made of (as CAMPAIGN_API_TOKENS allows), and a session cookie.
_TOKEN = re.compile(rf"[A-Za-z0-9._~+/=-]{{1,{MAX_TOKEN_LENGTH}}}")
_COOKIE = re.compile(r"[0-9a-f]{12}\.[0-9]{1,12}\.[A-Za-z0-9_-]{1,64}\.[0-9a-f]{64}")


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class Tokens:
    """The configured tokens; compares in constant time."""

    def __init__(self, text: str) -> None:
        parsed = parse_api_tokens(text)
        self._by_id = {_token_id(t): (t, w) for t, w in parsed.items()}

    def __len__(self) -> int:
        return len(self._by_id)

    def check(self, token: str) -> Principal | None:
        """The principal of a presented token, or None when it is not one of ours
        (anything that is not a token's characters, e.g. bytes a header smuggled in)."""
        if not _TOKEN.fullmatch(token):
            return None
        found = self._by_id.get(_token_id(token))
        if found is None or not hmac.compare_digest(found[0].encode(), token.encode()):
            return None
        return Principal(_token_id(token), found[1])

    def bearer(self, header: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer <token>`` header."""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.check(token.strip())

    # -- console sessions --------------------------------------------------------------

    def _mac(self, token: str, *parts: str) -> str:
        return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()

    def open_session(self, token: str, now: float | None = None) -> str | None:
        """A session cookie value for a token that checks, else None."""
        if self.check(token) is None:
            return None
        tid = _token_id(token)
        expiry = str(int((now or time.time()) + SESSION_SECONDS))
        nonce = secrets.token_urlsafe(16)
        return ".".join([tid, expiry, nonce, self._mac(token, "session", tid, expiry, nonce)])

    def session(self, cookie: str | None, now: float | None = None) -> tuple[Principal, str] | None:
        """``(principal, csrf token)`` of a valid, unexpired session cookie, else None."""
        if not cookie or not _COOKIE.fullmatch(cookie):
            return None
        tid, expiry, nonce, mac = cookie.split(".")
        found = self._by_id.get(tid)
        if found is None or int(expiry) < (now or time.time()):
            return None
        token, may_write = found
        if not hmac.compare_digest(mac, self._mac(token, "session", tid, expiry, nonce)):
            return None
        return Principal(tid, may_write), self._mac(token, "csrf", nonce)
