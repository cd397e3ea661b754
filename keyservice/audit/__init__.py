"""The audit trail (docs/AUDIT.md): ``records`` (the record format and reading it back), ``log``
(appending: hash chain, group commit, signed checkpoints), ``segments`` (the files of each chain),
``commit`` (deferred commits for the event loop), ``signing`` (the sealed checkpoint key),
``verify`` (tamper checks), ``digest`` (the signed heads of every chain), ``review`` (filters,
tables and summaries), ``index`` (the SQLite index beside the log), ``questions`` (the security
officer's questions, from the index or a scan), ``pgmirror`` and ``pgquestions`` (the PostgreSQL
audit table: the copy and the questions over it), ``export`` and ``syslog`` (to a SIEM, as JSON
lines or RFC 5424 over TLS), and ``prune`` (retention)."""
