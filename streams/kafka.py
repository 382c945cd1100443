"""Kafka connection arguments from settings, shared by the worker, the client SDK and the tools."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from streamscore.settings import KafkaSettings


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    if settings.ssl_certfile is not None:  # mutual TLS
        context.load_cert_chain(str(settings.ssl_certfile), str(settings.ssl_keyfile) if settings.ssl_keyfile else None)
    return context


def connection_problem(settings: KafkaSettings, error: BaseException, detail: str | None = None) -> str:
    """One line on why no connection to Kafka was made: nothing listening at the bootstrap address, credentials
    refused (``detail``: what the client logged), or a listener that closed the connection (most often one that
    expects another security protocol)."""
    said = " ".join(str(error).split()) or type(error).__name__
    if detail is not None and "SaslAuthenticationFailed" in detail:
        reason = " ".join(detail.split(": ", 1)[-1].split())
        return (f"Kafka at {settings.bootstrap} refused the SASL credentials of user {settings.sasl_username!r} "
                f"({reason}): check STREAMSCORE_KAFKA__SASL_USERNAME, STREAMSCORE_KAFKA__SASL_PASSWORD (or "
                f"__SASL_PASSWORD_FILE) and __SASL_MECHANISM ({settings.sasl_mechanism})")
    if detail is not None and ("CERTIFICATE_VERIFY_FAILED" in detail or "SSL:" in detail):
        reason = " ".join(detail.split(": ", 1)[-1].split())
        return (f"Kafka at {settings.bootstrap} and this client did not agree on TLS ({reason}): check "
                "STREAMSCORE_KAFKA__SSL_CAFILE (the CA that signed the brokers' certificates) and __SSL_CERTFILE / "
                "__SSL_KEYFILE (a client certificate, where the brokers ask for one)")
    if detail is not None:
        said = f"{said}; {' '.join(detail.split())}"
    hosts = [host.strip() for host in settings.bootstrap.split(",") if host.strip()]
    if not any(_accepts(host) for host in hosts):
        return (f"nothing answers at {settings.bootstrap} ({said}): is Kafka running, and is "
                "STREAMSCORE_KAFKA__BOOTSTRAP right?")
    return (f"Kafka at {settings.bootstrap} accepts connections but the client with security_protocol "
            f"{settings.security_protocol} got no answer ({said}): does the listener expect another protocol? "
            "Check STREAMSCORE_KAFKA__SECURITY_PROTOCOL (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL) and the "
            "SASL/TLS settings")


def _accepts(host_port: str) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for aiokafka producers, consumers and admin clients."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return kwargs


def new_topic(settings: KafkaSettings, name: str, partitions: int, configs: dict[str, str] | None = None) -> Any:
    """A topic to create with the replication settings (``topic_replication_factor``,
    ``topic_min_insync_replicas``) and ``configs``."""
    from aiokafka.admin import NewTopic

    topic_configs = dict(configs or {})
    if settings.topic_min_insync_replicas is not None:
        topic_configs["min.insync.replicas"] = str(settings.topic_min_insync_replicas)
    return NewTopic(name, partitions, settings.topic_replication_factor, topic_configs=topic_configs)


def faust_broker(settings: KafkaSettings) -> list[str]:
    return [f"kafka://{host.strip()}" for host in settings.bootstrap.split(",") if host.strip()]


def faust_credentials(settings: KafkaSettings) -> Any:
    import faust

    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        return faust.SASLCredentials(username=settings.sasl_username, password=password,
                                     mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None
