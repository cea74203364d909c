"""`xds-lab simulate`: simulated model servers on consecutive ports until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from xds_lab.simulator.model_server import start_servers
from xds_lab.simulator.options import config_from_args

__all__ = ["run_simulate"]


async def run_simulate(args: argparse.Namespace) -> int:
    """Start `args.count` servers from `args.port` on (all ephemeral when port is 0)."""
    try:
        config = config_from_args(args)
        if args.count < 1 or (args.port and args.port + args.count - 1 > 65535):
            raise ValueError(f"--count {args.count} from --port {args.port} is out of range")
    except ValueError as err:
        print(f"xds-lab simulate: {err}", file=sys.stderr)
        return 2
    ports = [args.port + i if args.port else 0 for i in range(args.count)]
    try:
        servers = await start_servers(config, args.host, ports)
    except OSError as err:
        print(f"xds-lab simulate: {err}", file=sys.stderr)
        return 2
    for server in servers:
        print(f"{server.name}: {config.model} ({args.profile}) on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop()
    return 0
