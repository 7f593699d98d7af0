"""FHIR R4 access: the HTTP client (`FhirClient`) and its authentication (`make_auth`)."""

from .auth import Auth, BearerAuth, NoAuth, SmartBackendAuth, make_auth
from .client import FhirClient, Page
from .errors import (
    AuthError,
    FhirError,
    FhirHttpError,
    FhirUnavailable,
    PreconditionFailed,
    UnsafeLinkError,
)

__all__ = [
    "Auth", "AuthError", "BearerAuth", "FhirClient", "FhirError", "FhirHttpError", "FhirUnavailable", "NoAuth",
    "Page", "PreconditionFailed", "SmartBackendAuth", "UnsafeLinkError", "make_auth",
]
