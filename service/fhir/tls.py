"""The TLS option shared by the FHIR client and the SMART token requests."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from service.errors import ConfigError

if TYPE_CHECKING:  # settings are only read here: no run-time import of config
    from service.config import FhirSettings


def ssl_option(settings: FhirSettings) -> ssl.SSLContext | bool:
    """`ssl=` for aiohttp: False when verification is off, a context trusting `ca_bundle` when one
    is set, else True (the system store)."""
    if not settings.verify_tls:
        return False
    if settings.ca_bundle is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    except (OSError, ssl.SSLError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"fhir.ca_bundle: cannot load {settings.ca_bundle}: {reason}") from None
