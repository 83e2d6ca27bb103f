"""The simulator's terminal UI: see the bank, press its keys, put parcels in, inject faults."""
