"""`python -m sim.wire`: run a simulated bank's hardware on pseudo-terminals."""

import sys

from sim.wire.bank import main

sys.exit(main())
