"""REDIS_URL carries auth and TLS (rediss://, hostname checked) to real servers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, ConnectionError

from app.connection import create_redis
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
