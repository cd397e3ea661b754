"""``python -m kmsfs`` = the ``kmsfs`` console script."""

import sys

from kmsfs.cli.mount import main

sys.exit(main())
