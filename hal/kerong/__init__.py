"""Kerong CU16 RS-485 lock boards: a pure codec, a serial transport and the bus driver."""
