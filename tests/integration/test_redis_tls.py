"""The Redis CA and client-certificate settings against a real redis-server speaking TLS only, with mutual TLS
and a password (a server of its own, port of its own; certificates made here by openssl): the cache tier
answers with the CA, the client certificate and the password; without the client certificate, or with a CA that
did not sign the server's, it is unusable and says so in one line."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamscore.featurestore.cache import CacheUnusable, FeatureCache
from streamscore.settings import RedisSettings

PASSWORD = "tls-redis-password"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificates(folder: Path) -> dict[str, Path]:
    paths = {name: folder / name for name in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key",
                                              "client.pem", "other-ca.key", "other-ca.pem")}
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN=streamscore {ca}",
                 "-keyout", str(paths[f"{ca}.key"]), "-out", str(paths[f"{ca}.pem"]))
    extensions = folder / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    for leaf in ("server", "client"):
        request = folder / f"{leaf}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}", "-keyout", str(paths[f"{leaf}.key"]),
                 "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-CA", str(paths["ca.pem"]), "-CAkey", str(paths["ca.key"]),
                 "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(paths[f"{leaf}.pem"]))
    return paths


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Path]]]:
    folder = tmp_path_factory.mktemp("redis-tls")
    certificates = _certificates(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
         "--tls-cert-file", str(certificates["server.pem"]), "--tls-key-file", str(certificates["server.key"]),
         "--tls-ca-cert-file", str(certificates["ca.pem"]), "--tls-auth-clients", "yes", "--save", "",
         "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log")])
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert process.poll() is None, (folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.1)
        yield port, certificates
    finally:
        process.terminate()
        process.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _check(settings: RedisSettings) -> None:
    async def run() -> None:
        cache = FeatureCache(settings, "tls")
        try:
            await cache.check()
        finally:
            await cache.close()

    asyncio.run(run())


def test_mutual_tls_with_the_ca_and_the_client_certificate_answers(tls_redis: tuple[int, dict[str, Path]]) -> None:
    port, paths = tls_redis
    _check(RedisSettings(port=port, password=SecretStr(PASSWORD), ssl_cafile=paths["ca.pem"],
                         ssl_certfile=paths["client.pem"], ssl_keyfile=paths["client.key"], socket_timeout_s=3))


@pytest.mark.parametrize("missing", ["client certificate", "the right CA"])
def test_without_the_client_certificate_or_the_ca_the_cache_is_unusable_in_one_line(
        tls_redis: tuple[int, dict[str, Path]], missing: str) -> None:
    port, paths = tls_redis
    settings = RedisSettings(port=port, password=SecretStr(PASSWORD), ssl_cafile=paths["ca.pem"], socket_timeout_s=3)
    if missing == "the right CA":
        settings = RedisSettings(port=port, password=SecretStr(PASSWORD), ssl_cafile=paths["other-ca.pem"],
                                 ssl_certfile=paths["client.pem"], ssl_keyfile=paths["client.key"], socket_timeout_s=3)
    with pytest.raises(CacheUnusable) as refused:
        _check(settings)
    line = str(refused.value)
    assert line.startswith(f"Redis at 127.0.0.1:{port} and this client did not agree on TLS"), line
    assert "STREAMSCORE_REDIS__SSL_CAFILE" in line and "\n" not in line and PASSWORD not in line
