"""The file-system seam of the credential installer, and a version of it that crashes on purpose.

Every call that changes the disk is one numbered *step*. ``FaultyFileSystem`` performs the same
real os.* calls as ``RealFileSystem`` (on a real directory) but can stop the program before,
during or after any step, the way kill -9 would (``SimulatedCrash``), or fail writes with ENOSPC
the way a full disk does. ``SimulatedCrash`` derives from BaseException so that no
``except Exception`` clean-up in the installer runs, exactly as none runs after kill -9. What is
not simulated: power loss (data not yet fsynced vanishing); the installer fsyncs for that case
but this seam cannot lose page-cache contents.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from typing import Literal, Protocol

When = Literal["before", "during", "after"]


class SimulatedCrash(BaseException):
    """The process died here (kill -9): nothing after this point runs, no clean-up either."""

    def __init__(self, step: int, name: str, when: When) -> None:
        super().__init__(f"simulated kill -9 {when} step {step} ({name})")
        self.step = step
        self.name = name
        self.when = when


class FileSystem(Protocol):
    """The calls the installer makes; the mutating ones are the numbered steps."""

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        """Create a directory with exactly ``mode`` (uid/gid -1: leave as created)."""

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        """Create a new file (never overwrite) with ``mode``, owner, the data, fsynced."""

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries durable."""

    def symlink(self, target: str, path: str) -> None:
        """Create the symlink ``path`` -> ``target``."""

    def rename(self, src: str, dst: str) -> None:
        """rename(2): atomically replace ``dst``."""

    def unlink(self, path: str) -> None:
        """Remove a file or symlink."""

    def remove_tree(self, path: str) -> None:
        """Remove a directory and what it holds."""

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (read-only, not a step)."""

    def readlink(self, path: str) -> str | None:
        """Target of a symlink, None if ``path`` is missing or not a symlink (not a step)."""

    def lstat(self, path: str) -> os.stat_result | None:
        """lstat, None if missing (not a step)."""

    def stat(self, path: str) -> os.stat_result | None:
        """stat (follows symlinks), None if missing (not a step)."""

    def read_file(self, path: str) -> bytes:
        """Whole content, following symlinks (not a step)."""


class RealFileSystem:
    """The installer's file-system calls, done with os.*."""

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # the umask may have narrowed it
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            self._write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def readlink(self, path: str) -> str | None:
        try:
            return os.readlink(path)
        except OSError:
            return None

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None

    def stat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(path)
        except FileNotFoundError:
            return None

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()


class FaultyFileSystem(RealFileSystem):
    """Real file-system calls, numbered, with a kill -9 or a full disk wherever a test wants.

    ``crash_at(step, when)`` arms one crash: "before" the step runs, "during" it (write_file
    leaves a half-written file; other steps behave as "before"), or "after" it completed.
    ``disk_full = True`` makes every write_file fail with ENOSPC after writing part of the data.
    ``on_step(number, name)`` is called after every completed step (readers check the sink there).
    """

    def __init__(self, on_step: Callable[[int, str], None] | None = None) -> None:
        self.steps = 0
        self.log: list[str] = []
        self.disk_full = False
        self.on_step = on_step
        self._crash: tuple[int, When] | None = None

    def crash_at(self, step: int, when: When = "before") -> None:
        """Arm a crash at absolute step number ``step`` (this object counts steps from 1)."""
        self._crash = (step, when)

    def disarm(self) -> None:
        self._crash = None

    @property
    def armed(self) -> bool:
        return self._crash is not None

    def _begin(self, name: str) -> int:
        number = self.steps + 1
        if self._crash is not None and self._crash[0] == number and self._crash[1] == "before":
            self._fire(number, name, "before")
        return number

    def _fire(self, number: int, name: str, when: When) -> None:
        self._crash = None
        raise SimulatedCrash(number, name, when)

    def _during(self, number: int, name: str) -> bool:
        return self._crash is not None and self._crash[0] == number and self._crash[1] == "during"

    def _end(self, number: int, name: str) -> None:
        self.steps = number
        self.log.append(name)
        if self.on_step is not None:
            self.on_step(number, name)
        if self._crash is not None and self._crash[0] == number and self._crash[1] == "after":
            self._fire(number, name, "after")

    def _step(self, name: str, action: Callable[[], None]) -> None:
        number = self._begin(name)
        if self._during(number, name):
            self._fire(number, name, "during")
        action()
        self._end(number, name)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        real = RealFileSystem.mkdir
        self._step(f"mkdir {os.path.basename(path)}", lambda: real(self, path, mode, uid, gid))

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        name = f"write {os.path.basename(path)}"
        number = self._begin(name)
        if self.disk_full or self._during(number, name):
            # A torn write: the file exists with part of the data, as after a crash or ENOSPC.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                os.write(fd, data[: len(data) // 2])
            finally:
                os.close(fd)
            if self._during(number, name):
                self._fire(number, name, "during")
            self.steps = number
            self.log.append(name + " ENOSPC")
            if self.on_step is not None:
                self.on_step(number, name + " ENOSPC")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        super().write_file(path, data, mode, uid, gid)
        self._end(number, name)

    def fsync_dir(self, path: str) -> None:
        real = RealFileSystem.fsync_dir
        self._step(f"fsync {os.path.basename(path)}/", lambda: real(self, path))

    def symlink(self, target: str, path: str) -> None:
        real = RealFileSystem.symlink
        self._step(f"symlink {os.path.basename(path)}", lambda: real(self, target, path))

    def rename(self, src: str, dst: str) -> None:
        real = RealFileSystem.rename
        self._step(f"rename {os.path.basename(src)}", lambda: real(self, src, dst))

    def unlink(self, path: str) -> None:
        real = RealFileSystem.unlink
        self._step(f"unlink {os.path.basename(path)}", lambda: real(self, path))

    def remove_tree(self, path: str) -> None:
        real = RealFileSystem.remove_tree
        self._step(f"rmtree {os.path.basename(path)}", lambda: real(self, path))

def is_symlink(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISLNK(st.st_mode)


def is_dir(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)
