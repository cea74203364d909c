"""The overlay in force and the state file that keeps it across restarts (`--state FILE`).

A drain that an operator set before maintenance must still hold after the
control plane restarts, so every API change is written before it is served.
Writes are atomic (a temp file beside the target, fsync, rename): a crash leaves
the old file or the new one, never half of one. The temp file's name is unique
(mkstemp), not the pid: containers sharing a volume all run as pid 1. A state file that cannot be
read is a start-up error naming the file: serving without the drains it holds
would send traffic to nodes under maintenance.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from pathlib import Path

from xds_server.config.overlay import Overlay
from xds_server.config.types import Config

__all__ = ["OverlayState", "StateFileError", "read_state", "write_state"]


class StateFileError(Exception):
    """The state file exists but cannot be used; the message names the file and the problem."""


def read_state(path: Path) -> Overlay:
    """The overlay stored at path; an absent file is an empty overlay (the first start)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Overlay()
    except (OSError, UnicodeDecodeError) as err:
        raise StateFileError(f"state file {path}: cannot read it: {err}") from err
    try:
        return Overlay.from_json(json.loads(text))
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise StateFileError(
            f"state file {path} is corrupt ({err}); fix or remove it (removing it lifts every "
            "drain and endpoint change made through the admin API)"
        ) from err


def write_state(path: Path, overlay: Overlay) -> None:
    """Replace the state file atomically (blocking: call it off the event loop)."""
    data = json.dumps(overlay.to_json(), indent=2, sort_keys=True) + "\n"
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

    async def load(self) -> None:
        """Read the state file off the event loop; StateFileError if it is unusable."""
        if self.path is not None:
            self.overlay = await asyncio.to_thread(read_state, self.path)

    def apply(self, config: Config) -> Config:
        """The file's config with the overlay in force (what FileSource publishes)."""
        return self.overlay.apply(config)

    async def save(self, overlay: Overlay) -> None:
        """Persist, then put in force: an overlay that could not be written is never served.

        Raises OSError when the write fails; the overlay in force is then unchanged.
        """
        if self.path is not None:
            await asyncio.to_thread(write_state, self.path, overlay)
        self.overlay = overlay
