"""``python -m normsvc``: the ``normsvc`` command (see :mod:`normsvc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
