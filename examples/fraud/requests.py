"""Demo inference requests: seeded card transactions in wire format v1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .data import generate_feature_rows, generate_transactions

FEATURE_SEED = 7
"""Seed of the demo's feature rows: the store, the generator and the offline check all use it."""


def as_request(request_id: str, transaction: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": request_id,
        "entities": {"card_id": transaction["card_id"], "merchant_id": transaction["merchant_id"]},
        "features": {"amount": transaction["amount"], "hour": transaction["hour"],
                     "is_foreign": transaction["is_foreign"]},
    }


def demo_requests(count: int, seed: int, id_prefix: str = "txn") -> Iterator[dict[str, Any]]:
    rows = generate_feature_rows(FEATURE_SEED)
    for index, transaction in enumerate(generate_transactions(rows, count, seed, with_labels=False)):
        yield as_request(f"{id_prefix}-{seed}-{index}", transaction)
