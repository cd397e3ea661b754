"""Persistence: ``base`` (the ``Store`` protocol and the AADs binding sealed values to their
rows), ``model`` (the records), ``sqlite`` and ``sqlite_schema`` (the embedded SQLite store, its
schema and migrations), ``rootkey`` (the root key and sealing). See docs/STORE.md."""
