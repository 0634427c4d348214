"""`python3 tools/top` from a checkout (with the package installed, as `pip install -e .`
does), or `python3 -m shmwatch.tools.top`; `shmwatch top` calls the same main()."""

import os
import sys

if __package__:  # -m shmwatch.tools.top
    from . import main
else:  # the folder run as a script: sys.path[0] is this folder, whose module names
    # (keys, state, ...) must not shadow others; the checkout goes there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shmwatch.tools.top import main

if __name__ == "__main__":
    sys.exit(main())
