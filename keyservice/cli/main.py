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
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyservice import bootstrap
from keyservice.cli import audit as cli_audit
from keyservice.cli import principal as cli_principal
from keyservice.cli.common import CliError, root_source
from keyservice.clock import FileOffsetClock, SystemClock
from keyservice.files import write_atomic
from keyservice.http import tls
from keyservice.http.api import KmsApp
from keyservice.http.metrics_listener import MetricsListener
from keyservice.http.server import Server
from keyservice.scheduler import DEFAULT_INTERVAL, Scheduler
from keyservice.store import rootkey

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
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


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
    data_dir = Path(args.data_dir)
    if (data_dir / rootkey.ROOT_CONFIG_NAME).exists():
        raise CliError(f"{data_dir} is already initialised")
    root_key = rootkey.create_root_config(data_dir, root_source(args, confirm=True))
    creds = bootstrap.initialize(
        data_dir, root_key, region=args.region, account_id=args.account_id or _new_account_id()
    )
    print(f"Initialised {data_dir} (region {args.region}).")
    print("Admin credentials (shown once; keep them safe):")
    print(f"  access_key_id:     {creds.access_key_id}")
    print(f"  secret_access_key: {creds.secret_access_key}")
    ca_bundle = None
    if not args.no_tls:
        host = urlsplit(args.endpoint).hostname or "127.0.0.1"
        files = tls.generate(data_dir, [*tls.default_hosts(host), *(args.tls_hostname or [])])
        ca_bundle = files.ca
        print(f"TLS: private CA {files.ca} (give it to clients), server certificate {files.cert}")
    if args.credentials_out:
        _write_credentials(Path(args.credentials_out), creds, args.endpoint, args.region, ca_bundle)
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


