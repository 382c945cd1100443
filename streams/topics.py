"""Topic names: ``<prefix>.<model>.requests|predictions|dlq``."""

from __future__ import annotations


def requests(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.requests"


def predictions(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.predictions"


def dead_letters(prefix: str, model: str) -> str:
    return f"{prefix}.{model}.dlq"


def replies(prefix: str, client_id: str) -> str:
    """Reply topic of one client's request/reply ``predict`` calls."""
    return f"{prefix}.replies.{client_id}"
