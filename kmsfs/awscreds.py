"""AWS credentials the way the AWS ecosystem resolves them: botocore's provider chain.

Why botocore: users of AWS KMS expect profiles (``~/.aws/credentials``, ``AWS_PROFILE``),
``credential_process``, SSO, assumed roles and instance roles (IMDSv2), each refreshed before it
expires. botocore implements exactly that chain (it is what boto3 and the AWS CLI use); kmsfs only
borrows the *credentials* from it. Requests are still signed by our own SigV4 signer and sent by
our own keep-alive transport (kmsfs/keyclient.py, kmsfs/transport.py), which stay on the hot path.

botocore is imported only here, and only when no ``--credentials`` file is given, so a mount with
a credentials file pays nothing for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kmsfs.keyclient import CA_BUNDLE_ENV, Credentials


class CredentialsNotFound(ValueError):
    """No credentials could be resolved (one line for the operator)."""


def _endpoint(session: Any, env: Mapping[str, str]) -> str | None:
    """The KMS endpoint the AWS configuration names, if any (as the AWS CLI reads it)."""
    for name in ("AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"):
        if env.get(name):
            return env[name]
    try:
        scoped = session.get_scoped_config()
    except Exception:  # noqa: BLE001 - a broken config file is reported when credentials load
        return None
    services = scoped.get("services")
    if isinstance(services, str):
        section = session.full_config.get("services", {}).get(services, {}).get("kms", {})
        if isinstance(section, dict) and section.get("endpoint_url"):
            return str(section["endpoint_url"])
    value = scoped.get("endpoint_url")
    return str(value) if value else None


def resolve(profile: str | None = None, environ: Mapping[str, str] | None = None) -> Credentials:
    """Credentials from botocore's chain: ``profile`` if given (else ``AWS_PROFILE`` / default),
    environment variables, shared files, ``credential_process``, SSO, container and instance
    roles. Temporary credentials are refreshed by botocore before they expire: ``Credentials.current``
    asks it on every request (a lock-protected time check when nothing is due)."""
    import botocore.exceptions
    import botocore.session

    env = os.environ if environ is None else environ
    try:
        session = botocore.session.Session(profile=profile)
        resolved = session.get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise CredentialsNotFound(f"AWS profile {profile or env.get('AWS_PROFILE')!r} not found "
                                  "in the AWS config or credentials files") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise CredentialsNotFound(f"cannot resolve AWS credentials: {exc}") from None
    if resolved is None:
        raise CredentialsNotFound(
            "no credentials: pass --credentials FILE or --aws-profile NAME, or configure the AWS "
            "default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, instance role)")
    try:
        frozen = resolved.get_frozen_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise CredentialsNotFound(f"cannot resolve AWS credentials: {exc}") from None

    def current() -> tuple[str, str, str | None]:
        now = resolved.get_frozen_credentials()  # refreshes (once, under botocore's lock) when due
        return now.access_key, now.secret_key, now.token or None

    region = env.get("AWS_REGION") or session.get_config_variable("region") or None
    ca_bundle = env.get(CA_BUNDLE_ENV) or session.get_config_variable("ca_bundle") or None
    return Credentials(
        access_key_id=frozen.access_key, secret_access_key=frozen.secret_key,
        session_token=frozen.token or None, endpoint=_endpoint(session, env), region=region,
        ca_bundle=ca_bundle, refresh=current,
        source=f"AWS {resolved.method} credentials" + (f" (profile {profile})" if profile else ""),
    )
