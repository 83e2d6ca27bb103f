"""Hardware-abstraction layer of lockerd: an abstract base per device kind, a backend registry."""
