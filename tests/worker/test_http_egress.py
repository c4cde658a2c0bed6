"""The http action's egress policy, response cap, stable body and signature.

Traffic goes to loopback stand-ins only. Test host names are answered by a fake
``getaddrinfo`` on the running loop, and every socket connect is recorded (and any
non-loopback one refused), so a refusal is shown to happen after resolution and before
any connection attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.settings import ConfigError, Settings
from tests.fake_service import FakeService
from worker.actions import (
    ATTEMPT_HEADER,
    SIGNATURE_HEADER,
    ActionContext,
    EgressPolicy,
    EgressRefused,
    PermanentError,
    TransientError,
    egress_policy,
    http_action,
    http_session,
    make_http_session,
    signature,
)

MB = 1 << 20


@dataclass
class Net:
    """Fake DNS answers, and what was looked up and connected to."""

    dns: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)


@pytest.fixture
async def net(monkeypatch: pytest.MonkeyPatch) -> Net:
    loop = asyncio.get_running_loop()
    real_connect = loop.sock_connect
    state = Net()

    async def getaddrinfo(host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:  # fmt: skip
        name = host.decode() if isinstance(host, bytes) else str(host)
        state.lookups.append(name)
        if name not in state.dns:
            raise socket.gaierror(socket.EAI_NONAME, f"{name} is not a test host")
        answers = []
        for addr in state.dns[name]:
            v6 = ":" in addr
            sockaddr = (addr, int(port), 0, 0) if v6 else (addr, int(port))
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            answers.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return answers

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        state.connects.append(str(address[0]))
        if not ip_address(str(address[0]).partition("%")[0]).is_loopback:
            raise OSError("the tests never connect beyond loopback")
        await real_connect(sock, address)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    return state


@pytest.fixture
async def target() -> AsyncIterator[FakeService]:
    """A second stand-in: where redirects point."""
    service = await FakeService().start()
    yield service
    await service.stop()


def ctx_for(url: str, session: aiohttp.ClientSession, **kw: Any) -> ActionContext:
    base: dict[str, Any] = {
        "enrollment_id": "c:1", "campaign_id": "c", "contact_id": "1", "node": "n", "step": 3,
        "attempt": 1, "params": {"url": url, "template": "t"}, "attributes": {"a": 1},
        "idempotency_key": "c:1:3", "timeout": 5.0, "http": session,
    }  # fmt: skip
    base.update(kw)
    return ActionContext(**base)


async def call(url: str, policy: EgressPolicy | None = None, **kw: Any) -> str | None:
    async with http_session(policy or EgressPolicy()) as session:
        return await http_action(ctx_for(url, session, **kw))


# --- redirects --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_is_refused_naming_location(
    svc: FakeService, target: FakeService, net: Net, code: int
) -> None:
    svc.redirect_to = f"http://bob:hunter2@127.0.0.1:{target.port}/landing?token=SECRET"
    with pytest.raises(PermanentError) as err:
        await call(svc.url(f"/redirect/{code}"), secret=b"k")
    message = str(err.value)
    assert f"HTTP {code}" in message and "not followed" in message
    assert f"Location http://127.0.0.1:{target.port}/landing" in message
    assert "SECRET" not in message and "hunter2" not in message
    assert target.calls == []  # neither body, key nor signature went on
    assert len(svc.calls) == 1 and net.connects == ["127.0.0.1"]


async def test_a_relative_redirect_is_named_and_not_followed(svc: FakeService) -> None:
    svc.redirect_to = "/ok?x=1"
    with pytest.raises(PermanentError, match=rf"Location http://127\.0\.0\.1:{svc.port}/ok;"):
        await call(svc.url("/redirect/307"))
    assert [c.path for c in svc.calls] == ["/redirect/307"]


# --- link-local and metadata ------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["169.254.169.254"], "a cloud metadata address"),
        (["fd00:ec2::254"], "a cloud metadata address"),
        (["169.254.7.7"], "a link-local address"),
        (["fe80::1"], "a link-local address"),
        (["::ffff:169.254.169.254"], "a cloud metadata address"),
        (["127.0.0.1", "169.254.169.254"], "a cloud metadata address"),  # one refuses all
    ],
)
async def test_link_local_and_metadata_refused_after_resolution_before_connect(
    svc: FakeService, net: Net, answers: list[str], reason: str
) -> None:
    net.dns["hooks.test"] = answers
    with pytest.raises(EgressRefused) as err:
        await call(f"http://hooks.test:{svc.port}/ok")
    assert "'hooks.test'" in str(err.value) and reason in str(err.value)
    assert net.lookups == ["hooks.test"]  # resolved first...
    assert net.connects == [] and svc.calls == []  # ...then refused: nothing connected


async def test_the_connect_recorder_sees_an_allowed_call(svc: FakeService, net: Net) -> None:
    """Control for the test above: a loopback answer is connected to, and recorded."""
    net.dns["hooks.test"] = ["127.0.0.1"]
    await call(f"http://hooks.test:{svc.port}/ok")
    assert net.connects == ["127.0.0.1"] and len(svc.calls) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.1.1:8080/x",
        "http://[fe80::1]/x",
        "http://[fd00:ec2::254]/latest",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[64:ff9b::a9fe:a9fe]/latest",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./computeMetadata/v1/",
    ],
)
async def test_literal_and_named_metadata_refused_without_lookup(net: Net, url: str) -> None:
    with pytest.raises(EgressRefused, match=r"refused: .*(metadata|link-local)"):
        await call(url)
    assert net.lookups == [] and net.connects == []


async def test_the_session_guards_user_handlers_and_followed_redirects(
    svc: FakeService, net: Net
) -> None:
    async with http_session(EgressPolicy()) as session:
        with pytest.raises(EgressRefused, match="metadata"):
            await session.get("http://169.254.169.254/latest/meta-data/")
        net.dns["meta.test"] = ["169.254.169.254"]
        with pytest.raises(EgressRefused, match="metadata"):
            await session.get("http://meta.test/latest")
        svc.redirect_to = "http://169.254.169.254/latest/meta-data/"
        with pytest.raises(EgressRefused, match="metadata"):
            await session.post(svc.url("/redirect/302"), data=b"{}")
    assert net.connects == ["127.0.0.1"]  # the stand-in only


async def test_a_session_without_the_policy_is_refused(svc: FakeService) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(PermanentError, match="egress policy"):
            await http_action(ctx_for(svc.url("/ok"), session))
    assert svc.calls == []


# --- allow-list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "host", "ok"),
    [
        ("hooks.test", "hooks.test", True),
        ("HOOKS.test.", "hooks.test", True),
        ("other.test", "hooks.test", False),
        ("*.svc.test", "a.svc.test", True),
        ("*.svc.test", "b.a.svc.test", True),
        ("*.svc.test", "svc.test", False),
        ("*.svc.test", "evilsvc.test", False),
        ("127.0.0.0/8", "127.0.0.1", True),
        ("127.0.0.0/8", "hooks.test", True),  # a resolved address inside a listed CIDR
        ("127.0.0.1", "hooks.test", True),
        ("10.0.0.0/8", "127.0.0.1", False),
        ("10.0.0.0/8", "hooks.test", False),
        ("example.com", "127.0.0.1", False),  # loopback too is outside the list
    ],
)
async def test_allow_list(svc: FakeService, net: Net, allowed: str, host: str, ok: bool) -> None:
    for name in ("hooks.test", "a.svc.test", "b.a.svc.test", "svc.test", "evilsvc.test"):
        net.dns[name] = ["127.0.0.1"]
    policy = EgressPolicy.parse(allowed)
    url = f"http://{host}:{svc.port}/outcome/hit"
    if ok:
        assert await call(url, policy) == "hit"
        assert len(svc.calls) == 1
        return
    with pytest.raises(EgressRefused) as err:
        await call(url, policy)
    assert repr(host) in str(err.value) or f"address {host}" in str(err.value)
    assert "CAMPAIGN_HTTP_ALLOWED_HOSTS" in str(err.value)
    assert svc.calls == [] and net.connects == []


async def test_an_allow_list_never_opens_link_local(net: Net) -> None:
    net.dns["hooks.test"] = ["169.254.169.254"]
    policy = EgressPolicy.parse("hooks.test, 169.254.0.0/16")
    for url in ("http://hooks.test/x", "http://169.254.169.254/x", "http://169.254.2.2/x"):
        with pytest.raises(EgressRefused, match=r"metadata|link-local"):
            await call(url, policy)
    assert net.connects == []


def test_allow_list_parsing() -> None:
    policy = EgressPolicy.parse(" a.test, *.B.test ,10.0.0.0/8, ::1, ,127.0.0.1")
    assert policy.names == frozenset({"a.test"}) and policy.suffixes == (".b.test",)
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "::1/128", "127.0.0.1/32"]
    assert policy.restricted and not EgressPolicy.parse("").restricted
    for bad in ("*.", "a..b", "10.0.0.0/33", "exa mple.com", "*.*.x", "host:8080", "a/b"):
        with pytest.raises(ConfigError, match="CAMPAIGN_HTTP_ALLOWED_HOSTS"):
            EgressPolicy.parse(f"ok.test,{bad}")


async def test_policy_from_settings() -> None:
    settings = Settings(http_allowed_hosts="*.example.com", http_max_response_bytes=4096)
    policy = egress_policy(settings)
    assert policy.suffixes == (".example.com",) and policy.max_response_bytes == 4096
    async with make_http_session(settings) as session:
        assert getattr(session.connector, "policy", None) == policy


# --- response size ----------------------------------------------------------------------


def _memory_kb() -> tuple[str, int]:
    """Peak RSS since a reset when the kernel allows one, else the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        key = "VmHWM"
    except OSError:
        key = "VmRSS"
    return key, _status_kb(key)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


