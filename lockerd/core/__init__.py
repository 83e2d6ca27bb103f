"""Pure, synchronous state machines of lockerd: no I/O, time passed in as an argument."""
