"""The gRPC server every port of ours starts (xds_server.grpc_server), under a burst of calls.

A fleet reconnecting at once opens thousands of streams faster than the server's event
loop takes them; gRPC core must hold them until it does (admission then paces them),
not cancel the ones past its default of 1,000 waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from lrs.contract import raw_bytes
from xds_server.grpc_server import start_grpc_server

SERVICE, METHOD = "test.Echo", "Stream"
#: Calls opened at once: over gRPC core's default of 1,000 waiting.
BURST = 1_500


async def echo(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext) -> bytes:
    async for request in requests:
        return request
    return b""


async def test_a_burst_of_calls_past_grpc_cores_default_queue_is_served_whole() -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.stream_unary_rpc_method_handler(
                echo, request_deserializer=raw_bytes, response_serializer=raw_bytes
            )
        },
    )
    server, port = await start_grpc_server([handler], "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            method = channel.stream_unary(
                f"/{SERVICE}/{METHOD}",
                request_serializer=raw_bytes,
                response_deserializer=raw_bytes,
            )
            calls = [method() for _ in range(BURST)]  # all opened before any is answered
            for n, call in enumerate(calls):
                await call.write(str(n).encode())
            results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {BURST} calls failed, first: {failed[0]!r}"
        assert results == [str(n).encode() for n in range(BURST)]
    finally:
        await server.stop(None)
