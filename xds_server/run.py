"""The long-running commands, `serve` and `body-router`: start, wait for a signal, stop.

Apart from cli.py (the parser and the quick commands) so the parser loads nothing heavy;
imported when one of these commands runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from xds_server.serve_options import client_limits, reporters_per_pool, tls_files

__all__ = ["body_router", "serve"]


async def serve(args: argparse.Namespace, snapshot: Path) -> int:
    """`xds-server serve`: exit 2 with the reason when it cannot start."""
    from xds_server.admin.auth import TokenError
    from xds_server.admin.tls import TlsError
    from xds_server.app import ControlPlane, Settings
    from xds_server.config.state_file import StateFileError
    from xds_server.config.types import SnapshotError
    from xds_server.kubernetes.client import KubernetesConfigError
    from xds_server.kubernetes.source import KubernetesOptions
    from xds_server.tls import TlsFilesError

    settings = Settings(
        snapshot=snapshot,
        host=args.host,
        xds_port=args.xds_port,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
        router_port=args.router_port,
        state=args.state,
        admin_token_file=args.admin_token_file,
        admin_read_token_file=args.admin_read_token_file,
        admin_tls_cert=args.admin_tls_cert,
        admin_tls_key=args.admin_tls_key,
        admin_allowed_hosts=tuple(args.admin_allowed_host),
        lrs_interval=args.lrs_interval,
        lrs_cpu_budget=args.lrs_cpu_budget,
        lrs_reporters_per_pool=reporters_per_pool(args),
        tls=tls_files(args),
        limits=client_limits(args),
        allowed_policy_modules=tuple(args.allow_policy_module),
        drain_period=args.drain_period,
        redis=args.redis,
        redis_prefix=args.redis_prefix,
        lease_ttl=args.lease_ttl,
        kubernetes=KubernetesOptions(controller_name=args.kubernetes_controller_name)
        if args.kubernetes
        else None,
    )
    if args.redis and args.state:
        print(
            "xds-server: --redis keeps the overlay and weights in Redis; drop --state",
            file=sys.stderr,
        )
        return 2
    plane = ControlPlane(settings)
    try:
        await plane.start()
    except (
        SnapshotError,
        OSError,
        StateFileError,
        TokenError,
        TlsError,
        TlsFilesError,
        KubernetesConfigError,
    ) as err:
        await plane.stop(0)  # whatever started before the failure
        if isinstance(err, SnapshotError):
            print(f"xds-server: {settings.snapshot} is not valid, not serving:", file=sys.stderr)
            for problem in err.problems:
                print(f"  {problem}", file=sys.stderr)
        else:
            print(f"xds-server: {err}", file=sys.stderr)
        return 2
    signals = await _until_signalled()
    draining = asyncio.create_task(plane.shutdown())
    again = asyncio.create_task(signals.wait())
    await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():  # a second signal: stop now
        draining.cancel()
        await plane.stop(0)
    again.cancel()
    return 0


async def _until_signalled() -> asyncio.Event:
    """Wait for SIGINT/SIGTERM; returns an event set again by the next one."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    stop.clear()
    logging.getLogger(__name__).info("shutting down")
    return stop


async def body_router(args: argparse.Namespace, snapshot: Path) -> int:
    """`xds-server body-router`: exit 2 with the reason when it cannot start."""
    from xds_server.config.types import SnapshotError
    from xds_server.router.standalone import StandaloneRouter
    from xds_server.tls import TlsFilesError

    router = StandaloneRouter(
        snapshot,
        args.host,
        args.port,
        args.metrics_port,
        allowed_policy_modules=tuple(args.allow_policy_module),
        tls=tls_files(args),
    )
    try:
        await router.start()
    except TlsFilesError as err:
        print(f"xds-server: {err}", file=sys.stderr)
        return 2
    except SnapshotError as err:
        print(f"xds-server: {router.source.path} is not valid:", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in err.problems), file=sys.stderr)
        return 2
    except OSError as err:
        print(f"xds-server: {err}", file=sys.stderr)
        await router.stop(0)
        return 2
    await _until_signalled()
    await router.stop()
    return 0
