"""streamscore: event-driven pub/sub inference workers.

Requests arrive on Kafka, features come from a Cassandra feature store behind a Redis cache, ONNX Runtime
scores them, and predictions go back to Kafka. The import packages are ``streamscore.streams``,
``streamscore.featurestore``, ``streamscore.fastpath`` and ``streamscore.workers``; this root package holds
the settings and the CLI.
"""

__version__ = "0.1.0"
