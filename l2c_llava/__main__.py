"""``python -m l2c_llava``: the ``l2c`` command (for environments where the console script is not on
PATH, e.g. a virtual environment that is not activated)."""

import sys

from l2c_llava.cli import main

if __name__ == "__main__":
    sys.exit(main())
