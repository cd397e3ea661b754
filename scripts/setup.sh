#!/usr/bin/env bash
# Installs what kmsfs needs on a Debian machine, idempotently: libfuse3 and libfuse2, a fusermount
# (from `fuse` or `fuse3`, whichever is there: they conflict, so never force one over the other),
# Python's venv, Chromium (the console's browser tests), and a .venv with the project and its test
# tools. Run as root.
#
# Run it (./scripts/setup.sh), or source it (source scripts/setup.sh, as demo.sh and test.sh do):
# sourcing also puts .venv/bin on PATH and defines `say`. Either way the work happens in a
# subshell, so a sourcing shell keeps its own options (no `set -e` left behind to close an
# interactive terminal at the next failing command) and its working directory; a failure returns
# non-zero instead of exiting the caller.

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

_kmsfs_setup() (
set -euo pipefail
cd "$1"

apt_install() {
    say "installing Debian packages: $*"
    if [ "$(id -u)" -ne 0 ]; then
        echo "need root to install $* (run as root, or install them yourself)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

packages=()
# libfuse3 for kmsfs (its own low-level binding, kmsfs/_fuse.py); libfuse2 for the benchmark's passthrough.
if ! ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so\.3'; then
    if apt-cache show libfuse3-4 >/dev/null 2>&1; then packages+=(libfuse3-4); else packages+=(libfuse3-3); fi
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2'; then
    if apt-cache show libfuse2t64 >/dev/null 2>&1; then packages+=(libfuse2t64); else packages+=(libfuse2); fi
fi
if ! command -v fusermount >/dev/null 2>&1 && ! command -v fusermount3 >/dev/null 2>&1; then
    packages+=(fuse3)
fi
# Debian's Chromium for the web console's browser tests (driven by Playwright's Python package with
# executable_path=/usr/bin/chromium; `playwright install` is never run: it downloads a browser).
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v git >/dev/null 2>&1 || packages+=(git)
# PostgreSQL 15 for the tests of the key service's PostgreSQL store (the tests start their own server).
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] && ! command -v initdb >/dev/null 2>&1; then
    packages+=(postgresql-15)
fi
# The backup tests copy cipherdirs with rsync and build a vfat image (a filesystem without xattrs).
command -v rsync >/dev/null 2>&1 || packages+=(rsync)
command -v mkfs.vfat >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.vfat ] || packages+=(dosfstools)
# Kernels without vfat (containers, minimal VMs) get exFAT through FUSE for the same test.
[ -x /usr/sbin/mount.exfat-fuse ] || packages+=(exfat-fuse)
[ -x /usr/sbin/mkfs.exfat ] || packages+=(exfatprogs)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then packages+=(python3-venv); fi
if [ ${#packages[@]} -gt 0 ]; then apt_install "${packages[@]}"; fi

if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || { echo "/dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2; exit 1; }
fi

# The venv is rebuilt only when pyproject.toml changes.
stamp=".venv/.kmsfs-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "creating .venv with kmsfs and its test tools"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test,postgres]'
    echo "$want" > "$stamp"
fi
)

_kmsfs_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if _kmsfs_setup "$_kmsfs_root"; then
    case ":$PATH:" in
        *":$_kmsfs_root/.venv/bin:"*) ;;
        *) export PATH="$_kmsfs_root/.venv/bin:$PATH" ;;
    esac
    unset -f _kmsfs_setup
    unset _kmsfs_root
else
    _kmsfs_status=$?
    unset -f _kmsfs_setup
    unset _kmsfs_root
    echo "kmsfs setup failed (exit $_kmsfs_status)" >&2
    # return when sourced (the caller's shell stays open), exit when run
    (return 0 2>/dev/null) && return "$_kmsfs_status"
    exit "$_kmsfs_status"
fi
