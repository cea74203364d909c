"""What the load loop, the xDS side and the lab agree on, defined once.

`lrs` sits below `xds_server` (it imports nothing from it), so the constants both sides
use live here: the largest weight Envoy is sent, the request header that asks a model
server for ORCA load, and the identity (de)serializer of gRPC handlers that hand over or
take raw bytes (pre-encoded responses, reports parsed by hand).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_WEIGHT", "ORCA_FORMAT_HEADER", "ORCA_RESPONSE_HEADERS", "raw_bytes"]

#: Largest endpoint or locality weight we send: Envoy caps a locality's weight sum at uint32,
#: and 1,000,000 leaves room for thousands of endpoints at full weight.
MAX_WEIGHT: Final = 1_000_000
#: A request header that asks the model server to attach its ORCA load report (vLLM sends
#: `endpoint-load-metrics` only when asked).
ORCA_FORMAT_HEADER: Final = "endpoint-load-metrics-format"
#: The response headers Envoy reads ORCA load from.
ORCA_RESPONSE_HEADERS: Final = ("endpoint-load-metrics", "endpoint-load-metrics-bin")


def raw_bytes(payload: bytes) -> bytes:
    """gRPC (de)serializer that passes bytes through untouched."""
    return payload
