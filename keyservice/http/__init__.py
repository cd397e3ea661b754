"""The wire: ``server`` (uvicorn, TLS, limits), ``api`` (HTTP <-> service translation only),
``sigv4`` (signing and verification; kmsfs imports its signer), ``tls`` (the private CA).

Importing this package imports nothing else, so ``kmsfs`` can import ``sigv4`` without the server."""
