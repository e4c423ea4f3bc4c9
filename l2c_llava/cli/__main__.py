"""``python -m l2c_llava.cli ...`` (the form launchers use: ``accelerate launch -m l2c_llava.cli ...``)."""

import sys

from l2c_llava.cli import main

if __name__ == "__main__":
    sys.exit(main())
