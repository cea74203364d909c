"""The snapshot file as a live source: load, build, publish, and follow its edits.

A bad edit must never take serving down: it is refused with every problem
named (file, path, what is wrong), the refusal is logged and kept for the
admin API, and the last good config keeps serving. Nor may anything else that
goes wrong in a reload (a bug in building or publishing) end the watcher: it is
logged with its traceback, counted (`watch_errors`) and the watch goes on.

Edits are seen through file events (watchdog: inotify on Linux, FSEvents, kqueue or
ReadDirectoryChangesW elsewhere), on the file's folder (and the folder of the file a
symlink leads to), so an editor's rename over the file, a Kubernetes ConfigMap's swap of
its `..data` link and a file deleted and written again are all seen. When to read, so that
a half-written file is never served:

1. A writer still at work is waited for. On Linux inotify says when a file opened for
   writing is closed (IN_CLOSE_WRITE): after a change to the file is seen, it is read only
   once its writer has closed it, however long the writer pauses between pieces (up to
   `max_write_wait` seconds after the last change, for a writer that never closes). A file
   renamed into place is complete already. Where the platform reports no closes, the file
   must have been quiet (no event about it) for `quiet` seconds instead.
2. The read must be of one version: the file is read, then checked unchanged (same inode,
   size and modification time, by the open descriptor and by the path) and read again
   if anything moved during the read.
3. A refusal right after a change waits for a second look. If the text does not parse or
   validate, or the file is missing or unreadable, within `settle` seconds of the last
   change seen, the watcher waits until the file has been quiet for `settle` seconds and
   reads it again; only what is still wrong then is refused (and reported as always).
   A writer that writes in several opens (a shell's `>` then `>>`) is not reported for the
   first part. A missing file keeps serving the last good config and is reported after
   that wait; once it is back, the report clears.

Events can miss a change (NFS; a single file bind-mounted into a container and edited
outside it, whose events go to the outer folder): every `interval` seconds the file's
identity (inode, size, modification time) is checked too, and a change found that way is
read once quiet for `quiet` seconds. A text that is the one served, or the one last
refused, is not parsed again; any other goes through the reader's memo
(xds_server.config.sections), which parses and validates again only the sections and
pools whose text changed.

watchfiles was the first candidate and was not taken: it drops the close events (its
Rust side keeps only create, modify, rename and remove) and ends a batch `step`
milliseconds after the last *new* (change, path) pair, so a file written in pieces is
yielded after its first piece; rule 1 could not be kept with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from xds_server.config.reader import parse_config
from xds_server.config.sections import Memo
from xds_server.config.types import Config, Problem, SnapshotError

__all__ = ["FileSource", "LoadOutcome", "Publish"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadOutcome:
    """The result of the latest load attempt, good or bad."""

    at: float
    ok: bool
    problems: list[str]


class _Identity(NamedTuple):
    device: int
    inode: int
    size: int
    mtime_ns: int


def _identity(st: os.stat_result) -> _Identity:
    return _Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fingerprint(path: Path) -> _Identity | None:
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


#: Serves a config (the control plane builds and caches it; the standalone router routes by it).
Publish = Callable[[Config], Awaitable[None]]

#: The events that can mean the file changed (not opens, reads or the folder's own mtime).
_EVENTS: Sequence[type[FileSystemEvent]] = (
    FileModifiedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirDeletedEvent,
    DirMovedEvent,
)

#: Reads of one version tried before a file that keeps changing is left to its writer.
_READ_ATTEMPTS = 5


@dataclass(slots=True)
class _Attempt:
    """One read (and, unless the text is the one last seen, parse) of the file."""

    text: str | None
    identity: _Identity | None
    settled: bool = True  # nothing moved while it was read
    unchanged: bool = False  # the text is the one last seen: not parsed again
    config: Config | None = None
    error: SnapshotError | None = None


def _unreadable(source: str, reason: str) -> SnapshotError:
    return SnapshotError([Problem(source, "(file)", f"cannot read the file: {reason}")])


def read_settled(path: Path) -> tuple[str, _Identity, bool]:
    """The file's text, its identity, and whether it stayed one version while read.

    Raises SnapshotError when it cannot be read (missing, no permission, not UTF-8)."""
    source = os.fspath(path)
    for attempt in range(_READ_ATTEMPTS):
        try:
            with open(path, "rb") as file:
                before = _identity(os.fstat(file.fileno()))
                data = file.read()
                after = _identity(os.fstat(file.fileno()))
            now = _identity(os.stat(path))
        except OSError as err:
            raise _unreadable(source, err.strerror or str(err)) from err
        settled = before == after == now and len(data) == after.size
        if settled or attempt == _READ_ATTEMPTS - 1:
            break
        time.sleep(0.002 * (attempt + 1))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _unreadable(source, f"not UTF-8 text ({err.reason})") from err
    return text, after, settled


class _Events(FileSystemEventHandler):
    """Runs in watchdog's thread: hands every event to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deliver: Callable[[FileSystemEvent], None]
    ) -> None:
        self.loop = loop
        self.deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.deliver, event)
        except RuntimeError:  # the loop is closed: the watch is over
            pass


