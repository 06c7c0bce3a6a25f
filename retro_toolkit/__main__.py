import sys

from retro_toolkit.cli import main

sys.exit(main())
