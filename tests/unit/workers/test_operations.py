"""Readiness, log format and topic replication pieces, without servers."""

from __future__ import annotations

import json
import logging
import sys

from aiokafka import TopicPartition
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError

from streamscore.featurestore.cache import redis_problem
from streamscore.settings import KafkaSettings, RedisSettings
from streamscore.streams.kafka import new_topic
from streamscore.workers.logs import JsonFormatter, logging_config
from streamscore.workers.metrics import WorkerMetrics


def test_json_formatter_writes_one_object_per_record_with_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("faust.worker", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["logger"] == "faust.worker" and entry["level"] == "ERROR" and entry["message"] == "failed x"
    assert entry["ts"].endswith("Z") and "ValueError: boom" in entry["exc"]


def test_logging_config_keeps_the_loggers_that_exist_and_picks_the_format() -> None:
    text, as_json = logging_config("INFO", "text"), logging_config("DEBUG", "json")
    assert text["disable_existing_loggers"] is False and text["root"]["level"] == "INFO"
    assert "format" in text["formatters"]["streamscore"]
    assert as_json["formatters"]["streamscore"]["()"] is JsonFormatter


def test_new_topics_take_the_replication_settings() -> None:
    default = new_topic(KafkaSettings(), "a", 4)
    assert (default.num_partitions, default.replication_factor, default.topic_configs) == (4, 1, {})
    production = new_topic(KafkaSettings(topic_replication_factor=3, topic_min_insync_replicas=2), "b", 1,
                           {"cleanup.policy": "compact"})
    assert production.replication_factor == 3
    assert production.topic_configs == {"cleanup.policy": "compact", "min.insync.replicas": "2"}


def test_redis_problems_are_one_line_naming_the_settings() -> None:
    settings = RedisSettings(port=16390, username="app")
    wrong = redis_problem(settings, "p", AuthenticationError("WRONGPASS invalid username-password pair"))
    assert wrong.startswith("Redis at 127.0.0.1:16390 as user 'app' refused the credentials (WRONGPASS")
    assert "STREAMSCORE_REDIS__PASSWORD" in wrong and "\n" not in wrong
    denied = redis_problem(settings, "p", NoPermissionError("NOPERM this user has no permissions"))
    assert "needs GET, MGET, SET and EVAL on ~p:fv:*" in denied
    away = redis_problem(settings, "p", ConnectionError("Error 111 connecting"))
    assert "does not answer" in away and "STREAMSCORE_REDIS__HOST" in away


def test_lag_gauge_shows_only_the_partitions_reported_last() -> None:
    metrics = WorkerMetrics()
    metrics.report_lag({TopicPartition("t.requests", 0): 5, TopicPartition("t.requests", 1): 0})
    metrics.report_lag({TopicPartition("t.requests", 1): 7})
    lines = [line for line in metrics.render().decode().splitlines() if line.startswith("streamscore_consumer_lag{")]
    assert lines == ['streamscore_consumer_lag{partition="1",topic="t.requests"} 7.0'], lines
