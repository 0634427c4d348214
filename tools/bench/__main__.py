"""`python3 tools/bench` from a checkout (with the package installed, as `pip install -e .`
does), or `python3 -m shmwatch.tools.bench`; `shmwatch bench` calls the same main()."""

import os
import sys

if __package__:  # -m shmwatch.tools.bench
    from . import main
else:  # the folder run as a script: sys.path[0] is this folder, whose module names
    # (record, results, ...) must not shadow others; the checkout goes there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shmwatch.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
