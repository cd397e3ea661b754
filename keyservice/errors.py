"""AWS KMS error types.

Every refusal the service makes is one of these. The HTTP layer turns an error into
``{"__type": <name>, "message": ...}`` with the status below, which is exactly what
botocore parses into ``ClientError.response["Error"]["Code"]``. Messages never carry
key material, plaintext or secrets.
"""

from __future__ import annotations


class KMSError(Exception):
    """Base of every error the service reports on the wire."""

    status: int = 400

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    @property
    def aws_type(self) -> str:
        return type(self).__name__


def _error(name: str, status: int = 400) -> type[KMSError]:
    cls = type(name, (KMSError,), {"status": status, "__doc__": f"AWS KMS ``{name}``."})
    cls.__module__ = __name__
    return cls


# Authentication (SigV4) failures.
MissingAuthenticationTokenException = _error("MissingAuthenticationTokenException", 400)
IncompleteSignatureException = _error("IncompleteSignatureException", 400)
UnrecognizedClientException = _error("UnrecognizedClientException", 400)
InvalidSignatureException = _error("InvalidSignatureException", 400)
AccessDeniedException = _error("AccessDeniedException", 400)

# Protocol.
UnknownOperationException = _error("UnknownOperationException", 400)
SerializationException = _error("SerializationException", 400)
RequestEntityTooLargeException = _error("RequestEntityTooLargeException", 413)

# Service.
ValidationException = _error("ValidationException", 400)
NotFoundException = _error("NotFoundException", 400)
AlreadyExistsException = _error("AlreadyExistsException", 400)
DisabledException = _error("DisabledException", 400)
KMSInvalidStateException = _error("KMSInvalidStateException", 400)
InvalidCiphertextException = _error("InvalidCiphertextException", 400)
IncorrectKeyException = _error("IncorrectKeyException", 400)
InvalidKeyUsageException = _error("InvalidKeyUsageException", 400)
InvalidAliasNameException = _error("InvalidAliasNameException", 400)
InvalidArnException = _error("InvalidArnException", 400)
InvalidMarkerException = _error("InvalidMarkerException", 400)
LimitExceededException = _error("LimitExceededException", 400)
UnsupportedOperationException = _error("UnsupportedOperationException", 400)
MalformedPolicyDocumentException = _error("MalformedPolicyDocumentException", 400)
KMSInternalException = _error("KMSInternalException", 500)
# The store's database is unreachable (PostgreSQL down or restarting): retry later (AWS's 503).
DependencyTimeoutException = _error("DependencyTimeoutException", 503)

# Added for the core: AWS answers an attempt to manage an ``alias/aws/`` alias with this.
NotAuthorizedException = _error("NotAuthorizedException", 400)
TagException = _error("TagException", 400)
DryRunOperationException = _error("DryRunOperationException", 412)

# Imported key material (issue 3).
IncorrectKeyMaterialException = _error("IncorrectKeyMaterialException", 400)
InvalidImportTokenException = _error("InvalidImportTokenException", 400)
ExpiredImportTokenException = _error("ExpiredImportTokenException", 400)

# Grants and policies (issue 4).
InvalidGrantTokenException = _error("InvalidGrantTokenException", 400)
InvalidGrantIdException = _error("InvalidGrantIdException", 400)
