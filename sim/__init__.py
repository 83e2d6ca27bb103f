"""The lockerd simulator: a hal backend named "sim", its world model and its control surface."""

# The Python API docs/simulator.md shows as `from sim import ...`; everything else is imported
# from the module that defines it.
from sim.backend import world_of
from sim.client import SimClient
from sim.world import SimError

__all__ = ["SimClient", "SimError", "world_of"]
