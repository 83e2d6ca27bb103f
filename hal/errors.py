"""Exception tree of the hal package: one root, subclasses by phase."""


class HalError(Exception):
    """Root of every error raised by the hardware-abstraction layer."""


class BackendError(HalError):
    """A backend cannot be loaded or configured (unknown name, missing library, bad option)."""


class HardwareFault(HalError):
    """A device misbehaved at run time (no answer, I/O error); the daemon reports and carries on."""
