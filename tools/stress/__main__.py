"""`python3 tools/stress` from a checkout (with the package installed, as `pip install -e .`
does), or `python3 -m shmwatch.tools.stress`; `shmwatch stress` calls the same main().
The worker processes (spawned) import the package by name, never this file."""

import os
import sys

if __package__:  # -m shmwatch.tools.stress
    from . import main
else:  # the folder run as a script: sys.path[0] is this folder, whose module names
    # (spec, records, ...) must not shadow others; the checkout goes there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shmwatch.tools.stress import main

if __name__ == "__main__":
    sys.exit(main())
