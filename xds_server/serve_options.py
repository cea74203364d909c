"""The options of `serve` (and `body-router`) that configure trust: TLS files and limits.

Kept out of cli.py so the command line reads as commands; every per-client limit of
`xds_server.admission.ClientLimits` is a flag, generated from one table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lrs.spread import REPORTERS_PER_POOL
from xds_server.admission import ClientLimits
from xds_server.tls import TlsFiles

__all__ = [
    "add_limit_arguments",
    "add_spread_argument",
    "add_tls_arguments",
    "client_limits",
    "reporters_per_pool",
    "tls_files",
]


def add_tls_arguments(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--tls-cert",
        type=Path,
        help=f"PEM certificate chain: {where} speak TLS only (with --tls-key); the files are "
        "re-read when they change",
    )
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: require client certificates it signed (mTLS); a node's identity "
        "is then its certificate's SPIFFE ID (or URI / DNS SAN), bound to node groups by "
        "their `identities`",
    )


#: ClientLimits field -> (flag type, help). Every limit is a flag of `serve`.
_LIMIT_FLAGS: dict[str, tuple[Callable[[str], float], str]] = {
    "max_streams": (int, "open xDS + LRS streams of all clients together"),
    "max_streams_per_peer": (int, "open streams of one client (identity with mTLS, else IP)"),
    "max_names_per_subscription": (int, "resource names one xDS subscription may name"),
    "admission_rate": (float, "new streams admitted per second (a reconnect storm is paced)"),
    "admission_burst": (int, "new streams admitted at once before pacing starts"),
    "admission_wait": (float, "seconds a new stream may wait for admission"),
    "max_xds_request_bytes": (int, "largest xDS request accepted"),
    "max_lrs_request_bytes": (int, "largest LRS report accepted"),
    "max_connection_age": (float, "seconds before a connection must reconnect (±10 %%; 0: off)"),
    "max_connection_age_grace": (float, "seconds an aged connection's streams may finish"),
}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ClientLimits()
    group = parser.add_argument_group("per-client limits (over one: RESOURCE_EXHAUSTED)")
    for name, (kind, text) in _LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=_non_negative(kind),
            default=default,
            help=f"{text} (default {default})",
        )


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if not 0 <= number < 1e12:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
        return number

    return parse


def add_spread_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lrs-reporters-per-pool",
        type=_non_negative(int),
        default=REPORTERS_PER_POOL,
        metavar="K",
        help="spread load reporting: each pool is asked of K of the Envoys that could report "
        "it (all of them when fewer) and their rates are scaled to the rest; 0 asks every "
        f"Envoy for every pool (default {REPORTERS_PER_POOL})",
    )


def reporters_per_pool(args: argparse.Namespace) -> int | None:
    """--lrs-reporters-per-pool as the service takes it: None for full reporting."""
    return int(args.lrs_reporters_per_pool) or None


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise SystemExit("xds-server: --tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SystemExit("xds-server: give both --tls-cert and --tls-key")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def client_limits(args: argparse.Namespace) -> ClientLimits:
    return ClientLimits(**{name: getattr(args, name) for name in _LIMIT_FLAGS})
