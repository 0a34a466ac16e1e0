"""Key and certificate files: secrets are written 0600 atomically and refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class InsecureKeyFile(PermissionError):
    """A private key file that group or other may access: loading it would trust a leaked key."""


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves half a key or cert."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_secret(path: Path, data: bytes) -> None:
    """Secrets (private keys) are readable by their owner only."""
    write_file(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Certificates are public; 0644 lets a reverse proxy or the agent read them."""
    write_file(path, data, 0o644)


def read_secret(path: Path) -> bytes:
    """Read a private key only if group and other have no access to it."""
    with path.open("rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise InsecureKeyFile(
                f"{path}: private key file has mode {mode:04o}; group/other must have no access "
                f"(run: chmod 600 {path})")
        return handle.read()
