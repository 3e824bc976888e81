"""``python -m bench.song``: see ``bench.song.run``."""

import sys

from bench.song.run import main

if __name__ == "__main__":
    sys.exit(main())
