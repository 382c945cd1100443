"""The feature store: feature views, the Cassandra online store and the Redis cache in front of it."""

from .views import Feature, FeatureView, ViewsError, load_views

__all__ = ["Feature", "FeatureView", "ViewsError", "load_views"]
