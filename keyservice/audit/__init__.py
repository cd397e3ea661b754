"""The audit trail (docs/AUDIT.md): ``records`` (the record format and reading it back), ``log``
(appending: hash chain, group commit, signed checkpoints), ``commit`` (deferred commits for the
event loop), ``signing`` (the sealed checkpoint key), ``verify`` (tamper checks) and ``review``
(queries and summaries for ``keyservice audit``)."""
