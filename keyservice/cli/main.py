"""The ``keyservice`` command: serve, init, audit.

``serve --dev`` is the no-setup mode (like ``vault server -dev``): the root key is kept inside the
data directory, which is insecure and announced loudly. A real store is created by ``init`` with a
root key from a passphrase (scrypt) or from a key file kept outside the data directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyservice import bootstrap, workers
from keyservice.audit import digest as audit_digest
from keyservice.audit import signing as audit_signing
from keyservice.audit.pgmirror import AuditMirrorError
from keyservice.audit.records import MAIN_CHAIN
from keyservice.cli import audit as cli_audit
from keyservice.cli import backup as cli_backup
from keyservice.cli import principal as cli_principal
from keyservice.cli import startup
from keyservice.cli.common import CliError, OneLineParser, root_source
from keyservice.clock import FileOffsetClock, SystemClock
from keyservice.console.app import build_console
from keyservice.files import write_atomic
from keyservice.http import tls, unix_listener
from keyservice.http.api import KmsApp
from keyservice.http.metrics_listener import MetricsListener
from keyservice.http.server import LISTEN_BACKLOG, Server, bind_socket, endpoint_url
from keyservice.scheduler import DEFAULT_INTERVAL, Scheduler
from keyservice.store import engine, rootkey

DEFAULT_LISTEN = "127.0.0.1:8600"
DEFAULT_REGION = "us-east-1"

DEV_WARNING = """\
WARNING! Dev mode is enabled. The root key is stored INSIDE the data directory
({root}), so anyone who can read that directory can read every key.
Never use dev mode for real data; use `keyservice init` and `keyservice serve` instead.
"""

log = logging.getLogger("keyservice")


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, not {value!r}")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"port {port} of {value!r} is out of range (0-65535)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_serve_listen(value: str) -> tuple[str, int] | Path:
    """``serve --listen``: HOST:PORT, or ``unix:PATH`` (``unix:///abs/path`` too) for a Unix socket."""
    if not value.startswith(unix_listener.SOURCE_PREFIX):
        return _parse_listen(value)
    path = value[len(unix_listener.SOURCE_PREFIX):]
    path = path[2:] if path.startswith("//") else path
    if not path:
        raise argparse.ArgumentTypeError(f"must be unix:PATH, not {value!r}")
    return Path(os.path.abspath(path))


def _split_listen(args: argparse.Namespace) -> unix_listener.SocketOptions | None:
    """Sort ``serve --listen`` (repeatable) into ``args.listen`` (the TCP HOST:PORT, or None when
    only a Unix socket is served) and the Unix socket's options (None without one)."""
    given = args.listen or [_parse_listen(DEFAULT_LISTEN)]
    tcp = [v for v in given if isinstance(v, tuple)]
    unix = [v for v in given if isinstance(v, Path)]
    if len(tcp) > 1 or len(unix) > 1:
        raise CliError("--listen: at most one HOST:PORT and one unix:PATH")
    args.listen = tcp[0] if tcp else None
    socket_options = (args.socket_mode, args.socket_owner, args.socket_group)
    if not unix:
        if any(option is not None for option in socket_options):
            raise CliError("--socket-mode/--socket-owner/--socket-group need --listen unix:PATH")
        return None
    try:
        mode = unix_listener.parse_mode(args.socket_mode) if args.socket_mode else unix_listener.DEFAULT_MODE
    except ValueError:
        raise CliError(f"--socket-mode {args.socket_mode!r} is not an octal mode such as 0660") from None
    return unix_listener.SocketOptions(unix[0], mode, args.socket_owner, args.socket_group)


# The endpoint ``init`` wrote into --credentials-out, recorded so that ``serve`` can say when it
# listens somewhere else (clients using that file would not find it). Not secret.
ENDPOINT_RECORD = "client-endpoint"


def _endpoint_of(listen: tuple[str, int]) -> str:
    """The https endpoint clients use for a server listening on ``listen`` (a wildcard address
    is reached through loopback on this host)."""
    host, port = listen
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _write_credentials(
    path: Path, creds: bootstrap.Credentials, endpoint: str, region: str, ca_bundle: Path | None = None
) -> None:
    payload: dict[str, str] = {
        "endpoint": endpoint,
        "region": region,
        "access_key_id": creds.access_key_id,
        "secret_access_key": creds.secret_access_key,
    }
    if ca_bundle is not None:
        payload["ca_bundle"] = str(ca_bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _new_account_id() -> str:
    return "".join(secrets.choice("0123456789") for _ in range(12))


def cmd_init(args: argparse.Namespace) -> int:
    """Check first, then create; a failed init leaves nothing behind (the data directory, a root
    key file it generated, the credentials file)."""
    data_dir = Path(args.data_dir)
    startup.check_data_dir_path(data_dir)
    if (data_dir / rootkey.ROOT_CONFIG_NAME).exists():
        raise CliError(f"{data_dir} is already initialised")
    endpoint = args.endpoint or _endpoint_of(args.listen)
    parts = urlsplit(endpoint)
    if parts.scheme == "unix":  # kmsfs on this host, through serve --listen unix:PATH
        if parts.netloc or not parts.path.startswith("/"):
            raise CliError(f"--endpoint {endpoint!r} is not a unix:///ABSOLUTE/PATH URL")
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--endpoint {endpoint!r} is not an https://HOST:PORT URL")
    created = [startup.first_missing(data_dir)]
    if args.root_key_file:
        created.append(Path(args.root_key_file))
    if args.credentials_out:
        created.append(Path(args.credentials_out))
    source = root_source(args, confirm=True)
    with startup.undo_on_failure(*created):
        root_key = rootkey.create_root_config(data_dir, source)
        creds = bootstrap.initialize(
            data_dir,
            root_key,
            region=args.region,
            account_id=args.account_id or _new_account_id(),
            store_url=args.store,
        )
        ca_bundle = None
        if not args.no_tls:
            host = urlsplit(endpoint).hostname or "127.0.0.1"
            files = tls.generate(data_dir, [*tls.default_hosts(host), *(args.tls_hostname or [])])
            ca_bundle = files.ca
        (data_dir / ENDPOINT_RECORD).write_text(endpoint + "\n")
        if args.credentials_out:
            _write_credentials(Path(args.credentials_out), creds, endpoint, args.region, ca_bundle)
    serves = f"unix:{parts.path}" if parts.scheme == "unix" else f"{args.listen[0]}:{args.listen[1]}"
    print(f"Initialised {data_dir} (region {args.region}); clients reach it at {endpoint} "
          f"once it serves with --listen {serves}.")
    print("Admin credentials (shown once; keep them safe):")
    print(f"  access_key_id:     {creds.access_key_id}")
    print(f"  secret_access_key: {creds.secret_access_key}")
    if ca_bundle is not None:
        print(f"TLS: private CA {ca_bundle} (give it to clients), server certificate {files.cert}")
    if args.credentials_out:
        print(f"  written to {args.credentials_out}")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tls_setup(
    args: argparse.Namespace, data_dir: Path, host: str
) -> tuple[Path | None, Path | None, Path | None]:
    """(certificate, key, CA bundle for clients) of this server; all None for plain HTTP.

    Plain HTTP only on loopback and only when asked for. Otherwise: the given certificate, or the
    one in DATA_DIR/tls, or (dev mode, or none there yet) a freshly generated private CA.
    """
    if args.insecure_http:
        if not _is_loopback(host):
            raise CliError("--insecure-http is only allowed on a loopback address")
        return None, None, None
    if args.tls_cert:
        if not args.tls_key:
            raise CliError("--tls-cert needs --tls-key")
        return Path(args.tls_cert), Path(args.tls_key), Path(args.ca_bundle) if args.ca_bundle else None
    files = tls.tls_files(data_dir)
    if not files.cert.exists() or not files.key.exists():
        tls.generate(data_dir, tls.default_hosts(host) + list(args.tls_hostname or []))
    return files.cert, files.key, files.ca


def _check_metrics_listen(args: argparse.Namespace) -> None:
    """Refuse a non-loopback --metrics-listen before anything starts (unless the operator insists)."""
    if args.metrics_listen is None:
        return
    host = args.metrics_listen[0]
    if not _is_loopback(host) and not args.metrics_allow_remote:
        raise CliError(
            f"--metrics-listen {host}: /metrics is unauthenticated; use a loopback address "
            "or add --metrics-allow-remote"
        )


def _metrics_listener(args: argparse.Namespace, render: Any) -> MetricsListener | None:
    """The opt-in /metrics listener (unauthenticated, so loopback unless the operator insists)."""
    if args.metrics_listen is None:
        return None
    _check_metrics_listen(args)
    host, port = args.metrics_listen
    try:
        return MetricsListener(host, port, render)
    except OSError as error:
        raise CliError(f"--metrics-listen {host}:{port}: {error.strerror or error}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.background:
        return startup.run_in_background(lambda ready: _run(lambda: _serve(args, ready)))
    return _serve(args, None)


def _serve(args: argparse.Namespace, ready: Callable[[str, Path], None] | None) -> int:
    """Check the address and the data directory, start, announce, serve until SIGTERM/SIGINT. A
    start that fails undoes what it created (a new dev data directory) and says why in one line."""
    unix = _split_listen(args)
    host, port = args.listen or ("", 0)
    if args.listen is not None:
        startup.check_listen(host, port)
    if unix is not None:
        try:
            unix_listener.check(unix)
        except unix_listener.UnixListenError as error:
            raise CliError(str(error)) from None
    temp_dir: Path | None = None
    new_dir: Path | None = None
    if args.dev:
        if args.data_dir:
            data_dir = Path(args.data_dir)
            startup.check_data_dir_path(data_dir)
            new_dir = startup.first_missing(data_dir)
        else:
            temp_dir = data_dir = Path(tempfile.mkdtemp(prefix="keyservice-dev-"))
            new_dir = temp_dir
        rootkey.ensure_private_dir(data_dir)
    else:
        if not args.data_dir:
            raise CliError("--data-dir is required (or use --dev)")
        data_dir = Path(args.data_dir)
        if not (data_dir / rootkey.ROOT_CONFIG_NAME).is_file():
            raise CliError(f"{data_dir} is not an initialised keyservice data directory "
                           f"(keyservice init --data-dir {data_dir}, or serve --dev)")
    closers: list[Callable[[], object]] = []
    with startup.undo_on_failure(new_dir) if new_dir is not None else nullcontext():
        try:
            lock_fd = startup.lock_data_dir(data_dir)
            closers.append(lambda: os.close(lock_fd))
            started = _start(args, data_dir, host, port, unix, closers)
        except BaseException:
            for close in reversed(closers):
                close()
            raise
    serving, running, creds, ca_bundle, tls_cert, region = started
    endpoint = serving.endpoint
    if args.dev:
        sys.stderr.write(DEV_WARNING.format(root=data_dir / rootkey.DEV_KEY_NAME))
    _warn_endpoint_mismatch(data_dir, endpoint, host, tls_cert, ca_bundle, serving.unix_url)
    if creds is not None and args.credentials_out:
        _write_credentials(Path(args.credentials_out), creds, endpoint, region, ca_bundle)
    if args.pid_file:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    _announce(args, ready, data_dir, endpoint, region, creds, ca_bundle, serving.unix_url)
    try:
        if running is not None:  # one process: opened before announcing, so a failure says why
            return running.serve()
        # --workers N: the parent (holding the data-dir lock) only supervises its workers.
        return workers.supervise(args.workers, serving.run)
    finally:
        for close in reversed(closers):
            close()
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _start(args: argparse.Namespace, data_dir: Path, host: str, port: int,
           unix: unix_listener.SocketOptions | None,
           closers: list[Callable[[], object]]) -> tuple[Any, ...]:
    """Unseal the root key, check the store, bind the sockets; with one process also open the store
    and the audit log. Each opened part is added to ``closers`` at once, so a failure further on
    closes it again. With ``--workers N`` the workers open their own after the fork (and share
    both listening sockets; the Unix socket's file is removed by this process, at the very end)."""
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    _check_metrics_listen(args)
    if not args.dev:
        root_key = rootkey.load_root_key(data_dir, root_source(args, confirm=False))
        creds = None
    elif (data_dir / rootkey.ROOT_CONFIG_NAME).exists():
        root_key = rootkey.load_root_key(data_dir, rootkey.RootKeySource.dev())
        creds = bootstrap.admin_credentials(data_dir, root_key, args.store)
    else:
        root_key = rootkey.create_root_config(data_dir, rootkey.RootKeySource.dev())
        creds = bootstrap.initialize(
            data_dir,
            root_key,
            region=args.region or DEFAULT_REGION,
            account_id=_new_account_id(),
            store_url=args.store,
        )
    # The Unix socket is always plain HTTP: TLS only for a TCP listener.
    tls_cert, tls_key, ca_bundle = _tls_setup(args, data_dir, host) if args.listen else (None, None, None)
    region = bootstrap.check_store(data_dir, root_key, args.store, region=args.region)
    sock = None
    if args.listen is not None:
        try:
            sock = bind_socket(host, port)
        except OSError as exc:  # taken since check_listen
            raise startup.listen_error(host, port, exc) from None
        closers.append(sock.close)
    listener = None
    if unix is not None:
        try:
            listener = unix_listener.Listener(unix, LISTEN_BACKLOG)
        except unix_listener.UnixListenError as error:
            raise CliError(str(error)) from None
        closers.append(listener.remove)
    serving = _Serving(args, data_dir, root_key, sock, tls_cert, tls_key, listener)
    del root_key
    running = None
    if args.workers == 1:
        running = serving.open(None)
        closers.append(running.close)
    return serving, running, creds, ca_bundle, tls_cert, region


class _Serving:
    """What a serving process needs, made before any fork: the unsealed root key and the bound
    socket. ``open(index)`` builds the whole server (index None) or worker ``index`` of N."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, root_key: bytes, sock: socket.socket | None,
                 tls_cert: Path | None, tls_key: Path | None,
                 unix: unix_listener.Listener | None = None) -> None:
        self.args, self.data_dir, self.sock, self.unix = args, data_dir, sock, unix
        self._root_key = root_key
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.unix_url = unix.url if unix is not None else None
        if sock is not None:
            host = args.listen[0]
            self.endpoint = endpoint_url("https" if tls_cert else "http", host, sock.getsockname()[1])
        else:
            assert unix is not None
            self.endpoint = unix.url

    def run(self, index: int) -> int:
        """A worker's life: open, serve until SIGTERM, close (``workers.supervise`` forks it)."""
        return self.open(index).serve()

    def open(self, index: int | None) -> _Running:
        args = self.args
        # Unique per node (it names the node's chains in a shared audit table): by default the
        # host name and the port, so two nodes on one host differ too.
        node = args.node_id or f"{socket.gethostname()}-{self._node_suffix()}"
        chain = MAIN_CHAIN if index is None else workers.chain_id(node, index)
        # The service's clock may be shifted for tests (--clock-offset-file); SigV4 always checks real time.
        service_clock = FileOffsetClock(args.clock_offset_file) if args.clock_offset_file else SystemClock()
        running = _Running()
        try:
            service = bootstrap.open_service(
                self.data_dir,
                self._root_key,
                clock=service_clock,
                region=args.region,
                max_keys=args.max_keys,
                allow_pkcs1_import=args.allow_pkcs1_import,
                store_url=args.store,
                audit_chain=chain,
                audit_table_chain=f"{node}:main" if index is None else chain,
            )
            running.closers.append(service.close)  # seals the audit log with a final checkpoint
            render_metrics: Callable[[], tuple[str, str]] = service.metrics_text
            if index is not None:
                share = workers.MetricsShare(self.data_dir, index, args.workers, service.metrics)
                render_metrics = lambda: service.metrics_text(share.summed())  # noqa: E731
                share.start()
                running.closers.append(share.stop)
            mounts = {} if args.no_console else {"/console/": build_console(service, self.data_dir)}
            app = KmsApp(service, SystemClock(), max_body=args.max_body, threads=args.threads, mounts=mounts)
            running.closers.append(app.close)  # the last audit commits, before the final checkpoint
            # With several workers of one node, the first runs the scheduler (its transitions are
            # conditional, so a second run anywhere else would be harmless, only wasted) and writes
            # the signed digest over every chain's head (audit/digest.py).
            if not index:
                signer = audit_signing.load_or_create(self.data_dir, self._root_key)
                running.digests = audit_digest.DigestWriter(self.data_dir, signer, now=service_clock.now)
                running.scheduler = Scheduler(service, interval=args.scheduler_interval)
                # /metrics is not on the KMS port: the opt-in listener, one per node (summed over
                # its workers), bound by the first worker.
                metrics = _metrics_listener(args, render_metrics)
                if metrics is not None:
                    running.closers.append(metrics.stop)
                    metrics.start()
                    print(f"  metrics (unauthenticated): {metrics.endpoint}/metrics", flush=True)
            running.server = Server(app, "", 0, tls_cert=self.tls_cert, tls_key=self.tls_key, sock=self.sock,
                                    refuse=app.refuse_malformed,
                                    unix_sock=self.unix.socket if self.unix is not None else None)
        except BaseException:
            running.close()
            raise
        return running

    def _node_suffix(self) -> str:
        """The TCP port, or for a Unix-socket-only server ``unix-<socket file name>``."""
        if self.sock is not None:
            return str(self.sock.getsockname()[1])
        assert self.unix is not None
        return "unix-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in self.unix.options.path.name)


class _Running:
    """One serving process's parts; ``serve`` runs them until SIGTERM/SIGINT, then closes them."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], object]] = []
        self.server: Server | None = None
        self.scheduler: Scheduler | None = None
        self.digests: audit_digest.DigestWriter | None = None

    def serve(self) -> int:
        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        assert self.server is not None
        if self.scheduler is not None:
            self.scheduler.start()
        if self.digests is not None:
            self.digests.start()
        try:
            self.server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server.stop()
            if self.scheduler is not None:
                self.scheduler.stop()
            self.close()
        return 0

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()
        if self.digests is not None:
            self.digests.stop()  # a last digest, over the final checkpoints
            self.digests = None


def _warn_endpoint_mismatch(data_dir: Path, endpoint: str, host: str, tls_cert: Path | None,
                            ca_bundle: Path | None, unix_url: str | None = None) -> None:
    """One warning line each when clients following ``init``'s credentials file, or checking the
    certificate, would not reach this server: it names the endpoint and the CA involved."""
    try:
        recorded = (data_dir / ENDPOINT_RECORD).read_text().strip()
    except OSError:
        recorded = ""
    socket_path = urlsplit(recorded).path
    if recorded.startswith("unix:"):  # init --endpoint unix:///PATH: served if a listener is that socket
        if unix_url is None or socket_path != urlsplit(unix_url).path:
            sys.stderr.write(f"keyservice: warning: init recorded the endpoint {recorded} (in its "
                             f"credentials file) but this server listens at {endpoint}: clients using "
                             f"that file will not find it; serve with --listen unix:{socket_path}\n")
    elif recorded and unix_url == endpoint:
        sys.stderr.write(f"keyservice: warning: init recorded the endpoint {recorded} (in its credentials "
                         f"file) but this server listens only at {endpoint}\n")
    elif recorded and urlsplit(recorded).port != urlsplit(endpoint).port:
        sys.stderr.write(f"keyservice: warning: init recorded the endpoint {recorded} (in its credentials "
                         f"file) but this server listens at {endpoint}: clients using that file will not "
                         f"find it; serve with --listen matching it, or fix the file's \"endpoint\"\n")
    if tls_cert is not None and host not in ("", "0.0.0.0", "::"):
        names = startup.certificate_names(tls_cert)
        if names is not None and host not in names:
            sys.stderr.write(f"keyservice: warning: the certificate {tls_cert} (CA {ca_bundle}) names "
                             f"{', '.join(sorted(names))}, not {host}: clients of {endpoint} will refuse "
                             "it; move the old certificate aside and serve with --tls-hostname to make a "
                             "new one\n")


def _announce(args: argparse.Namespace, ready: Callable[[str, Path], None] | None, data_dir: Path,
              endpoint: str, region: str, creds: bootstrap.Credentials | None,
              ca_bundle: Path | None, unix_url: str | None = None) -> None:
    """Say where the service is. Foreground: the banner and (dev) the export lines. Background:
    the same as shell lines for ``eval``, to the parent, which then returns."""
    env: dict[str, str] = {}
    if creds is not None:
        env["AWS_ACCESS_KEY_ID"] = creds.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = creds.secret_access_key
    env["AWS_DEFAULT_REGION"] = region
    if ca_bundle:
        env["AWS_CA_BUNDLE"] = str(ca_bundle)
    env["AWS_ENDPOINT_URL_KMS"] = endpoint
    where = endpoint if unix_url in (None, endpoint) else f"{endpoint} and {unix_url}"
    banner = f"keyservice listening on {where} (region {region}, data {data_dir})"
    if ready is None:
        print(banner, flush=True)
        if creds is not None:
            for name, value in env.items():
                print(f"  export {name}={shlex.quote(value)}")
            if unix_url != endpoint:  # the AWS CLI cannot speak to a Unix socket
                print(f"  aws --endpoint-url {endpoint} kms list-keys", flush=True)
        return
    log_file = Path(args.log).absolute() if args.log else data_dir.absolute() / startup.LOG_NAME
    env["KEYSERVICE_PID"] = str(os.getpid())
    lines = [f"# {banner}, pid {os.getpid()}, log {log_file}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    ready("\n".join(lines) + "\n", log_file)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="keyservice", description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 ok, 1 operational error, 2 usage error; audit verify and audit "
               "list/files have more (docs/CLI.md).")
    parser.add_argument("--version", action="version", version=f"keyservice {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (default off)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the AWS KMS protocol")
    serve.add_argument("--dev", action="store_true",
                       help="no-setup dev mode, root key kept in the data dir (default off)")
    serve.add_argument(
        "--listen", type=_parse_serve_listen, action="append", metavar="HOST:PORT|unix:PATH",
        help=f"address to serve on (default {DEFAULT_LISTEN}; port 0 picks a free one); unix:PATH "
             "serves plain HTTP on a Unix socket for kmsfs on this host (give --listen twice for "
             "both; requests are SigV4-verified on either)",
    )
    serve.add_argument("--socket-mode", metavar="OCTAL",
                       help=f"file mode of the unix:PATH socket (default {unix_listener.DEFAULT_MODE:04o})")
    serve.add_argument("--socket-owner", metavar="USER",
                       help="owner of the unix:PATH socket, name or uid (default: the server's user)")
    serve.add_argument("--socket-group", metavar="GROUP",
                       help="group of the unix:PATH socket, name or gid (default: the server's group)")
    serve.add_argument(
        "--data-dir", help="data directory (default: none, required without --dev; dev mode: created "
        "if missing, temporary if omitted)"
    )
    serve.add_argument(
        "--credentials-out", metavar="FILE",
        help="dev mode: write endpoint, region, CA and admin credentials as JSON (default: not written)"
    )
    serve.add_argument(
        "--background", action="store_true",
        help="return once serving, printing export lines for eval \"$(keyservice serve ...)\" "
             "(AWS_* and KEYSERVICE_PID); output then goes to --log (default: foreground)",
    )
    serve.add_argument("--log", metavar="FILE",
                       help=f"with --background: the log file (default DATA_DIR/{startup.LOG_NAME})")
    serve.add_argument("--pid-file", metavar="FILE",
                       help="write the server's pid here while it runs (default: none)")
    serve.add_argument(
        "--region",
        help=f"region of a new dev store (default {DEFAULT_REGION}); for an existing store it must match",
    )
    _root_key_options(serve)
    serve.add_argument("--tls-cert", metavar="PEM",
                       help="server certificate (chain) (default DATA_DIR/tls/server.pem)")
    serve.add_argument("--tls-key", metavar="PEM",
                       help="server private key (default DATA_DIR/tls/server.key)")
    serve.add_argument("--ca-bundle", metavar="PEM",
                       help="with --tls-cert: the CA clients should trust (default: none named)")
    serve.add_argument(
        "--tls-hostname",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for a generated certificate (repeatable; default: the listen "
             "address, localhost, 127.0.0.1, ::1)",
    )
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP (loopback addresses only; for tests and debugging) (default off)",
    )
    _store_option(serve)
    serve.add_argument(
        "--workers", type=int, default=1,
        help="worker processes sharing the listening socket, one core each (default 1)",
    )
    serve.add_argument(
        "--node-id", metavar="NAME",
        help="this node's name in its audit chain ids, unique per node (default: HOSTNAME-PORT)",
    )
    serve.add_argument("--no-console", action="store_true",
                       help="do not serve the web console at /console/ (default: served)")
    serve.add_argument(
        "--metrics-listen",
        type=_parse_listen,
        metavar="HOST:PORT",
        help="serve GET /metrics (Prometheus, unauthenticated, plain HTTP) on this separate address "
        "(default off; loopback only unless --metrics-allow-remote)",
    )
    serve.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow a non-loopback --metrics-listen address (anyone reaching it reads the metrics) "
        "(default off)",
    )
    serve.add_argument("--threads", type=int, default=8,
                       help="worker threads for key management requests (default 8)")
    serve.add_argument("--max-body", type=int, default=256 * 1024,
                       help="request body limit in bytes (default 262144)")
    serve.add_argument("--max-keys", type=int, default=1000, help="customer managed key quota (default 1000)")
    serve.add_argument(
        "--allow-pkcs1-import",
        action="store_true",
        help="accept RSAES_PKCS1_V1_5 wrapping for imported key material (retired by AWS; off by default)",
    )
    serve.add_argument(
        "--scheduler-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help="how often rotation, material expiry and the deletion reaper run (default 60)",
    )
    serve.add_argument(
        "--clock-offset-file",
        metavar="FILE",
        help="TEST ONLY: add the seconds written in FILE to the service clock (never in production)",
    )
    serve.set_defaults(func=cmd_serve)

    init = sub.add_parser(
        "init",
        help=f"create a real store; root key from --root-key-file or "
        f"{rootkey.PASSPHRASE_ENV} / a prompt (scrypt)",
    )
    init.add_argument("--data-dir", required=True, help="the new store's directory, created (required)")
    _root_key_options(init, creating=True)
    _store_option(init)
    init.add_argument("--region", default=DEFAULT_REGION,
                      help=f"the store's region (default {DEFAULT_REGION})")
    init.add_argument("--account-id", help="12-digit account id (default: random)")
    init.add_argument("--credentials-out", metavar="FILE",
                      help="write endpoint, region, CA and the admin credentials as JSON "
                           "(default: not written)")
    init.add_argument(
        "--listen", type=_parse_listen, default=_parse_listen(DEFAULT_LISTEN), metavar="HOST:PORT",
        help=f"where serve will listen: the endpoint in --credentials-out and the certificate follow "
             f"it (default {DEFAULT_LISTEN})",
    )
    init.add_argument(
        "--endpoint", metavar="URL",
        help="endpoint clients use, when not https://LISTEN (e.g. a DNS name) (default: from --listen)",
    )
    init.add_argument(
        "--tls-hostname",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for the server certificate (repeatable; default: the endpoint's "
             "host, localhost, 127.0.0.1, ::1)",
    )
    init.add_argument(
        "--no-tls",
        action="store_true",
        help="do not generate a private CA; bring your own with serve --tls-cert/--tls-key (default off)",
    )
    init.set_defaults(func=cmd_init)

    cli_audit.register(sub)
    cli_backup.register(sub)
    cli_principal.register(sub)
    return parser


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get(engine.STORE_ENV) or None,
        metavar="URL",
        help=f"postgresql://... database holding the store (default ${engine.STORE_ENV}; else the URL "
        "`init` recorded in the data dir; else SQLite in the data dir)",
    )


def _root_key_options(parser: argparse.ArgumentParser, creating: bool = False) -> None:
    parser.add_argument(
        "--root-key-file", metavar="FILE",
        help="root key file outside the data dir" + (" (created with 32 random bytes if missing)"
                                                     if creating else "")
        + f" (default: a passphrase from --root-passphrase-file, {rootkey.PASSPHRASE_ENV} or a prompt)",
    )
    parser.add_argument(
        "--root-passphrase-file", metavar="FILE",
        help="read the root passphrase from FILE, e.g. systemd's $CREDENTIALS_DIRECTORY/... "
             f"(default: {rootkey.PASSPHRASE_ENV}, else a prompt)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kmsfs")
    except PackageNotFoundError:
        return "unknown"


def _run(func: Callable[[], int]) -> int:
    """Run a command; an operator's mistake becomes one line on stderr and exit 1, never a traceback."""
    try:
        return int(func())
    except (CliError, rootkey.RootKeyError, bootstrap.RegionMismatchError, bootstrap.NotInitializedError,
            bootstrap.AlreadyInitializedError, engine.StoreUrlError, AuditMirrorError) as error:
        print(f"keyservice: {error}", file=sys.stderr)
    except ValueError as error:  # bootstrap's checks of --region / --account-id
        print(f"keyservice: {error}", file=sys.stderr)
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            return 0
        where = f": {error.filename}" if error.filename else ""
        print(f"keyservice: {error.strerror or error}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _run(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
