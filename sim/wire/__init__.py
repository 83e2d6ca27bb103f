"""Wire-level device emulators: the real protocols on pseudo-terminals, driven by the simulator's world."""  # noqa: E501
