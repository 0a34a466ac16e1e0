"""Crash-safe small-file writes and the checkpoint signing key file.

A checkpoint must be either the old one or the new one after a power cut, never a torn mix, and
the signing key must never be readable by anyone but its owner: both rules live here.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .note import Ed25519Signer, NoteError

KEY_FILE_MODE = 0o600


class KeyFileError(PermissionError):
    """The key file is missing, unsafe or unreadable; the message names the file, never the key."""


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a short write is not an error on its own)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not loosen or tighten the intended mode
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_signer_key(path: Path, name: str) -> Ed25519Signer:
    """Generate a checkpoint signing key and write it 0600; refuse to overwrite an existing file."""
    signer = Ed25519Signer.generate(name)
    data = (signer.skey() + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     KEY_FILE_MODE)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_dir(path.parent)
    return signer


def load_signer_key(path: Path, name: str | None = None) -> Ed25519Signer:
    """Load a signing key, refusing a file that group or others may access or that is not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                               "group/other access is not allowed (use 0600)")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"key file {path} is owned by uid {st.st_uid}, not by this process "
                               f"(uid {os.geteuid()})")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        signer = Ed25519Signer.from_skey(raw.decode("ascii"))
    except (NoteError, UnicodeDecodeError):
        raise KeyFileError(f"key file {path} does not hold a valid PRIVATE+KEY Ed25519 key") from None
    if name is not None and signer.name != name:
        raise KeyFileError(f"key file {path} is for key name {signer.name!r}, expected {name!r}")
    return signer


def load_or_create_signer_key(path: Path, name: str) -> Ed25519Signer:
    """The key for ``name``: loaded if the file exists, created (0600) on first use."""
    if path.exists() or path.is_symlink():
        return load_signer_key(path, name)
    return create_signer_key(path, name)
