"""``python -m bench.key``: see ``bench.key.run``."""

import sys

from bench.key.run import main

if __name__ == "__main__":
    sys.exit(main())
