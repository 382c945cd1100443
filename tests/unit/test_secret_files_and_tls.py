"""Secrets from files (as Kubernetes mounts a Secret) and client certificates (mutual TLS), wired into every
client: a certificate made here is loaded by the Kafka, Cassandra and Redis client settings."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamscore.featurestore.cache import connect as redis_connect
from streamscore.featurestore.cassandra import _ssl_context as cassandra_ssl_context
from streamscore.settings import CassandraSettings, KafkaSettings, RedisSettings
from streamscore.streams.kafka import ssl_context as kafka_ssl_context

SECRET = "from-a-file-not-shown"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "client.pem", folder / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=streamscore-test",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_a_password_file_is_read_without_its_final_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(SECRET + "\n")
    for settings, value in ((RedisSettings(password_file=secret), "password"),
                            (CassandraSettings(username="app", password_file=secret), "password"),
                            (KafkaSettings(security_protocol="SASL_SSL", sasl_username="w", sasl_password_file=secret),
                             "sasl_password")):
        assert getattr(settings, value).get_secret_value() == SECRET
        assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()


def test_a_secret_and_its_file_together_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(SECRET)
    with pytest.raises(ValidationError, match="STREAMSCORE_REDIS__PASSWORD_FILE and STREAMSCORE_REDIS__PASSWORD "
                                              "are both set"):
        RedisSettings(password_file=secret, password="inline")


def test_client_certificates_reach_every_client(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    kafka = kafka_ssl_context(KafkaSettings(security_protocol="SSL", ssl_cafile=cert, ssl_certfile=cert,
                                            ssl_keyfile=key))
    assert isinstance(kafka, ssl.SSLContext) and kafka.verify_mode == ssl.CERT_REQUIRED
    assert [entry["subject"] for entry in kafka.get_ca_certs()] == [((("commonName", "streamscore-test"),),)]
    cassandra = cassandra_ssl_context(CassandraSettings(ssl_certfile=cert, ssl_keyfile=key))
    assert isinstance(cassandra, ssl.SSLContext)  # a client certificate alone turns TLS on
    redis = redis_connect(RedisSettings(ssl_cafile=cert, ssl_certfile=cert, ssl_keyfile=key))
    kwargs = redis.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(cert), str(cert), str(key))
    assert redis.connection_pool.connection_class.__name__ == "SSLConnection"  # the CA alone turns TLS on


def test_a_key_that_does_not_match_fails_loading(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = certificate
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    with pytest.raises(ssl.SSLError):
        kafka_ssl_context(KafkaSettings(security_protocol="SSL", ssl_certfile=cert, ssl_keyfile=other))


def test_settings_rebuilt_from_their_dump_keep_a_secret_read_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(SECRET)
    settings = RedisSettings(password_file=secret)
    again = RedisSettings(**settings.model_dump())
    assert again.password is not None and again.password.get_secret_value() == SECRET
