"""The snapshot file as a live source: load, build, publish, and watch for edits.

A bad edit must never take serving down: it is refused with every problem
named (file, path, what is wrong), the refusal is logged and kept for the
admin API, and the last good config keeps serving. Nor may anything else that
goes wrong in a reload (a bug in building or publishing) end the watcher: it is
logged with its traceback, counted (`watch_errors`) and the watch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from xds_server.config.reader import load_config
from xds_server.config.types import Config, SnapshotError

__all__ = ["FileSource", "LoadOutcome", "Publish"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadOutcome:
    """The result of the latest load attempt, good or bad."""

    at: float
    ok: bool
    problems: list[str]


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


#: Serves a config (the control plane builds and caches it; the standalone router routes by it).
Publish = Callable[[Config], Awaitable[None]]


class FileSource:
    """Hands each good version of the snapshot file to `publish` and follows its edits."""

    def __init__(
        self,
        path: Path,
        publish: Publish,
        overlay: Callable[[Config], Config] | None = None,
        allowed_policy_modules: Sequence[str] = (),
    ) -> None:
        self.path = path
        #: Modules whose custom weight policies the file may name (config.policies).
        self.allowed_policy_modules = tuple(allowed_policy_modules)
        self._publish = publish
        #: The admin API's changes over the file (xds_server.overlay), applied on every publish.
        self.overlay = overlay or (lambda config: config)
        self.config: Config | None = None
        self._publishing = asyncio.Lock()
        self.last: LoadOutcome | None = None
        self.loaded_at = 0.0
        self.reloads = 0
        self.failures = 0
        self.watch_errors = 0  # reload attempts that raised something unexpected
        self._seen = _fingerprint(path)

    async def load(self, strict: bool = False) -> bool:
        """Load and publish the file; on error keep what is serving and record why.

        strict re-raises the SnapshotError: at start-up there is no good config to keep.
        """
        self._seen = _fingerprint(self.path)
        try:
            config = await asyncio.to_thread(
                partial(load_config, allowed_policy_modules=self.allowed_policy_modules),
                self.path,
            )
        except SnapshotError as err:
            self.failures += 1
            self.last = LoadOutcome(time.time(), False, [str(p) for p in err.problems])
            for problem in err.problems:
                log.error("snapshot refused, last good config keeps serving: %s", problem)
            if strict:
                raise
            return False
        self.config = config
        await self.publish()
        self.reloads += 1
        self.loaded_at = time.time()
        self.last = LoadOutcome(self.loaded_at, True, [])
        log.info(
            "snapshot %s loaded: %d listeners, %d pools, %d node groups",
            self.path,
            len(config.listeners),
            len(config.pools),
            len(config.node_groups),
        )
        return True

    async def publish(self) -> None:
        """Serve the loaded file with the overlay over it: after a reload, and after an API
        change. One at a time, reading both at the start, so an older build never lands last."""
        async with self._publishing:
            if self.config is not None:
                await self._publish(self.overlay(self.config))

    async def watch(self, interval: float = 0.2, settle: float = 0.05) -> None:
        """Reload whenever the file changes (polling: works for editors that rename over it).

        Runs until cancelled. A reload that raises is logged, counted and recorded as the
        latest (failed) attempt; the next edit of the file is tried again.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                await self._reload_if_changed(settle)
            except Exception as err:  # anything but cancellation: keep watching
                self.watch_errors += 1
                self.last = LoadOutcome(
                    time.time(), False, [f"{self.path}: reload failed: {err!r}"]
                )
                log.exception("reloading snapshot %s failed; still watching it", self.path)

    async def _reload_if_changed(self, settle: float) -> None:
        seen = _fingerprint(self.path)
        if seen is None or seen == self._seen:
            return
        await asyncio.sleep(settle)  # let a writer finish before reading
        if _fingerprint(self.path) == seen:
            await self.load()
