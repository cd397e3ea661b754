"""``python -m kmsfs`` = the ``kmsfs`` console script."""

import sys

from kmsfs.cli.main import main

sys.exit(main())
