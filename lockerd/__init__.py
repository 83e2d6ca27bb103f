"""lockerd: the controller daemon of a parcel-locker bank."""

__version__ = "0.1.0"
