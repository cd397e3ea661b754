"""The ``mount.fuse`` calling convention, so ``/etc/fstab`` and ``mount -t fuse.kmsfs`` work.

``mount -t fuse.kmsfs CIPHERDIR MOUNTPOINT -o OPTS`` (or an fstab line of type ``fuse.kmsfs``)
makes mount(8) run ``mount.fuse.kmsfs`` if installed, else ``mount.fuse`` which runs
``kmsfs CIPHERDIR MOUNTPOINT -o OPTS``. Both end here: the ``-o`` list becomes the arguments of
``kmsfs mount`` (which daemonizes and returns once the mount is ready, as mount(8) expects).

Options: ``credentials=FILE``, ``aws_profile=NAME``, ``endpoint=URL``, ``ca_bundle=PEM``,
``log=FILE``, ``key_pool=N``, ``kms_timeout=S``, ``revalidate_after=S``, ``allow_other``,
``nonempty``, ``strict``; kernel mount flags (``ro``, ``nosuid``, ``nodev``, ``noexec``,
``noatime`` ...) go to the FUSE mount (``kmsfs mount --fs-options``). Options that are mount(8)'s
or systemd's (``defaults``, ``auto``, ``noauto``, ``nofail``, ``_netdev``, ``x-*``, ``comment=``)
are ignored here. Any other option is refused: silently ignoring one would mount something other
than what the fstab line says.

mount(8) runs helpers with no PATH (``/bin/sh`` then searches /usr/local/bin, /usr/bin, /bin ...):
install ``kmsfs`` or ``mount.fuse.kmsfs`` there (docs/CLI.md).
"""

from __future__ import annotations

import argparse

VALUE_OPTIONS = {
    "credentials": "--credentials", "aws_profile": "--aws-profile", "endpoint": "--endpoint",
    "ca_bundle": "--ca-bundle", "log": "--log", "key_pool": "--key-pool",
    "kms_timeout": "--kms-timeout", "revalidate_after": "--revalidate-after",
}
FLAG_OPTIONS = {"allow_other": "--allow-other", "nonempty": "--nonempty", "strict": "--strict"}
# Kernel mount flags libfuse passes on to mount(2) (its own table of them).
FS_FLAGS = frozenset({"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime",
                      "noatime", "relatime", "norelatime", "diratime", "nodiratime", "sync", "async",
                      "dirsync"})
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
IGNORED_PREFIXES = ("x-", "comment=")


def fs_options(text: str) -> list[str]:
    """``--fs-options`` value: known kernel mount flags only (argparse type)."""
    flags = [flag for flag in text.split(",") if flag]
    unknown = [flag for flag in flags if flag not in FS_FLAGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mount flag(s) {','.join(unknown)}; known: "
                                         + ",".join(sorted(FS_FLAGS)))
    return flags


class HelperError(Exception):
    """A mount option kmsfs does not know, or a malformed helper command line (exit 2)."""


def mount_args(source: str, target: str, options: list[str]) -> list[str]:
    """``kmsfs mount`` arguments for a mount.fuse-style call."""
    args = ["mount", source, target]
    flags: list[str] = []
    for group in options:
        for option in filter(None, group.split(",")):
            name, sep, value = option.partition("=")
            if name in VALUE_OPTIONS and sep:
                args += [VALUE_OPTIONS[name], value]
            elif name in FLAG_OPTIONS and not sep:
                args.append(FLAG_OPTIONS[name])
            elif option in FS_FLAGS:
                flags.append(option)
            elif option in IGNORED or option.startswith(IGNORED_PREFIXES):
                continue
            else:
                raise HelperError(f"mount option {option!r} is not supported by kmsfs "
                                  "(see docs/CLI.md, mount.fuse form)")
    if flags:
        args += ["--fs-options", ",".join(flags)]
    return args


def translate(argv: list[str], commands: set[str]) -> list[str] | None:
    """``kmsfs mount ...`` arguments if ``argv`` is a mount.fuse-style call, else None.

    Recognised when the first argument is neither a subcommand nor an option:
    ``SOURCE TARGET [-o OPTS]... [-n] [-s] [-v] [-t TYPE]`` (flags mount(8) may pass; ``-f``,
    mount's "fake", is refused rather than mounting for real).
    """
    if not argv or argv[0] in commands or argv[0].startswith("-"):
        return None
    positional: list[str] = []
    options: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "-o":
            if not rest:
                raise HelperError("-o needs an option list")
            options.append(rest.pop(0))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg == "-t":
            if rest:
                rest.pop(0)
        elif arg in ("-n", "-s", "-v"):
            continue
        elif arg.startswith("-"):
            raise HelperError(f"unsupported mount helper flag {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError("usage: kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS] (mount.fuse form), or "
                          "kmsfs COMMAND ... (kmsfs --help)")
    return mount_args(positional[0], positional[1], options)

