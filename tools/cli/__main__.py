"""`python -m shmwatch.tools.cli ...` is the `shmwatch` command."""

import sys

from .main import main

sys.exit(main())
