"""The local stack of a streamscore checkout: real Kafka, Cassandra and Redis on 127.0.0.1 (``streamscore stack``).

Checkout tooling, not part of the worker: it lives in ``deploy/local/`` beside the Maven project and config
templates it runs from (see ``stack.py``; the three-node cluster profile: ``cluster.py``).
"""

from .cluster import ClusterStack
from .stack import (
    CHECKOUT,
    DEPLOY_DIR,
    HOST,
    SECURED_CASSANDRA_SUPERUSER,
    SECURED_KAFKA_USER,
    ServerStatus,
    Stack,
    StackError,
    kafka_tls_dir,
)

__all__ = ["CHECKOUT", "DEPLOY_DIR", "HOST", "SECURED_CASSANDRA_SUPERUSER", "SECURED_KAFKA_USER",
           "ClusterStack", "ServerStatus", "Stack", "StackError", "kafka_tls_dir"]
