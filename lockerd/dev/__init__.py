"""Development tools on the simulator (demo, bank provisioning); the only lockerd part using sim."""
