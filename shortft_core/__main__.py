"""``python -m shortft_core``: the command line (see :mod:`shortft_core.cli`)."""

import sys

from .cli import main

sys.exit(main())
