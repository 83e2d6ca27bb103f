"""The lockerd simulator: a hal backend named "sim", its world model and its control surface."""

from sim.backend import (
    SimDisplay,
    SimDoorSensor,
    SimKeypad,
    SimLockDriver,
    SimOccupancySensor,
    SimScanner,
    SimSettings,
    SimTamper,
    world_of,
)
from sim.client import SimClient, request_sync
from sim.control import ControlServer, serve_control
from sim.world import SimError, SimWorld, Subscription, WorldChange

__all__ = [
    "ControlServer",
    "SimClient",
    "SimDisplay",
    "SimDoorSensor",
    "SimError",
    "SimKeypad",
    "SimLockDriver",
    "SimOccupancySensor",
    "SimScanner",
    "SimSettings",
    "SimTamper",
    "SimWorld",
    "Subscription",
    "WorldChange",
    "request_sync",
    "serve_control",
    "world_of",
]
