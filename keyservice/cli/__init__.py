"""The ``keyservice`` command line: ``main`` (parser, serve, init), ``audit``, ``principal``;
``common`` holds what they share."""