def _metrics_listener(args: argparse.Namespace, render: Any) -> MetricsListener | None:
    """The opt-in /metrics listener (unauthenticated, so loopback unless the operator insists)."""
    if args.metrics_listen is None:
        return None
    host, port = args.metrics_listen
    if not _is_loopback(host) and not args.metrics_allow_remote:
        raise CliError(
            f"--metrics-listen {host}: /metrics is unauthenticated; use a loopback address "
            "or add --metrics-allow-remote"
        )
    try:
        return MetricsListener(host, port, render)
    except OSError as error:
        raise CliError(f"--metrics-listen {host}:{port}: {error.strerror or error}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    host, port = args.listen
    temp_dir: Path | None = None
    if args.dev:
        if args.data_dir:
            data_dir = Path(args.data_dir)
        else:
            temp_dir = data_dir = Path(tempfile.mkdtemp(prefix="keyservice-dev-"))
        if (data_dir / rootkey.ROOT_CONFIG_NAME).exists():
            root_key = rootkey.load_root_key(data_dir, rootkey.RootKeySource.dev())
            creds = bootstrap.admin_credentials(data_dir, root_key)
        else:
            root_key = rootkey.create_root_config(data_dir, rootkey.RootKeySource.dev())
            creds = bootstrap.initialize(
                data_dir, root_key, region=args.region or DEFAULT_REGION, account_id=_new_account_id()
            )
    else:
        if not args.data_dir:
            raise CliError("--data-dir is required (or use --dev)")
        data_dir = Path(args.data_dir)
        root_key = rootkey.load_root_key(data_dir, root_source(args, confirm=False))
        creds = None
    tls_cert, tls_key, ca_bundle = _tls_setup(args, data_dir, host)
    # The service's clock may be shifted for tests (--clock-offset-file); SigV4 always checks real time.
    service_clock = FileOffsetClock(args.clock_offset_file) if args.clock_offset_file else SystemClock()
    service = bootstrap.open_service(
        data_dir,
        root_key,
        clock=service_clock,
        region=args.region,
        max_keys=args.max_keys,
        allow_pkcs1_import=args.allow_pkcs1_import,
    )
    del root_key
    app = KmsApp(service, SystemClock(), max_body=args.max_body, threads=args.threads)
    scheduler = Scheduler(service, interval=args.scheduler_interval)
    server = Server(app, host, port, tls_cert=tls_cert, tls_key=tls_key, refuse=app.refuse_malformed)
    endpoint = server.endpoint
    metrics = _metrics_listener(args, service.metrics_text)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if args.dev:
        sys.stderr.write(DEV_WARNING.format(root=data_dir / rootkey.DEV_KEY_NAME))
    print(f"keyservice listening on {endpoint} (region {service.region}, data {data_dir})", flush=True)
    if creds is not None:
        print(f"  export AWS_ACCESS_KEY_ID={creds.access_key_id}")
        print(f"  export AWS_SECRET_ACCESS_KEY={creds.secret_access_key}")
        print(f"  export AWS_DEFAULT_REGION={service.region}")
        if ca_bundle:
            print(f"  export AWS_CA_BUNDLE={ca_bundle}")
        print(f"  aws --endpoint-url {endpoint} kms list-keys", flush=True)
        if args.credentials_out:
            _write_credentials(Path(args.credentials_out), creds, endpoint, service.region, ca_bundle)
    if metrics is not None:
        print(f"  metrics (unauthenticated): {metrics.endpoint}/metrics", flush=True)
        metrics.start()
    scheduler.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if metrics is not None:
            metrics.stop()
        app.close()  # the last audit commits, before the log's final checkpoint
        scheduler.stop()
        service.close()  # seals the audit log with a final checkpoint
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyservice", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the AWS KMS protocol")
    serve.add_argument("--dev", action="store_true", help="no-setup dev mode (root key kept in the data dir)")
    serve.add_argument(
        "--listen", type=_parse_listen, default=_parse_listen(DEFAULT_LISTEN), metavar="HOST:PORT"
    )
    serve.add_argument(
        "--data-dir", help="data directory (dev mode: created if missing, temporary if omitted)"
    )
    serve.add_argument(
        "--credentials-out", metavar="FILE", help="dev mode: write endpoint and admin credentials"
    )
    serve.add_argument(
        "--region",
        help=f"region of a new dev store (default {DEFAULT_REGION}); for an existing store it must match",
    )
    serve.add_argument("--root-key-file", metavar="FILE", help="root key file (kept outside the data dir)")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain); default DATA_DIR/tls")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key")
    serve.add_argument("--ca-bundle", metavar="PEM", help="with --tls-cert: the CA clients should trust")
    serve.add_argument(
        "--tls-hostname",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for a generated certificate (repeatable)",
    )
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP (loopback addresses only; for tests and debugging)",
    )
    serve.add_argument(
        "--metrics-listen",
        type=_parse_listen,
        metavar="HOST:PORT",
        help="serve GET /metrics (Prometheus, unauthenticated, plain HTTP) on this separate address; "
        "off by default, loopback only unless --metrics-allow-remote",
    )
    serve.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow a non-loopback --metrics-listen address (anyone reaching it reads the metrics)",
    )
    serve.add_argument("--threads", type=int, default=8, help="worker threads for key management requests")
    serve.add_argument("--max-body", type=int, default=256 * 1024, help="request body limit in bytes")
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
    init.add_argument("--data-dir", required=True)
    init.add_argument(
        "--root-key-file",
        metavar="FILE",
        help="root key file outside the data dir (created with 32 random bytes if missing)",
    )
    init.add_argument("--region", default=DEFAULT_REGION)
    init.add_argument("--account-id", help="12-digit account id (random if omitted)")
    init.add_argument("--credentials-out", metavar="FILE", help="write the admin credentials as JSON")
    init.add_argument(
        "--endpoint", default=f"https://{DEFAULT_LISTEN}", help="endpoint recorded in that file"
    )
    init.add_argument(
        "--tls-hostname",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for the server certificate (repeatable)",
    )
    init.add_argument(
        "--no-tls",
        action="store_true",
        help="do not generate a private CA (bring your own with serve --tls-cert/--tls-key)",
    )
    init.set_defaults(func=cmd_init)

    cli_audit.register(sub)
    cli_principal.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (CliError, rootkey.RootKeyError, bootstrap.RegionMismatchError) as error:
        print(f"keyservice: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
