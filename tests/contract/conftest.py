"""Contract fixtures: the servers some backends need, as the shared local stack serves them.

A backend that needs a server is a parameter marked ``integration``; its fixture asks the server over its own
protocol whether it is there (Redis: PING here; Cassandra: the store's own connect) and fails the test with what
to do when it is not (``streamscore stack up``): the contract of a backend is never skipped silently. Nothing here
starts or stops a server.
"""

from __future__ import annotations

import pytest
import redis

from streamscore.settings import Settings


@pytest.fixture(scope="session")
def redis_server() -> Settings:
    """Settings whose ``redis`` section reaches a Redis that answers PING."""
    settings = Settings()
    client = redis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {settings.redis.host}:{settings.redis.port} ({exc}): the redis cache contract "
                    "needs one (`streamscore stack up` starts the local stack)", pytrace=False)
    finally:
        client.close()
    return settings
