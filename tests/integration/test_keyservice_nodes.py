"""Two ``keyservice serve`` nodes over one real PostgreSQL database.

A key created on node A is used on node B at once; a DisableKey or key-policy change made on A is
refused by B as soon as A has acknowledged it (A acknowledges only once every live node has
applied the change: docs/STORE.md, "Several nodes"); the quota is one counter for both nodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.integration.keyservice_nodes import Cluster, audit_records_by_id, init_cluster
from tests.integration.kmsfs_mount_helpers import kmsfs_init, mounted, requires_fuse

pytestmark = pytest.mark.integration


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    cluster = init_cluster(tmp_path, pg_url)
    try:
        cluster.start_node("a", "--max-keys", "5")
        cluster.start_node("b", "--max-keys", "5")
        yield cluster
    finally:
        cluster.stop_all()


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return caught.value.response["Error"]["Code"]


def test_a_change_on_one_node_is_in_force_on_the_other_when_acknowledged(two_nodes: Cluster) -> None:
    a, b = (two_nodes.client(n) for n in two_nodes.nodes)
    key_id = a.create_key(Description="made on A")["KeyMetadata"]["KeyId"]
    # Used on B at once, and memoised there by repeated use.
    blob = b.encrypt(KeyId=key_id, Plaintext=b"secret")["CiphertextBlob"]
    for _ in range(5):
        assert a.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
        assert b.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"

    took = []
    for _ in range(5):
        started = time.monotonic()
        a.disable_key(KeyId=key_id)
        took.append(time.monotonic() - started)
        # No sleep: "disabled" means no node still serves the key.
        assert _error(b.decrypt, CiphertextBlob=blob) == "DisabledException"
        assert _error(b.encrypt, KeyId=key_id, Plaintext=b"x") == "DisabledException"
        b.enable_key(KeyId=key_id)
        assert a.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
    print(f"DisableKey acknowledged by both nodes in {min(took) * 1000:.1f}-{max(took) * 1000:.1f} ms")

    # A key policy that denies Encrypt to the account root, put on B: refused on A at once.
    account = a.describe_key(KeyId=key_id)["KeyMetadata"]["AWSAccountId"]
    root = f"arn:aws:iam::{account}:root"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": root}, "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Principal": {"AWS": root}, "Action": "kms:Encrypt", "Resource": "*"},
        ],
    }
    assert a.encrypt(KeyId=key_id, Plaintext=b"x")["KeyId"]
    b.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    assert _error(a.encrypt, KeyId=key_id, Plaintext=b"x") == "AccessDeniedException"
    assert a.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"


def test_the_key_quota_is_one_counter_for_all_nodes(two_nodes: Cluster) -> None:
    a, b = (two_nodes.client(n) for n in two_nodes.nodes)
    made = 0
    for client in (a, b, a, b, a):
        client.create_key()
        made += 1
    assert _error(a.create_key) == "LimitExceededException"
    assert _error(b.create_key) == "LimitExceededException"
    key_ids = {k["KeyId"] for k in b.list_keys()["Keys"]}
    assert len(key_ids) == made


def test_an_alias_made_on_one_node_resolves_on_the_other(two_nodes: Cluster) -> None:
    a, b = (two_nodes.client(n) for n in two_nodes.nodes)
    first = a.create_key()["KeyMetadata"]["KeyId"]
    second = a.create_key()["KeyMetadata"]["KeyId"]
    a.create_alias(AliasName="alias/shared", TargetKeyId=first)
    assert b.describe_key(KeyId="alias/shared")["KeyMetadata"]["KeyId"] == first
    a.update_alias(AliasName="alias/shared", TargetKeyId=second)
    assert b.describe_key(KeyId="alias/shared")["KeyMetadata"]["KeyId"] == second
    # The default key is created once, whichever node is asked first.
    one = a.describe_key(KeyId="alias/aws/kmsfs")["KeyMetadata"]["KeyId"]
    assert b.describe_key(KeyId="alias/aws/kmsfs")["KeyMetadata"]["KeyId"] == one


@requires_fuse
def test_a_kmsfs_mount_given_both_endpoints_survives_the_death_of_its_node(two_nodes: Cluster) -> None:
    """The credentials file names node A first and lists both nodes under ``endpoints``: when A is
    killed, opens and creates go on through B (kmsfs fails over in order)."""
    a_node, b_node = two_nodes.nodes
    base = two_nodes.base
    creds = dict(two_nodes.credentials)
    creds["endpoint"] = a_node.endpoint
    creds["endpoints"] = [a_node.endpoint, b_node.endpoint]
    creds["ca_bundle"] = two_nodes.ca_bundle
    creds_file = base / "kmsfs-credentials.json"
    creds_file.write_text(json.dumps(creds))
    key_id = two_nodes.client(a_node).create_key()["KeyMetadata"]["KeyId"]
    cipher = base / "cipher"
    cipher.mkdir()
    kmsfs_init(cipher, a_node.endpoint, key_id, creds_file)
    with mounted(cipher, base / "plain", creds_file) as plain:
        (plain / "before.txt").write_bytes(b"written while A lives")
        a_node.kill()
        assert (plain / "before.txt").read_bytes() == b"written while A lives"  # an open: Decrypt on B
        (plain / "after.txt").write_bytes(b"created after A died")  # a create: GenerateDataKey on B
        assert (plain / "after.txt").read_bytes() == b"created after A died"
    b_records = audit_records_by_id([b_node.data_dir]).values()
    assert {"Decrypt", "GenerateDataKey"} <= {r["operation"] for r in b_records}
