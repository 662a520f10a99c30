"""``python -m hfprune.cli``."""

import sys

from hfprune.cli.main import main

sys.exit(main())
