"""The feature store's pluggable parts by name (as faust's ``stores`` registry): ``Settings.online_store`` and
``Settings.cache`` name an entry here. A new backend is a module beside ``cassandra``/``memory`` implementing
``online.OnlineStore`` (or one implementing ``cache.CacheTier``), an entry below, and its name in the settings'
``Literal``; ``tests/contract`` then runs the contract suite on it (and fails until it has a fixture there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from streamscore.settings import Settings

from .cache import CacheTier, FeatureCache
from .cassandra import CassandraStore
from .memory import MemoryStore
from .online import OnlineStore
from .views import FeatureView

T = TypeVar("T")

ONLINE_STORES: dict[str, type[OnlineStore]] = {
    "cassandra": CassandraStore,
    "memory": MemoryStore,
}

CACHES: dict[str, type[CacheTier] | None] = {
    "redis": FeatureCache,
    "none": None,  # no cache tier: every read goes to the online store, writes are not fenced
}


def online_store(settings: Settings, views: Mapping[str, FeatureView]) -> OnlineStore:
    """The online store ``settings.online_store`` names, made from its settings (not connected)."""
    return _pick(ONLINE_STORES, settings.online_store, "online_store").from_settings(settings, views)


def cache_tier(settings: Settings) -> CacheTier | None:
    """The cache tier ``settings.cache`` names (None for ``none``)."""
    tier = _pick(CACHES, settings.cache, "cache")
    return None if tier is None else tier.from_settings(settings)


def _pick(registry: Mapping[str, T], name: str, setting: str) -> T:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"STREAMSCORE_{setting.upper()}={name!r} names no backend; known: {sorted(registry)}") \
            from None
