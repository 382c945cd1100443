"""Security basics: TLS and credentials reach the Kafka, Cassandra and Redis clients from the settings; secrets
stay secret (never in repr, str, JSON dumps or log lines); and nothing in the package unpickles or evaluates
message content."""

from __future__ import annotations

import ast
import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from streamscore.settings import CassandraSettings, KafkaSettings, RedisSettings, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

SECRET = "Tr0ub4dor-and-3"
PACKAGE_DIRS = ["streamscore", "streams", "featurestore", "fastpath", "workers", "deploy/local/streamscore_stack",
                "examples", "bench"]


def ca_file() -> Path:
    """A CA bundle to load: the system's (any PEM of certificates will do for building the contexts)."""
    candidates = [ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("no CA bundle on this machine to build a TLS context from")


# ---------------------------------------------------------------------------------------------------- Kafka


def test_kafka_sasl_over_tls_reaches_the_client_arguments() -> None:
    from streamscore.streams.kafka import client_kwargs

    settings = KafkaSettings(bootstrap="broker:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                             sasl_username="worker", sasl_password=SecretStr(SECRET), ssl_cafile=ca_file())
    kwargs = client_kwargs(settings)

    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["bootstrap_servers"] == "broker:9093"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "worker" and kwargs["sasl_plain_password"] == SECRET
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED and kwargs["ssl_context"].check_hostname


@pytest.mark.parametrize(("protocol", "tls", "sasl"), [("PLAINTEXT", False, False), ("SSL", True, False),
                                                       ("SASL_PLAINTEXT", False, True), ("SASL_SSL", True, True)])
def test_kafka_protocols_carry_only_what_they_need(protocol: str, tls: bool, sasl: bool) -> None:
    from streamscore.streams.kafka import client_kwargs, faust_credentials

    settings = KafkaSettings(security_protocol=protocol, sasl_username="worker",  # type: ignore[arg-type]
                             sasl_password=SecretStr(SECRET))
    kwargs = client_kwargs(settings)

    assert ("ssl_context" in kwargs) is tls
    assert ("sasl_plain_password" in kwargs) is sasl
    credentials = faust_credentials(settings)
    if sasl:
        assert credentials.username == "worker" and credentials.password == SECRET
        assert credentials.mechanism.value == "PLAIN" and (credentials.ssl_context is not None) is tls
    elif tls:
        assert isinstance(credentials.context, ssl.SSLContext)
    else:
        assert credentials is None


# ------------------------------------------------------------------------------------------------ Cassandra


def test_cassandra_credentials_and_tls_reach_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from cassandra.auth import PlainTextAuthProvider

    from streamscore.featurestore import cassandra

    seen: dict[str, Any] = {}

    class FakeCluster:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

        def connect(self) -> str:
            return "session"

    monkeypatch.setattr(cassandra, "Cluster", FakeCluster)
    settings = CassandraSettings(hosts=["db1", "db2"], port=9142, username="reader", password=SecretStr(SECRET),
                                 ssl_cafile=ca_file())
    _, session = cassandra.connect(settings)

    assert session == "session" and seen["contact_points"] == ["db1", "db2"] and seen["port"] == 9142
    assert isinstance(seen["auth_provider"], PlainTextAuthProvider)
    assert seen["auth_provider"].username == "reader" and seen["auth_provider"].password == SECRET
    assert isinstance(seen["ssl_context"], ssl.SSLContext) and seen["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert seen["reconnection_policy"].max_delay <= 10, "after an outage the driver must try again within seconds"
    cassandra.connect(CassandraSettings())
    assert seen["auth_provider"] is None and seen["ssl_context"] is None


# ---------------------------------------------------------------------------------------------------- Redis


def test_redis_credentials_and_tls_reach_the_client() -> None:
    from redis.asyncio.connection import SSLConnection

    from streamscore.featurestore.cache import connect

    client = connect(RedisSettings(host="cache", port=6380, username="worker", password=SecretStr(SECRET), ssl=True))
    try:
        pool = client.connection_pool
        assert pool.connection_kwargs["password"] == SECRET and pool.connection_kwargs["username"] == "worker"
        assert pool.connection_class is SSLConnection
    finally:
        asyncio.run(client.aclose())


def test_redis_with_requirepass_answers_the_right_password_only(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Against a real redis-server with requirepass: the right password reads and writes, a wrong one is a
    Redis that does not answer (the cache is bypassed), and the log line about it shows no password."""
    from streamscore.featurestore.cache import FeatureCache

    from .harness import RedisProcess

    redis = RedisProcess(tmp_path, password=SECRET).start()

    async def use(password: str) -> list[bytes | None] | None:
        cache = FeatureCache(RedisSettings(port=redis.port, password=SecretStr(password)), "sec")
        try:
            await cache.put_many([("view", "e1", b"row")])
            return await cache.get_many([("view", "e1")])
        finally:
            await cache.close()

    try:
        with caplog.at_level(logging.WARNING):
            assert asyncio.run(use(SECRET)) == [b"row"]
            assert asyncio.run(use("wrong-" + SECRET)) is None
    finally:
        redis.kill()
    assert "did not answer" in caplog.text
    assert SECRET not in caplog.text


# -------------------------------------------------------------------------------------------------- secrets


def secret_settings() -> Settings:
    return Settings(kafka=KafkaSettings(security_protocol="SASL_SSL", sasl_username="u",
                                        sasl_password=SecretStr(SECRET)),
                    cassandra=CassandraSettings(username="u", password=SecretStr(SECRET)),
                    redis=RedisSettings(password=SecretStr(SECRET)))


def test_secrets_never_show_in_repr_str_or_dumps() -> None:
    settings = secret_settings()

    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump()),
                 repr(settings.kafka), repr(settings.cassandra), repr(settings.redis), f"{settings}"):
        assert SECRET not in text
    assert settings.redis.password is not None and settings.redis.password.get_secret_value() == SECRET


def test_secrets_from_the_environment_are_secret_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSCORE_KAFKA__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("STREAMSCORE_CASSANDRA__PASSWORD", SECRET)
    monkeypatch.setenv("STREAMSCORE_REDIS__PASSWORD", SECRET)
    settings = Settings()

    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()
    assert settings.kafka.sasl_password is not None and settings.kafka.sasl_password.get_secret_value() == SECRET


def test_logging_the_settings_shows_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    settings = secret_settings()
    with caplog.at_level(logging.INFO):
        logging.getLogger("streamscore.test").info("settings: %s / %r", settings, settings)
    assert SECRET not in caplog.text


# --------------------------------------------------------------------------------------------- no eval/pickle


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def python_sources() -> list[Path]:
    return [path for folder in PACKAGE_DIRS for path in (REPO_ROOT / folder).rglob("*.py")]


def unsafe_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module}")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if isinstance(node.func, ast.Name) and name in UNSAFE_CALLS:
                found.append(f"{name}()")
            if name in ("load", "loads") and _module_of(node.func) in ("pickle", "marshal", "yaml", "dill"):
                found.append(f"{_module_of(node.func)}.{name}()")
            if any(keyword.arg == "allow_pickle" and _is_true(keyword.value) for keyword in node.keywords):
                found.append("allow_pickle=True")
    return [f"{path.relative_to(REPO_ROOT)}: {what}" for what in found]


def _module_of(func: ast.expr) -> str:
    return func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""


def _is_true(value: ast.expr) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_nothing_in_the_package_unpickles_or_evaluates() -> None:
    sources = python_sources()
    assert len(sources) > 20

    found = [use for path in sources for use in unsafe_uses(path)]

    assert not found, f"unsafe deserialization or evaluation: {found}"


def test_the_compiled_fast_path_neither() -> None:
    for pyx in (REPO_ROOT / "fastpath").glob("*.pyx"):
        text = pyx.read_text()
        for word in ("pickle", "eval(", "exec(", "marshal", "PyRun_"):
            assert word not in text, f"{pyx.name} mentions {word}"


def test_message_values_reach_the_worker_raw_and_msgpack_builds_no_objects() -> None:
    """Faust is told to hand over raw bytes (its default serializer for an untyped topic could be pickle-like
    codecs by configuration), and msgpack is never given hooks that turn data into objects."""
    app_source = (REPO_ROOT / "workers" / "app.py").read_text()
    assert 'key_serializer="raw"' in app_source and 'value_serializer="raw"' in app_source
    for path in python_sources():
        text = path.read_text()
        for hook in ("ext_hook=", "object_hook=", "list_hook="):
            assert hook not in text or "msgpack" not in text, f"{path}: msgpack {hook}"
