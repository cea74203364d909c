"""`async with` for the things demos and tests start and stop (Envoy, upstreams, simulators)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """`async with` for a class with `start()` and `stop()`: stop runs however the block ends."""

    async def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def stop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
