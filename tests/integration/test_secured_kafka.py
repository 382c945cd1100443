"""Against a real Kafka with SCRAM-SHA-512 on SASL_PLAINTEXT and SASL_SSL listeners (the stack's secured profile,
a broker of its own on ports of its own, its certificate signed by a CA the stack made): the right credentials
carry a request and its reading end to end on both; a wrong password, a PLAINTEXT client on the SASL port and a
TLS client without the stack's CA each end in one line naming what to check."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from streamscore.cli import main
from streamscore.settings import KafkaSettings, Settings, StackSettings, get_settings
from streamscore.streams.client import Client, ensure_topics, tail_consumer
from streamscore.streams.wire import unpack
from streamscore_stack import HOST, SECURED_KAFKA_USER, Stack, StackError, kafka_tls_dir

USER, PASSWORD = SECURED_KAFKA_USER


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    main_stack = get_settings().stack
    settings = StackSettings(dir=tmp_path_factory.mktemp("secured-kafka"), cache_dir=main_stack.cache_dir,
                             kafka_port=_free_port(), kafka_controller_port=_free_port(), kafka_sasl_port=_free_port(),
                             kafka_sasl_ssl_port=_free_port(), servers=["kafka"], secured=True, kafka_heap_mb=512,
                             start_timeout_s=300)
    stack = Stack(settings, echo=lambda line: None)
    try:
        stack.up()
    except StackError as error:
        pytest.fail(f"the secured Kafka did not start:\n{error}", pytrace=False)
    try:
        yield settings
    finally:
        stack.down()


@pytest.fixture(scope="module")
def sasl_port(secured_kafka: StackSettings) -> int:
    return secured_kafka.kafka_sasl_port


def _scram(port: int, password: str = PASSWORD, ca: Path | None = None) -> KafkaSettings:
    return KafkaSettings(bootstrap=f"{HOST}:{port}", security_protocol="SASL_SSL" if ca else "SASL_PLAINTEXT",
                         sasl_mechanism="SCRAM-SHA-512", sasl_username=USER, sasl_password=SecretStr(password),
                         ssl_cafile=ca)


def _cli(env: dict[str, str], *args: str) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, list(args), env=env)
    finally:
        get_settings.cache_clear()


def _one_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("listener", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_scram_credentials_carry_a_request_end_to_end(secured_kafka: StackSettings, listener: str) -> None:
    kafka = _scram(secured_kafka.kafka_sasl_port) if listener == "SASL_PLAINTEXT" else _scram(
        secured_kafka.kafka_sasl_ssl_port, ca=kafka_tls_dir(secured_kafka.dir or Path()) / "ca.pem")
    settings = Settings(topic_prefix=f"scram{uuid.uuid4().hex[:6]}", kafka=kafka)

    async def round_trip() -> dict:
        topic = f"{settings.topic_prefix}.fraud.requests"
        await ensure_topics(settings, [topic], partitions=1)
        consumer = await tail_consumer(settings, topic)
        try:
            async with Client(settings) as client:
                await client.produce("fraud", {"id": "scram-1", "entities": {"card_id": "c1"}, "features": {}})
            batches = await consumer.getmany(timeout_ms=10_000)
            return unpack(next(record for records in batches.values() for record in records).value)
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip())["id"] == "scram-1"


def test_a_wrong_scram_password_ends_in_one_line(sasl_port: int) -> None:
    env = {"STREAMSCORE_KAFKA__BOOTSTRAP": f"{HOST}:{sasl_port}",
           "STREAMSCORE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "STREAMSCORE_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "STREAMSCORE_KAFKA__SASL_USERNAME": USER,
           "STREAMSCORE_KAFKA__SASL_PASSWORD": "not-the-password"}
    line = _one_line(_cli(env, "subscribe", "--model", "fraud", "--count", "1"))
    assert f"refused the SASL credentials of user {USER!r}" in line and "invalid credentials" in line
    assert "STREAMSCORE_KAFKA__SASL_PASSWORD" in line and "not-the-password" not in line


def test_a_plaintext_client_on_the_sasl_port_is_told_the_security_protocol(sasl_port: int) -> None:
    line = _one_line(_cli({"STREAMSCORE_KAFKA__BOOTSTRAP": f"{HOST}:{sasl_port}"},
                          "subscribe", "--model", "fraud", "--count", "1"))
    assert "accepts connections" in line and "STREAMSCORE_KAFKA__SECURITY_PROTOCOL" in line


def test_a_sasl_ssl_client_without_the_stack_ca_is_told_the_tls_settings(secured_kafka: StackSettings) -> None:
    env = {"STREAMSCORE_KAFKA__BOOTSTRAP": f"{HOST}:{secured_kafka.kafka_sasl_ssl_port}",
           "STREAMSCORE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "STREAMSCORE_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "STREAMSCORE_KAFKA__SASL_USERNAME": USER, "STREAMSCORE_KAFKA__SASL_PASSWORD": PASSWORD}
    line = _one_line(_cli(env, "subscribe", "--model", "fraud", "--count", "1"))  # the system CAs did not sign it
    assert "STREAMSCORE_KAFKA__SSL_CAFILE" in line and PASSWORD not in line, line
