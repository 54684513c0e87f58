"""`python -m imagic ...`, as `imagic ...`: what `accelerate launch -m imagic batch` runs."""

import sys

from .cli import main

sys.exit(main())
