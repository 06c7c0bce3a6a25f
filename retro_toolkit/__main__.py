"""`python -m retro_toolkit ...`: the same as `retro-run ...`."""

import sys

from retro_toolkit.cli import main

sys.exit(main())
