"""Server outages mid-stream: Redis, Cassandra, the Kafka broker. Each is taken away while requests stream and
brought back; nothing is lost, and each degrades only as documented.

The short versions keep the normal suite fast: Redis is a redis-server of the test's own (with ``requirepass``,
so it also proves the worker authenticates with STREAMSCORE_REDIS__PASSWORD), Cassandra is cut behind a TCP
proxy (connections reset, new ones refused: what a client sees when the process dies; no second Cassandra to
start), and Kafka is the private stack's broker alone. The soak versions kill the private stack's servers
(``.stack-soak``, own ports) and start them again through the Stack API. The shared stack is never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from .checks import assert_nothing_lost
from .harness import PRIVATE, SHARED, Endpoints, PrivateStack, RedisProcess, Scenario, Tally, TcpProxy
from .scenarios import ProxyOutage, RedisOutage, StackServerOutage, cassandra_outage, kafka_restart, redis_outage

REDIS_PASSWORD = "s3cret-Redis-pw-7f2c"


@pytest.mark.timeout(240)
def test_redis_down_bypasses_the_cache_then_uses_it_again(scenario: Callable[..., Scenario],
                                                           tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis", password=REDIS_PASSWORD).start()
    try:
        endpoints = Endpoints(SHARED.kafka_bootstrap, SHARED.cassandra_port, redis.port, REDIS_PASSWORD)
        chosen = scenario("redis", endpoints)
        result = asyncio.run(redis_outage(chosen, RedisOutage(redis), count=3_000, rate=250))
        keys = redis.client().dbsize()
    finally:
        redis.kill()

    assert_nothing_lost(result, repeat_bound=0)
    assert result.notes["degraded"] == 0, "Cassandra answered all along: nothing may be degraded"
    assert keys > 0, "the worker wrote nothing into the password-protected Redis"
    log = (chosen.folder / "worker-redis.log").read_text()
    assert REDIS_PASSWORD not in log, "the Redis password appears in the worker's log"


@pytest.mark.timeout(240)
def test_cassandra_down_answers_cached_normally_and_the_rest_with_defaults(
        scenario: Callable[..., Scenario]) -> None:
    proxy = TcpProxy(SHARED.cassandra_port).start()
    try:
        endpoints = Endpoints(SHARED.kafka_bootstrap, proxy.port, SHARED.redis_port)
        outcome = asyncio.run(cassandra_outage(scenario("cassandra", endpoints), ProxyOutage(proxy), count=2_000,
                                               rate=400))
    finally:
        proxy.close()

    assert_nothing_lost(outcome.tally, repeat_bound=0)
    assert outcome.tally.notes["degraded_during_outage"] == outcome.tally.notes["during_outage"] > 0


@pytest.mark.timeout(300)
def test_kafka_broker_restart_loses_nothing(scenario: Callable[..., Scenario], private_kafka: PrivateStack) -> None:
    endpoints = Endpoints(PRIVATE.kafka_bootstrap, SHARED.cassandra_port, SHARED.redis_port)
    result = asyncio.run(kafka_restart(scenario("kafka", endpoints), StackServerOutage(private_kafka, "kafka"),
                                       count=3_000, rate=200))

    assert_nothing_lost(result, result.notes["repeat_bound"])


# --------------------------------------------------------------------------------------------------- soak


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_redis_down(scenario: Callable[..., Scenario], private_stack: PrivateStack,
                         soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(redis_outage(scenario("redis", PRIVATE), StackServerOutage(private_stack, "redis"),
                                      count=30_000, rate=800))
    soak_report(result)

    assert_nothing_lost(result, repeat_bound=0)
    assert result.notes["degraded"] == 0


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_cassandra_down(scenario: Callable[..., Scenario], private_stack: PrivateStack,
                             soak_report: Callable[[Tally], None]) -> None:
    outcome = asyncio.run(cassandra_outage(scenario("cassandra", PRIVATE),
                                           StackServerOutage(private_stack, "cassandra"), count=20_000, rate=1_000))
    soak_report(outcome.tally)

    assert_nothing_lost(outcome.tally, repeat_bound=0)
    assert outcome.tally.notes["degraded_during_outage"] == outcome.tally.notes["during_outage"] > 0


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_kafka_broker_restart(scenario: Callable[..., Scenario], private_stack: PrivateStack,
                                   soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(kafka_restart(scenario("kafka", PRIVATE), StackServerOutage(private_stack, "kafka"),
                                       count=50_000, rate=1_000))
    soak_report(result)

    assert_nothing_lost(result, result.notes["repeat_bound"])