async def test_a_300_mb_answer_is_cut_at_the_cap(svc: FakeService) -> None:
    await call(svc.url("/huge/0"))  # warm up the code paths
    key, before = _memory_kb()
    with pytest.raises(PermanentError) as err:
        await call(svc.url("/huge/300"))
    grown_mb = (_status_kb(key) - before) / 1024
    assert f"over {MB} bytes" in str(err.value)
    assert "CAMPAIGN_HTTP_MAX_RESPONSE_BYTES" in str(err.value)
    assert grown_mb < 50, f"{key} grew by {grown_mb:.0f} MB"
    assert svc.streamed < 50 * MB  # the client hung up; the stand-in stopped sending


async def test_a_declared_oversize_answer_is_not_read(svc: FakeService) -> None:
    with pytest.raises(PermanentError, match=f"over {MB} bytes"):
        await call(svc.url("/hugelen/300"))
    assert svc.streamed < 50 * MB


async def test_an_oversize_error_answer_is_truncated(svc: FakeService) -> None:
    with pytest.raises(TransientError, match="HTTP 500") as err:
        await call(svc.url("/huge/300/500"))
    assert len(str(err.value)) < 400 and str(err.value).endswith("...")
    assert svc.streamed < 50 * MB


async def test_an_oversize_answer_that_is_not_json_needs_no_outcome(svc: FakeService) -> None:
    assert await call(svc.url("/hugetext/300")) is None
    assert svc.streamed < 50 * MB


