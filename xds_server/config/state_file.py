"""The overlay in force and the state file that keeps it across restarts (`--state FILE`).

A drain that an operator set before maintenance must still hold after the
control plane restarts, so every API change is written before it is served.
Writes are atomic (a temp file beside the target, fsync, rename): a crash leaves
the old file or the new one, never half of one. The temp file's name is unique
(mkstemp), not the pid: containers sharing a volume all run as pid 1. A state file that cannot be
read is a start-up error naming the file: serving without the drains it holds
would send traffic to nodes under maintenance.

The same file keeps the last published weight table (`weights`, each pool's with the
wall-clock time it was published), so a restarted control plane serves the weights it
had instead of snapping every pool back to static weights; the weight engine holds them
until load arrives or they expire. Weights are written at most every few seconds (they
change every push interval); a lost last write costs a few seconds of staleness, which
expiry bounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lrs.weights.signals import PoolWeights
from xds_server.config.overlay import Overlay
from xds_server.config.types import Config

__all__ = [
    "OverlayState",
    "SavedWeights",
    "StaleOverlay",
    "StateFileError",
    "read_state",
    "write_state",
]


@dataclass(frozen=True, slots=True)
class SavedWeights:
    """A pool's weights as published, and when (wall clock, comparable across restarts)."""

    weights: PoolWeights
    published_at: float


class StaleOverlay(Exception):
    """The overlay was changed elsewhere (another replica) since it was read: read it
    again and apply the change to what is there now."""


class StateFileError(Exception):
    """The state file exists but cannot be used; the message names the file and the problem."""


def read_state(path: Path) -> tuple[Overlay, dict[str, SavedWeights]]:
    """The overlay and weights stored at path; an absent file is an empty overlay and no
    weights (the first start)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Overlay(), {}
    except (OSError, UnicodeDecodeError) as err:
        raise StateFileError(f"state file {path}: cannot read it: {err}") from err
    try:
        document = json.loads(text)
        weights = _read_weights(document.pop("weights", {}) if isinstance(document, dict) else {})
        return Overlay.from_json(document), weights
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise StateFileError(
            f"state file {path} is corrupt ({err}); fix or remove it (removing it lifts every "
            "drain and endpoint change made through the admin API)"
        ) from err


def _read_weights(data: object) -> dict[str, SavedWeights]:
    if not isinstance(data, dict):
        raise ValueError("weights: expected a mapping of pool -> weights")
    saved = {}
    for pool, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("published_at"), float | int):
            raise ValueError(f"weights.{pool}: expected weights with published_at")
        try:
            weights = PoolWeights.from_json(entry.get("weights"))
        except ValueError as err:
            raise ValueError(f"weights.{pool}.weights: {err}") from None
        saved[pool] = SavedWeights(weights, float(entry["published_at"]))
    return saved


def write_state(path: Path, overlay: Overlay, weights: Mapping[str, SavedWeights]) -> None:
    """Replace the state file atomically (blocking: call it off the event loop)."""
    document = overlay.to_json()
    document["weights"] = {
        pool: {"weights": saved.weights.to_json(), "published_at": saved.published_at}
        for pool, saved in sorted(weights.items())
    }
    data = json.dumps(document, indent=2, sort_keys=True) + "\n"
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its mode
    except FileNotFoundError:
        mode = 0o644  # what open() gave a new file under the usual umask (mkstemp: 0600)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


class OverlayState:
    """Holds the overlay being served; `path` None keeps it in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.overlay = Overlay()
        #: The weights last published per pool (kept, with the overlay, in the file).
        self.weights: dict[str, SavedWeights] = {}
        self._weights_written: dict[str, SavedWeights] = {}

    async def load(self) -> None:
        """Read the state file off the event loop; StateFileError if it is unusable."""
        if self.path is not None:
            self.overlay, self.weights = await asyncio.to_thread(read_state, self.path)
            self._weights_written = dict(self.weights)

    def apply(self, config: Config) -> Config:
        """The file's config with the overlay in force (what FileSource publishes)."""
        return self.overlay.apply(config)

    async def save(self, overlay: Overlay) -> None:
        """Persist, then put in force: an overlay that could not be written is never served.

        Raises OSError when the write fails; the overlay in force is then unchanged.
        """
        if self.path is not None:
            weights = dict(self.weights)
            await asyncio.to_thread(write_state, self.path, overlay, weights)
            self._weights_written = weights
        self.overlay = overlay

    def record_weights(self, pool: str, weights: PoolWeights) -> None:
        """Note a pool's newly published weights; `flush_weights` writes them."""
        self.weights[pool] = SavedWeights(weights, time.time())

    async def flush_weights(self) -> None:
        """Write the weights if they changed since the last write (OSError: not written)."""
        if self.path is None or self.weights == self._weights_written:
            return
        weights = dict(self.weights)
        await asyncio.to_thread(write_state, self.path, self.overlay, weights)
        self._weights_written = weights
