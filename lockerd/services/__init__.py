"""The asyncio services that connect the pure core to the hardware, the stores and the network."""