async def test_the_cap_is_exact(svc: FakeService) -> None:
    body_len = len(json.dumps({"outcome": "hit"}))  # as the stand-in writes it
    assert await call(svc.url("/outcome/hit"), EgressPolicy(max_response_bytes=body_len)) == "hit"
    with pytest.raises(PermanentError, match=f"over {body_len - 1} bytes"):
        await call(svc.url("/outcome/hit"), EgressPolicy(max_response_bytes=body_len - 1))


async def test_a_non_utf8_4xx_is_permanent(svc: FakeService) -> None:
    with pytest.raises(PermanentError, match="HTTP 400") as err:
        await call(svc.url("/bytes/400"))
    assert "\ufffd" in str(err.value) and "contact" in str(err.value)
    with pytest.raises(TransientError, match="HTTP 503"):
        await call(svc.url("/bytes/503"))


# --- body and signature -----------------------------------------------------------------


def _verify(secret: bytes, header: str, raw: bytes) -> int:
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert set(fields) == {"t", "v1"}
    mac = hmac.new(secret, fields["t"].encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, fields["v1"])
    return int(fields["t"])


async def test_body_is_the_same_for_every_attempt_of_a_key(svc: FakeService) -> None:
    await call(svc.url("/ok"), secret=b"s3cret", attempt=1, event={"b": 2, "a": 1})
    await call(svc.url("/ok"), secret=b"s3cret", attempt=2, event={"b": 2, "a": 1})
    first, second = svc.calls
    assert first.raw == second.raw and first.key == second.key == "c:1:3"
    assert (first.headers[ATTEMPT_HEADER], second.headers[ATTEMPT_HEADER]) == ("1", "2")
    assert b"attempt" not in first.raw
    for c in (first, second):
        assert abs(_verify(b"s3cret", c.headers[SIGNATURE_HEADER], c.raw) - time.time()) < 60


def test_signature_covers_time_and_body() -> None:
    header = signature(b"k", b'{"a":1}', now=1_700_000_000.9)
    assert header.startswith("t=1700000000,v1=")
    assert _verify(b"k", header, b'{"a":1}') == 1_700_000_000
    assert header != signature(b"k", b'{"a":1}', now=1_700_000_001)
    with pytest.raises(AssertionError):
        _verify(b"k", header, b'{"a":2}')


async def test_an_empty_secret_is_a_configuration_error(svc: FakeService) -> None:
    with pytest.raises(ConfigError, match="CAMPAIGN_HTTP_ACTION_SECRET"):
        await call(svc.url("/ok"), secret=b"")
    assert svc.calls == []
