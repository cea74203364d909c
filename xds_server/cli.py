"""`xds-server` command line: serve, validate, bootstrap, body-router."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from xds_server import __version__
from xds_server.serve_options import (
    add_limit_arguments,
    add_spread_argument,
    add_tls_arguments,
)

__all__ = [
    "DEFAULT_SNAPSHOT",
    "build_parser",
    "cmd_body_router",
    "cmd_bootstrap",
    "cmd_validate",
    "command_parser",
    "default_snapshot",
    "host_port",
    "main",
    "port_number",
    "start_logging",
]

DEFAULT_SNAPSHOT = "data/demo.yaml"


def default_snapshot() -> Path:
    """The embedded demo snapshot, served when no --snapshot is given."""
    return Path(str(resources.files("xds_server").joinpath(DEFAULT_SNAPSHOT)))


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def port_number(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value!r}")
    return int(value)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1e6:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _module_name(value: str) -> str:
    if not all(part.isidentifier() for part in value.split(".")):
        raise argparse.ArgumentTypeError(
            f"expected a module name like acme.policies, got {value!r}"
        )
    return value


def _add_policy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-policy-module",
        type=_module_name,
        action="append",
        default=[],
        metavar="MODULE",
        help="allow custom weight policies (`policy: module:Class`) from MODULE and the modules "
        "under it; repeatable. Without it such a policy is refused, not imported (its code "
        "would run). The built-in headroom policy is always allowed",
    )


def _allowed_host(value: str) -> str:
    from xds_server.admin.hosts import normalize_host

    try:
        normalize_host(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _controller_name(value: str) -> str:
    import re

    domain, _, name = value.partition("/")
    label = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
    if not re.fullmatch(rf"{label}(\.{label})*", domain) or not re.fullmatch(label, name):
        raise argparse.ArgumentTypeError(
            f"expected DOMAIN/NAME (a DNS subdomain, a slash, a DNS label), got {value!r}"
        )
    return value


def _non_negative_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 3600, got {value!r}")
    return number


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with --version and --log-level (xds-server's, and xds-lab's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def start_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "xds-server", "xDS control plane for LLM inference fleets (ADS SotW + Delta for Envoy)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve xDS and the admin API until SIGINT/SIGTERM",
        description="Serve xDS (gRPC) and the admin API from a snapshot file, reloading it on "
        "every edit. A bad edit is refused and the last good config keeps serving.",
    )
    serve.add_argument(
        "--snapshot", type=Path, help="snapshot YAML file (default: the embedded demo.yaml)"
    )
    serve.add_argument(
        "--xds-port", type=port_number, default=18000, help="gRPC port (default 18000)"
    )
    serve.add_argument(
        "--admin-port", type=port_number, default=8080, help="admin port (default 8080)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)")
    serve.add_argument(
        "--admin-host", default="127.0.0.1", help="admin bind address (default 127.0.0.1)"
    )
    serve.add_argument(
        "--router-port",
        type=port_number,
        default=18001,
        help="body router (ext_proc) gRPC port on --host (default 18001; 0 picks a free one, "
        "and the generated config follows it)",
    )
    serve.add_argument(
        "--state",
        type=Path,
        help="JSON file where admin API changes (drains, added/removed endpoints) persist "
        "across restarts (default: kept in memory only)",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the bearer token that admin API changes need (default: "
        "$XDS_ADMIN_TOKEN; with neither, changes are refused); at least 32 characters",
    )
    serve.add_argument(
        "--admin-read-token-file",
        type=Path,
        help="file holding a bearer token that reads need too (default: "
        "$XDS_ADMIN_READ_TOKEN; with neither, reads are open); the admin token also reads; "
        "/healthz and /readyz stay open",
    )
    serve.add_argument(
        "--admin-tls-cert",
        type=Path,
        help="PEM certificate chain: serve the admin API over HTTPS (with --admin-tls-key); "
        "both files are re-read when they change",
    )
    serve.add_argument("--admin-tls-key", type=Path, help="PEM private key of --admin-tls-cert")
    serve.add_argument(
        "--admin-allowed-host",
        action="append",
        type=_allowed_host,
        default=[],
        metavar="HOST",
        help="a Host name the admin API answers, any port (repeatable; '*' for any). Default: "
        "localhost, 127.0.0.1 and [::1] when --admin-host is loopback, else any (warned)",
    )
    serve.add_argument(
        "--lrs-interval",
        type=_positive,
        default=1.0,
        help="seconds between an Envoy's load reports (default 1)",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="run as one of several replicas sharing the admin overlay, the fleet's load and "
        "the weight table through this Redis (redis://HOST:PORT/DB); replaces --state",
    )
    serve.add_argument(
        "--lease-ttl",
        type=_positive,
        default=3.0,
        help="with --redis: seconds the weight leader's lease lasts without renewal; a dead "
        "leader is replaced within about this long (default 3)",
    )
    serve.add_argument(
        "--redis-prefix",
        default="xds",
        help="key prefix in Redis, so that several fleets can share one (default xds)",
    )
    serve.add_argument(
        "--drain-period",
        type=_non_negative_seconds,
        default=8.0,
        help="on SIGTERM/SIGINT: seconds over which open streams are closed one by one, so "
        "Envoys reconnect to other replicas gradually (default 8, inside docker stop's 10 s; "
        "a second signal stops at once)",
    )
    serve.add_argument(
        "--lrs-cpu-budget",
        type=_positive,
        default=0.5,
        help="cores that merging load reports may use before Envoys are asked to report "
        "less often (default 0.5)",
    )
    serve.add_argument(
        "--kubernetes",
        action="store_true",
        help="pools with `kubernetes:` take their endpoints from the cluster (EndpointSlices "
        "of a Service, or the Pods of an InferencePool): in-cluster service account inside a "
        "pod, else $KUBECONFIG or ~/.kube/config, as kubectl",
    )
    serve.add_argument(
        "--kubernetes-controller-name",
        type=_controller_name,
        default="xds-server/control-plane",
        metavar="DOMAIN/NAME",
        help="the controllerName (and parentRef {group: DOMAIN, kind: ControlPlane, name: "
        "NAME}) written to the status of the InferencePools served (default "
        "xds-server/control-plane)",
    )
    add_tls_arguments(serve, "the gRPC ports (xDS + LRS, body router)")
    add_limit_arguments(serve)
    add_spread_argument(serve)
    _add_policy_argument(serve)

    validate = sub.add_parser(
        "validate",
        help="check a snapshot file",
        description="Check a snapshot file. Exit 0 when valid; otherwise exit 1 and print one "
        "line per problem: file, path in the document, what is wrong.",
    )
    validate.add_argument("file", type=Path)
    _add_policy_argument(validate)

    boot = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap that points at this server",
        description="Print a ready Envoy bootstrap (ADS over gRPC, SotW or Delta) to stdout.",
    )
    boot.add_argument("--node-id", required=True, help="Envoy node.id (unique per Envoy)")
    boot.add_argument(
        "--cluster",
        default="inference-gateway",
        help="Envoy node.cluster: selects the node group (default inference-gateway)",
    )
    boot.add_argument(
        "--xds-address",
        type=host_port,
        action="append",
        default=[],
        help="HOST:PORT of xds-server (default 127.0.0.1:18000); repeat it for several "
        "replicas, or give one DNS name that resolves to all of them",
    )
    boot.add_argument("--delta", action="store_true", help="use Delta xDS instead of SotW")
    boot.add_argument(
        "--grpc",
        action="store_true",
        help="print a bootstrap for proxyless gRPC xDS clients (JSON, for GRPC_XDS_BOOTSTRAP) "
        "instead of Envoy's",
    )
    boot.add_argument("--tls-ca", type=Path, help="CA that signs xds-server's certificate")
    boot.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM)")
    boot.add_argument("--tls-key", type=Path, help="this client's private key (PEM)")
    boot.add_argument(
        "--sds-dir",
        type=Path,
        help="where to write the two SDS files the Envoy bootstrap reads the TLS files "
        "through (default: the directory of --tls-cert); Envoy follows rotated files",
    )
    boot.add_argument(
        "--envoy-admin-port",
        type=port_number,
        default=9901,
        help="Envoy's admin port (default 9901)",
    )

    router = sub.add_parser(
        "body-router",
        help="run the body-based model router (Envoy ext_proc) on its own",
        description="Serve the body router alone until SIGINT/SIGTERM: Envoy's external "
        "processor that reads the model from OpenAI-style JSON bodies and sets "
        "x-gateway-model-name. It follows the listeners and model routes of a snapshot file "
        "(the one the control plane serves), reloading it on every edit. `serve` runs one "
        "itself; use this when Envoy's router should run elsewhere.",
    )
    router.add_argument(
        "--snapshot", type=Path, help="snapshot YAML file (default: the embedded demo.yaml)"
    )
    router.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    router.add_argument(
        "--port",
        type=port_number,
        default=18001,
        help="gRPC port (default 18001; 0 picks a free one)",
    )
    router.add_argument(
        "--metrics-port",
        type=port_number,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: not served)",
    )
    _add_policy_argument(router)
    add_tls_arguments(router, "the router's gRPC port")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from xds_server.config.reader import load_config
    from xds_server.config.types import SnapshotError

    try:
        config = load_config(args.file, allowed_policy_modules=args.allow_policy_module)
    except SnapshotError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    print(
        f"{args.file}: valid: {len(config.listeners)} listeners, {len(config.pools)} pools, "
        f"{len(config.node_groups)} node groups"
    )
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from xds_server.bootstrap import (
        ClientTls,
        envoy_bootstrap,
        grpc_bootstrap,
        render_yaml,
        sds_files,
    )

    files = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(files) and not all(files):
        print(
            "xds-server bootstrap: give all of --tls-ca, --tls-cert and --tls-key", file=sys.stderr
        )
        return 2
    tls = None
    if all(files):
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            print(f"xds-server bootstrap: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
        ca, cert, key = (f.resolve() for f in files)
        tls = ClientTls(ca, cert, key, (args.sds_dir or cert.parent).resolve())
    addresses = args.xds_address or [("127.0.0.1", 18000)]
    if args.grpc:
        document = grpc_bootstrap(args.node_id, args.cluster, addresses, tls)
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    if tls is not None:
        for path, text in sds_files(tls).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"xds-server bootstrap: wrote {path}", file=sys.stderr)
    bootstrap = envoy_bootstrap(
        node_id=args.node_id,
        node_cluster=args.cluster,
        delta=args.delta,
        envoy_admin_port=args.envoy_admin_port,
        tls=tls,
        xds_addresses=addresses,
    )
    sys.stdout.write(render_yaml(bootstrap))
    return 0


def cmd_body_router(args: argparse.Namespace) -> int:
    from xds_server.run import body_router

    return asyncio.run(body_router(args, args.snapshot or default_snapshot()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(args)
    if args.command == "serve":
        from xds_server.run import serve

        return asyncio.run(serve(args, args.snapshot or default_snapshot()))
    handlers = {
        "validate": cmd_validate,
        "bootstrap": cmd_bootstrap,
        "body-router": cmd_body_router,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
