"""``python -m einplan`` runs the command line."""

import sys

from einplan.cli import main

sys.exit(main())
