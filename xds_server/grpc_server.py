"""The one way this product starts a gRPC server (xDS + LRS, and the body router).

Shared so that every port gets the same message limits and keepalive, and so that a
port already in use is an error rather than a silently shared socket. With TLS
configured the port speaks only TLS: a plaintext client fails its handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from xds_server.tls import ServerTls

__all__ = ["SERVER_OPTIONS", "start_grpc_server"]

#: New calls gRPC core may hold before the server takes them, and for how long (seconds):
#: room for a whole fleet reconnecting at once, on a loaded machine.
MAX_PENDING_CALLS = 50_000
MAX_PENDING_SECONDS = 300
#: Options for every gRPC server of ours: large LRS reports (a node is ~61 KB),
#: and keepalive so a vanished client's stream is noticed and freed.
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 0x7FFFFFFF),
    # gRPC core holds new calls until the application takes them and, by default, cancels
    # some at random once 1,000 wait (all past 3,000), and any that waited 30 s: more than
    # 1,000 Envoys connecting at once lost streams before admission saw them
    # (bench/fanout.py, 2,000 and 10,000 streams started together, CANCELLED). Admission
    # bounds and paces streams itself (xds_server/admission.py).
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ("grpc.server_max_unrequested_time_in_server", MAX_PENDING_SECONDS),
    # grpc turns SO_REUSEPORT on by default: a second server on a busy port would bind
    # silently and share its clients. A port in use must be an error instead.
    ("grpc.so_reuseport", 0),
)


async def start_grpc_server(
    handlers: list[grpc.GenericRpcHandler],
    host: str,
    port: int,
    tls: ServerTls | None = None,
    options: Sequence[tuple[str, int]] = (),
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server on host:port; returns it and the bound port (0 picks one).
    `options` are added to SERVER_OPTIONS (later ones win)."""
    server = grpc.aio.server(options=(*SERVER_OPTIONS, *options))
    server.add_generic_rpc_handlers(handlers)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.credentials())
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}: is the port in use?")
    await server.start()
    return server, bound
