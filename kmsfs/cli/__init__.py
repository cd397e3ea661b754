"""The ``kmsfs`` command line: ``main`` (entry points, error printing), ``parser`` (every command's
options), one module per command (``init``, ``mount`` with ``serve`` (the FUSE loop) and
``umount``, ``fsck``, ``upgrade``, ``rewrap``, ``info``, ``path``, ``config``); ``common`` holds
what they share (CliError, credentials, the endpoint check, the key client)."""
