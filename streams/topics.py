"""Topic names: ``<prefix>.<model>.requests|predictions|dlq|deployments|shadow|labels|labels.dlq|monitoring|alerts``."""

from __future__ import annotations


def requests(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.requests"


def predictions(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.predictions"


def dead_letters(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.dlq"


def deployments(prefix: str, model: str) -> str:
    """The model's deployment state (compacted, one partition; key: the model name)."""
    return f"{prefix}.{model}.deployments"


def shadow(prefix: str, model: str) -> str:
    """Shadow versions' outputs beside the answer's, one record per request and shadow version."""
    return f"{prefix}.{model}.shadow"


def labels(prefix: str, model: str) -> str:
    """Ground truth in: one label per request id (msgpack ``{id, label, event_ms}``), read by the monitor."""
    return f"{prefix}.{model}.labels"


def labels_dead_letters(prefix: str, model: str) -> str:
    """Labels the monitor could not use (unknown id, duplicate, not 0/1, undecodable, late), reason in headers."""
    return f"{prefix}.{model}.labels.dlq"


def monitoring(prefix: str, model: str) -> str:
    """Window reports of the model (``kind``: ``accuracy`` from the monitor, ``drift`` from the workers)."""
    return f"{prefix}.{model}.monitoring"


def worker_group(prefix: str) -> str:
    """The consumer group of every worker of a prefix (all its models): stable, so an autoscaler can read its
    lag (the Helm chart's KEDA trigger names it)."""
    return f"{prefix}-workers"


def alerts(prefix: str, model: str) -> str:
    """Alert events (``state``: ``raised`` / ``cleared``), one pair per episode of a rule and version."""
    return f"{prefix}.{model}.alerts"


def replies(prefix: str, client_id: str) -> str:
    """Reply topic of one client's request/reply ``predict`` calls."""
    return f"{prefix}.replies.{client_id}"


# --------------------------------------------------------------------------------------------- the rules
# Every rule about topic names lives here; the compiled decoder mirrors TOPIC_NAME_CHARS/MAX_TOPIC_NAME_LEN in C
# and the parity tests hold it to the pure-Python twin, which reads them from here.

TOPIC_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
"""Characters Kafka allows in a topic name."""
MAX_TOPIC_NAME_LEN = 249
"""Longest topic name Kafka allows."""
REFUSED_TOPICS = frozenset({".", "..", "__consumer_offsets", "__transaction_state", "__share_group_state",
                            "__cluster_metadata"})
"""Names Kafka never takes a write to (invalid, or internal): a reply_to naming one is dead-lettered at once
instead of being retried against the broker."""


def is_topic_name(name: str) -> bool:
    """Whether Kafka would accept ``name`` as a topic name (letters, digits, '.', '_', '-'; 1..249 of them)."""
    return 0 < len(name) <= MAX_TOPIC_NAME_LEN and TOPIC_NAME_CHARS.issuperset(name)


def reply_to_refusal(topic: str, allowed_prefixes: tuple[str, ...] | None) -> str | None:
    """Why a request may not name ``topic`` as its reply_to (None when it may): a topic Kafka takes no writes
    to, or one outside ``allowed_prefixes`` (the worker's own prefix plus STREAMSCORE_WORKER__REPLY_TO_PREFIXES;
    None allows any topic)."""
    if topic in REFUSED_TOPICS:
        return f"'reply_to' {topic!r} names a topic Kafka takes no writes to"
    if allowed_prefixes and not topic.startswith(allowed_prefixes):
        return (f"'reply_to' {topic!r} is not allowed: it must start with one of {list(allowed_prefixes)} "
                "(STREAMSCORE_WORKER__REPLY_TO_PREFIXES)")
    return None
