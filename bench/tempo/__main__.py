"""``python -m bench.tempo``: see ``bench.tempo.run``."""

import sys

from bench.tempo.run import main

if __name__ == "__main__":
    sys.exit(main())
