"""Wake netguard as soon as a protected unit's cgroup appears or goes, so a restarted unit is
shaped again within milliseconds rather than after a poll interval.

systemd creates a service's cgroup with mkdir(2) before it executes the service, and removes it
with rmdir(2) when the service stops; both raise inotify events on the parent directory
(``system.slice``). inotify is only the fast path: callers also re-check on a timeout, which
covers a parent directory that did not exist yet when the watch was set up, and queue overflows.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

IN_CREATE = 0x100
IN_DELETE = 0x200
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class CgroupWatch:
    """An inotify watch on the directories that hold the protected units' cgroups."""

    def __init__(self, directories: Iterable[Path]) -> None:
        self.directories = sorted(set(directories))
        self.fd = -1
        self.watching: list[Path] = []
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name, use_errno=True)

    def open(self) -> None:
        """Set up the watch; directories that do not exist (yet) are left to the timeout."""
        self._loop = asyncio.get_running_loop()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s): following protected units by polling only",
                        os.strerror(ctypes.get_errno()))
            return
        self.fd = fd
        self._watch_missing()
        self._loop.add_reader(fd, self._readable)

    def _watch_missing(self) -> None:
        for directory in self.directories:
            if directory not in self.watching and self.fd >= 0:
                wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                                  IN_CREATE | IN_DELETE | IN_ONLYDIR)
                if wd >= 0:
                    self.watching.append(directory)

    def _readable(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                log.warning("reading inotify events failed: %s", exc)
        self._changed.set()

    async def wait(self, timeout: float) -> bool:
        """Until a cgroup appears or goes (True) or ``timeout`` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            self._watch_missing()  # e.g. system.slice created after we started
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        if self.fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