class FileSource:
    """Hands each good version of the snapshot file to `publish` and follows its edits."""

    #: Seconds a file must be quiet before it is read, where no close events come.
    quiet = 0.05
    #: Seconds to wait for a writer that changed the file to close it (inotify).
    max_write_wait = 2.0

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
        self._loading = asyncio.Lock()
        self.last: LoadOutcome | None = None
        self.loaded_at = 0.0
        self.reloads = 0
        self.failures = 0
        self.watch_errors = 0  # reload attempts that raised something unexpected
        #: The last parse's sections, pools and listeners, by their text.
        self.memo = Memo()
        self._seen: str | None = None  # the text last served or refused
        self._identity = _fingerprint(path)  # the file as last read
        # What the events say (xds_server's loop only).
        self._wake = asyncio.Event()
        self._dirty = False  # an event named the file since it was last read
        self._writing = False  # changed, and its writer has not closed it yet
        self._changed_at = 0.0  # monotonic time of the last change seen
        self._closes = False  # the platform reports closes after writing (inotify)

    # ------------------------------------------------------------------ loading

    async def load(self, strict: bool = False) -> bool:
        """Load and publish the file; on error keep what is serving and record why.

        strict re-raises the SnapshotError: at start-up there is no good config to keep.
        """
        async with self._loading:
            attempt = await asyncio.to_thread(self._read_and_parse, None)
            return await self._conclude(attempt, strict)

    def _read_and_parse(self, seen: str | None) -> _Attempt:
        """In a worker thread: read one version, and parse it unless it is `seen`."""
        try:
            text, identity, settled = read_settled(self.path)
        except SnapshotError as err:
            return _Attempt(None, _fingerprint(self.path), error=err)
        attempt = _Attempt(text, identity, settled)
        if seen is not None and text == seen:
            attempt.unchanged = True
            return attempt
        try:
            attempt.config = parse_config(
                text,
                os.fspath(self.path),
                allowed_policy_modules=self.allowed_policy_modules,
                memo=self.memo,
            )
        except SnapshotError as err:
            attempt.error = err
        return attempt

    async def _conclude(self, attempt: _Attempt, strict: bool = False) -> bool:
        """Serve a good attempt, or record and log a refused one."""
        self._identity = attempt.identity
        if attempt.error is not None:
            err = attempt.error
            self._seen = attempt.text
            self.failures += 1
            self.last = LoadOutcome(time.time(), False, [str(p) for p in err.problems])
            for problem in err.problems:
                log.error("snapshot refused, last good config keeps serving: %s", problem)
            if strict:
                raise err
            return False
        config = attempt.config
        assert config is not None
        self.config = config
        await self.publish()
        self._seen = attempt.text
        self.reloads += 1
        self.loaded_at = time.time()
        self.last = LoadOutcome(self.loaded_at, True, [])
        log.info(
            "snapshot %s loaded: %d listeners, %d pools, %d node groups "
            "(%d sections parsed, %d as before)",
            self.path,
            len(config.listeners),
            len(config.pools),
            len(config.node_groups),
            self.memo.last_parsed,
            self.memo.last_reused,
        )
        return True

    async def publish(self) -> None:
        """Serve the loaded file with the overlay over it: after a reload, and after an API
        change. One at a time, reading both at the start, so an older build never lands last."""
        async with self._publishing:
            if self.config is not None:
                await self._publish(self.overlay(self.config))

    # ------------------------------------------------------------------ watching

    async def watch(self, interval: float = 1.0, settle: float = 0.25) -> None:
        """Reload whenever the file changes (see the module's rules), until cancelled.

        `interval`: seconds between checks of the file's identity, for changes no event
        reports; `settle`: how long a refused or missing file is given to become whole.
        A reload that raises is logged, counted and recorded as the latest (failed)
        attempt; the next change of the file is tried again.
        """
        observer = _Watch(self.path, _Events(asyncio.get_running_loop(), self._on_event))
        self._closes = observer.reports_closes
        try:
            while True:
                observer.arm()
                noticed = await self._wait(interval)
                if not noticed:
                    if _fingerprint(self.path) == self._identity:
                        continue
                    self._changed_at = time.monotonic()  # a change no event told of (yet)
                if not self._dirty and _fingerprint(self.path) == self._identity:
                    continue  # another file in the folder
                try:
                    await self._reload_when_settled(settle, trust_events=noticed)
                except Exception as err:  # anything but cancellation: keep watching
                    self.watch_errors += 1
                    self.last = LoadOutcome(
                        time.time(), False, [f"{self.path}: reload failed: {err!r}"]
                    )
                    log.exception("reloading snapshot %s failed; still watching it", self.path)
        finally:
            observer.stop()

    def _on_event(self, event: FileSystemEvent) -> None:
        """On the loop: note what an event says about the file, and wake the watcher."""
        names = {os.path.abspath(self.path), os.path.realpath(self.path)}
        paths = {os.fsdecode(event.src_path), os.fsdecode(event.dest_path or b"")}
        if paths & names:
            self._dirty = True
            self._changed_at = time.monotonic()
            if isinstance(event, FileModifiedEvent):
                self._writing = self._closes
            elif isinstance(event, FileCreatedEvent):  # opened to be written, unless a link
                self._writing = self._closes and not os.path.islink(self.path)
            elif isinstance(event, FileClosedEvent | FileDeletedEvent | FileMovedEvent):
                self._writing = False
        self._wake.set()

    async def _wait(self, timeout: float) -> bool:
        """Until the next event (True) or `timeout` seconds (False)."""
        if not self._wake.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))
            except TimeoutError:
                return False
        self._wake.clear()
        return True

    async def _until_quiet(self, seconds: float, limit: float = 10.0) -> None:
        """Until no change to the file has been seen for `seconds` (at most `limit`)."""
        started = time.monotonic()
        while (left := self._changed_at + seconds - time.monotonic()) > 0:
            if time.monotonic() - started > limit:
                return
            await self._wait(left)

    async def _until_written(self, trust_events: bool, limit: float = 10.0) -> None:
        """Until the file's writer is done: it closed the file (inotify), and where that is
        not reported (or the change was found without an event, and none has come since)
        the file has been quiet for `quiet` seconds too. At most `limit` seconds for a file
        that never stops changing."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            since = time.monotonic() - self._changed_at
            if self._closes and self._writing and since < self.max_write_wait:
                await self._wait(self.max_write_wait - since)
            elif not (self._closes and (trust_events or self._dirty)) and since < self.quiet:
                await self._wait(self.quiet - since)
            else:
                return

    async def _reload_when_settled(self, settle: float, trust_events: bool) -> None:
        """Rules 1-3 of the module's docstring, then serve or refuse what was read."""
        second_look = False
        for _ in range(_READ_ATTEMPTS + 1):
            await self._until_written(trust_events)
            self._dirty = False
            async with self._loading:
                attempt = await asyncio.to_thread(self._read_and_parse, self._seen)
                if attempt.unchanged:
                    self._identity = attempt.identity
                    return
                recent = time.monotonic() - self._changed_at < settle
                look_again = attempt.error is not None and recent and not second_look
                if attempt.settled and not look_again:
                    await self._conclude(attempt)  # a missing file: whatever comes back is read
                    return
            if not attempt.settled:  # written while read: its writer has more to do
                self._changed_at = time.monotonic()
                trust_events = False
            else:
                second_look = True
                await self._until_quiet(settle)
        log.warning("snapshot %s kept changing while read; waiting for its next change", self.path)


