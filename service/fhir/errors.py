"""Exceptions of the FHIR client and its authentication. Messages are one line and never carry a
request body, a token, a key or a client assertion (request bodies can hold PHI)."""

from __future__ import annotations

from service.errors import NeutrowatchError


class FhirError(NeutrowatchError):
    """Base class of everything the FHIR client raises."""


class FhirHttpError(FhirError):
    """The server answered with an error status. `summary` comes from the OperationOutcome (issue
    codes, detail codes and element paths, never its free text; one line, at most 200 characters)."""

    def __init__(self, status: int, summary: str = "") -> None:
        self.status = status
        self.summary = summary
        super().__init__(f"HTTP {status}: {summary}" if summary else f"HTTP {status}")


class PreconditionFailed(FhirHttpError):
    """412: an If-Match version is stale, or an If-None-Exist criterion matched several resources."""


class FhirUnavailable(FhirError):
    """The server could not be reached usefully: retries exhausted, or an ambiguous failure of a
    write that is not safe to repeat (its outcome is unknown)."""

    def __init__(self, message: str, *, reason: str = "", attempts: int = 0) -> None:
        self.reason = reason
        self.attempts = attempts
        super().__init__(message)


class UnsafeLinkError(FhirError):
    """A next link or redirect pointed outside the configured base URL; it was not followed, so the
    access token never left the server's origin."""


class AuthError(FhirError):
    """Authentication failed: discovery, token endpoint refusal (OAuth error code only) or a bad
    token response."""
