"""REDIS_URL carries auth and TLS (rediss://, hostname checked) to real servers."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, ConnectionError

from app.connection import connect, connection_options, create_redis
from app.settings import Settings
from tests.conftest import start_redis
from worker.embedded_redis import EmbeddedRedis, free_port


def _settings(url: str) -> Settings:
    return Settings(redis_url=url)  # type: ignore[arg-type]


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = start_redis(tmp_path / "auth", "--requirepass", "s3cret")
    yield server
    server.close()


async def test_password_in_url(auth_redis: EmbeddedRedis) -> None:
    good = create_redis(_settings(f"redis://:s3cret@127.0.0.1:{auth_redis.port}/2"))
    bad = create_redis(_settings(f"redis://:wrong@127.0.0.1:{auth_redis.port}/0"))
    try:
        assert await good.ping() is True
        await good.set("k", "v")
        assert await good.get("k") == b"v"
        with pytest.raises(AuthenticationError):
            await bad.ping()
    finally:
        await good.aclose()
        await bad.aclose()


def _certs(tmp: Path) -> Path:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    (tmp / "ext").write_text("subjectAltName=DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext")  # fmt: skip
    return tmp


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    certs = _certs(tmp_path)
    tls_port = free_port()
    try:
        server = start_redis(
            tmp_path / "tls", "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.crt"),
            "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
            "--tls-auth-clients", "no", "--requirepass", "s3cret",
        )  # fmt: skip
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    yield server, tls_port, certs
    server.close()


async def test_rediss_with_ca_and_hostname_check(
    tls_redis: tuple[EmbeddedRedis, int, Path],
) -> None:
    _server, port, certs = tls_redis
    ca = certs / "ca.crt"
    ok = create_redis(_settings(f"rediss://:s3cret@localhost:{port}/0?ssl_ca_certs={ca}"))
    # 127.0.0.1 is not a name in the certificate: the hostname check must refuse it.
    wrong_name = create_redis(_settings(f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"))
    untrusted = create_redis(_settings(f"rediss://:s3cret@localhost:{port}/0"))
    try:
        assert await ok.ping() is True
        with pytest.raises(ConnectionError):
            await wrong_name.ping()
        with pytest.raises(ConnectionError):
            await untrusted.ping()
    finally:
        for client in (ok, wrong_name, untrusted):
            await client.aclose()


@pytest.fixture
def unix_redis() -> Iterator[tuple[EmbeddedRedis, Path]]:
    """A server that also listens on a unix socket (a short path: sun_path holds 107 bytes)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    sock = sock_dir / "redis.sock"
    server = start_redis(
        sock_dir / "data", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--requirepass", "s3cret",
    )  # fmt: skip
    yield server, sock
    server.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


async def test_unix_socket_url(unix_redis: tuple[EmbeddedRedis, Path]) -> None:
    server, sock = unix_redis
    via_unix = create_redis(_settings(f"unix://:s3cret@{sock}?db=3"))
    via_query = create_redis(_settings(f"unix://{sock}?db=3&password=s3cret"))
    via_tcp = create_redis(_settings(f"redis://:s3cret@127.0.0.1:{server.port}/3"))
    try:
        assert await via_unix.ping() is True
        await via_unix.set("over-unix", "yes")
        # the same server and database 3, seen over TCP
        assert await via_tcp.get("over-unix") == b"yes"
        assert await via_query.get("over-unix") == b"yes"
        info = await via_unix.client_info()
        assert info["db"] == 3 and str(info["laddr"]).startswith(str(sock))
        connected = await connect(_settings(f"unix://:s3cret@{sock}"))
        assert await connected.ping() is True
        await connected.aclose()
    finally:
        for client in (via_unix, via_query, via_tcp):
            await client.aclose()


async def test_unix_socket_that_is_missing_is_a_connection_error(tmp_path: Path) -> None:
    client = create_redis(_settings(f"unix://{tmp_path}/nothing.sock"))
    try:
        with pytest.raises(ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


def test_connection_options_per_scheme() -> None:
    tcp = connection_options("redis://h:6379/0")
    assert tcp["socket_keepalive"] is True and "ssl_check_hostname" not in tcp
    tls = connection_options("rediss://h:6379/0")
    assert tls["socket_keepalive"] is True and tls["ssl_check_hostname"] is True
    unix = connection_options("unix:///tmp/r.sock", socket_keepalive=True, socket_timeout=3)
    assert "socket_keepalive" not in unix and "ssl_check_hostname" not in unix
    assert unix["socket_timeout"] == 3 and unix["socket_connect_timeout"] == 2.0


def test_client_uses_the_derived_arq_queue() -> None:
    redis = create_redis(Settings(key_prefix="acme"))
    assert redis.default_queue_name == "acme:{arq:abort}"
    assert create_redis(Settings(queue_name="own")).default_queue_name == "own"
