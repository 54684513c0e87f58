"""`python -m imagic.cli`: the `imagic` command without its console script."""

import sys

from . import main

sys.exit(main())
