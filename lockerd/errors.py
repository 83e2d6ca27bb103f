"""Exception tree of the lockerd package: one root, subclasses by phase."""


class LockerdError(Exception):
    """Root of every error lockerd raises on purpose."""


class ConfigError(LockerdError):
    """The configuration file is missing, unreadable or invalid; the message names file and key."""


class StoreError(LockerdError):
    """A local database cannot be opened or is not in the expected shape."""


class TrustError(LockerdError):
    """A signed document (keyring, codes bundle, command, token) is refused.

    `reason` is a short machine-readable word for events (`cache.rejected` data.reason);
    the message says in plain words what is wrong and what to fix.
    """

    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