class _Watch:
    """The watchdog observer over the folders the file's path goes through.

    The file's own folder, and the folder of the file it resolves to (a symlink, a
    ConfigMap's `..data`); re-armed whenever that changes or a folder comes back.
    """

    def __init__(self, path: Path, handler: _Events) -> None:
        self.path = path
        self.handler = handler
        self.observer: BaseObserver = Observer()
        self.observer.daemon = True
        self.watches: dict[str, ObservedWatch] = {}
        self.started = False
        self.reports_closes = sys.platform.startswith("linux") and (
            type(self.observer).__name__ == "InotifyObserver"
        )

    def folders(self) -> set[str]:
        return {
            os.path.dirname(os.path.abspath(self.path)),
            os.path.dirname(os.path.realpath(self.path)),
        }

    def arm(self) -> None:
        """Watch the folders the path needs now; cheap when nothing changed. A folder that
        was deleted (its watch ended) is watched again once it is back."""
        wanted = self.folders()
        alive = {e.watch for e in self.observer.emitters if e.is_alive()}
        for folder in [
            f
            for f, watch in self.watches.items()
            if f not in wanted or not os.path.isdir(f) or (self.started and watch not in alive)
        ]:
            self._unschedule(folder)
        for folder in wanted - set(self.watches):
            if not os.path.isdir(folder):
                continue  # the interval check covers it until it is back
            try:
                self.watches[folder] = self.observer.schedule(
                    self.handler, folder, recursive=False, event_filter=list(_EVENTS)
                )
            except OSError as err:
                log.warning(
                    "cannot watch %s for edits (%s); checking it every interval", folder, err
                )
                continue
            if not self.started:
                self.observer.start()
                self.started = True

    def _unschedule(self, folder: str) -> None:
        watch = self.watches.pop(folder)
        try:
            self.observer.unschedule(watch)
        except (KeyError, OSError):
            pass

    def stop(self) -> None:
        if self.started:
            self.observer.stop()
