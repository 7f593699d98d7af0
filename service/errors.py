"""The service's own exceptions: each says what went wrong in one line, without PHI."""


class NeutrowatchError(Exception):
    """Base class; `str(err)` is a one-line message fit for an operator."""


class ConfigError(NeutrowatchError):
    """The configuration is invalid; the message names the field."""


class InputError(NeutrowatchError):
    """An input path cannot be read at all (a bad resource inside a readable file is not an error)."""


class StoreError(NeutrowatchError):
    """The state store cannot be opened, is locked, or a transaction failed (nothing was changed)."""
