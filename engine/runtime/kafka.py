"""How every Kafka client of a process connects: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.

The broker's security is one deployment-wide choice (``FIELDSYNC_KAFKA_*``), the same for every
client of a process, so the clients take it from the process settings here instead of through
every function that receives bootstrap servers. kafka-python (admin, small readers) and aiokafka
(capture producer, replay reader) share one spelling; faust (projector, provisioner) takes
credentials objects.
"""

from __future__ import annotations

import ssl
from typing import Any

from engine.config import Settings, get_settings


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    )
    if settings.kafka_ssl_certfile and settings.kafka_ssl_keyfile:
        context.load_cert_chain(str(settings.kafka_ssl_certfile), str(settings.kafka_ssl_keyfile))
    return context


def _sasl(settings: Settings) -> tuple[str, str, str]:
    assert settings.kafka_sasl_username and settings.kafka_sasl_password  # checked at start-up
    return (
        settings.kafka_sasl_mechanism,
        settings.kafka_sasl_username,
        settings.kafka_sasl_password.get_secret_value(),
    )


def client_options(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for kafka-python and aiokafka clients (they share the names);
    ``settings`` defaults to the process settings."""
    settings = settings or get_settings()
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if protocol.startswith("SASL_"):
        mechanism, user, password = _sasl(settings)
        options |= {
            "sasl_mechanism": mechanism,
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }
    return options


def faust_options(settings: Settings) -> dict[str, Any]:
    """``faust.App`` settings: ``broker_credentials`` for a secured broker, else nothing."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    if protocol == "SSL":
        return {"broker_credentials": faust.SSLCredentials(_ssl_context(settings))}
    mechanism, user, password = _sasl(settings)
    credentials = faust.SASLCredentials(
        username=user,
        password=password,
        mechanism=mechanism,
        ssl_context=_ssl_context(settings) if protocol == "SASL_SSL" else None,
    )
    return {"broker_credentials": credentials}


__all__ = ["client_options", "faust_options"]
