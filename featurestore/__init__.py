"""The feature store: feature views, the online store (a contract, ``online.OnlineStore``, with Cassandra and
in-memory backends) and the cache tier in front of it (``cache.CacheTier``, with Redis), picked by name
(``backends``)."""

from .online import FeatureStoreUnavailable, OnlineStore
from .views import Feature, FeatureView, ViewsError, load_views

__all__ = ["Feature", "FeatureStoreUnavailable", "FeatureView", "OnlineStore", "ViewsError", "load_views"]
