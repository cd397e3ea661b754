"""``python -m kmsfs`` = the ``kmsfs`` console script."""

import sys

from kmsfs.cli import main

sys.exit(main())
