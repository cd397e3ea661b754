"""The ``kmsfs`` command line (one module, mount.py, until it is split by command)."""
