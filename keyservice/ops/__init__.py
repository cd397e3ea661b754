"""The AWS KMS operations, one module per group (keys, aliases, encryption, reencrypt, rotation,
deletion, importing, tagging, default_keys, grants, key_policies; kmsfs_reports, our extension for
kmsfs's open reports); ``registry`` is the one table ``{operation: handler}``. Operations use the
core (``keyservice.service``); the core never imports them."""
