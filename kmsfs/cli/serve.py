"""``kmsfs mount``'s FUSE loop, run in this process (the daemon, or ``--foreground``): the key
client, directory keys and open reports, the key pool, the name strategy, then libfuse.

Why apart from ``mount``: ``mount`` decides and forks; this is what the child (or the foreground
process) runs once everything is checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kmsfs.cli.common import CliError, _build
from kmsfs.config import Config
from kmsfs.keyclient import KeyClient

DEFAULT_DIRECTORY_KEY_TTL = 300.0
DEFAULT_REPORT_DEADLINE = 10.0


def _serve(cipherdir: str, mountpoint: str, credentials: str | None, allow_other: bool,
           ready_fd: int | None, debug: bool, args: argparse.Namespace) -> None:
    """Run the FUSE loop in this process (foreground)."""
    from kmsfs._fuse import BINDING, Session
    from kmsfs.core import KmsfsCore
    from kmsfs.inodes import InodeFs
    from kmsfs.operations import KmsfsOperations

    config, client = _build(cipherdir, args, args.kms_timeout, quiet=True)
    pool = None
    dirkeys, reporter = _directory_keys(config, client, args)
    if args.key_pool and dirkeys is None:
        from kmsfs.keypool import DataKeyPool

        # Keys older than the revalidation interval are discarded: revocation reaches creates
        # within the same bound as it reaches open handles. Each pooled create is claimed (a
        # Decrypt with its path) so the audit records it like a direct one.
        pool = DataKeyPool(client.generate_data_key, client.decrypt, config.key_arn, args.key_pool,
                           max(1.0, args.revalidate_after))
        pool.start()
    core = KmsfsCore(cipherdir, config, client, revalidate_after=args.revalidate_after, key_pool=pool,
                     dirkeys=dirkeys, reporter=reporter)
    logging.getLogger("kmsfs").info("FUSE binding %s", BINDING)
    logging.getLogger("kmsfs").info("revalidate open keys after %.1f s; key service timeout %.1f s; "
                                    "sparse files %s", args.revalidate_after, args.kms_timeout,
                                    "on" if core.sparse else "off (backing fs reports no holes)")

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)

    ops = KmsfsOperations(InodeFs(core, _name_strategy(config, client, core, args)), mountpoint,
                          on_ready=ready)
    fsname = os.path.realpath(cipherdir).replace("\\", "\\\\").replace(",", "\\,")
    options = [f"fsname={fsname}", "subtype=kmsfs", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    options.extend(getattr(args, "fs_options", None) or ())  # nosuid, ro, ... (mount -t fuse.kmsfs)
    try:
        Session(ops.handlers(), mountpoint, options, debug=debug).run()
    finally:
        if pool is not None:
            pool.close()
        if reporter is not None:
            reporter.close()


def _directory_keys(config: Config, client: KeyClient, args: argparse.Namespace) -> tuple[Any, Any]:
    """Directory-key mode's key cache and open reporter (None, None for other cipherdirs)."""
    if not config.directory_keys:
        return None, None
    from kmsfs.dirkeys import DirectoryKeys
    from kmsfs.reports import OpenReporter

    ttl = getattr(args, "directory_key_ttl", DEFAULT_DIRECTORY_KEY_TTL)
    deadline = getattr(args, "report_deadline", DEFAULT_REPORT_DEADLINE)
    dirkeys = DirectoryKeys(client, config.key_arn, config.cipherdir_id, ttl)
    reporter = None
    if config.open_reports:
        reporter = OpenReporter(lambda arn, batch: client.report_access(arn, config.cipherdir_id, batch),
                                deadline=deadline, on_refused=dirkeys.drop)
        reporter.start()
    logging.getLogger("kmsfs").info(
        "directory keys: cached for at most %g s; open reports %s", ttl,
        f"on (fail closed after {deadline:g} s)" if reporter else "off (the service lacks them: "
        "audit is per directory-key unwrap only)")
    return dirkeys, reporter


def _name_strategy(config: Config, client: KeyClient, core: Any, args: argparse.Namespace) -> Any:
    """Plaintext names, or the name key unwrapped now (audited as the mount, ``op: names``)."""
    from kmsfs.namekey import NameKey, NameKeyError
    from kmsfs.namespace import EncryptedNames, PlainNames

    if not config.encrypted_names:
        return PlainNames()
    try:
        key = NameKey(client, config, args.revalidate_after)
    except NameKeyError as exc:
        raise CliError(f"cannot mount: {exc}") from None
    logging.getLogger("kmsfs").info("encrypted names (cipherdir id %s)", config.cipherdir_id)
    return EncryptedNames(key, core.root_fd)


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(filename=log_file, level=level, format=fmt, force=True)
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)
    logging.getLogger("fuse").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
