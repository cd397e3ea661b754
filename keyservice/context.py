"""The request context: who asked, from where, and (for kmsfs) on behalf of which local process.

Built by the HTTP layer after SigV4 verification and handed to the service core, which
records it in the audit log. Nothing here is secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its account, its ARN and the access key it signed with."""

    account_id: str
    arn: str
    access_key_id: str


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    source_address: str
    principal: Principal | None = None
    user_agent: str = ""
    # kmsfs sends, in the signed header X-Kmsfs-Caller (JSON), the file path inside the mount and
    # the local uid / pid / process name of the FUSE request; stored verbatim in the audit record.
    caller: dict[str, object] = field(default_factory=dict)
    # On the Unix-socket listener only: the connecting process as the kernel reported it
    # (SO_PEERCRED uid, gid, pid, plus comm and exe from /proc): who actually connected, beside
    # ``caller``, which says who the client claims to act for. None on TCP.
    peer: dict[str, object] | None = None
