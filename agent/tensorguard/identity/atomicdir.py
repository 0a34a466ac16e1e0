"""Crash-safe installation of a key, its certificate and chain into a sink directory.

Replacing cert.pem and key.pem one after the other leaves a moment (forever, after a crash) where
the certificate on disk does not match the key. This installer uses the Kubernetes AtomicWriter
layout instead, so the whole set changes with one rename(2)::

    sink/
      ..cred.3f9a...        the current version: key.pem cert.pem chain.pem ... (written, fsynced)
      ..data -> ..cred.3f9a...
      cert.pem -> ..data/cert.pem    user-visible names, symlinks created once
      key.pem  -> ..data/key.pem

An install writes every file into a new hidden version directory (0600 or the sink's modes,
owner/group when given, each fsynced, then the directory fsynced), makes sure the user-visible
symlinks exist (before the swap, so at the very first install they go from dangling to valid
together), points a temporary symlink ``..data_tmp`` at the new version, renames it over
``..data`` and fsyncs the sink. Only then are old versions removed. A crash at any step leaves
either the old set or the new set behind ``..data``; leftovers (version directories not pointed
to, ``..data_tmp``) are removed by the next install or by ``recover()``.

A reader that opens cert.pem and then key.pem between two installs sees one set. A reader that
must not straddle a concurrent swap reads through ``current()``, which resolves ``..data`` once
and re-checks it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .filesystem import FileSystem, RealFileSystem, is_dir, is_symlink

DATA = "..data"
DATA_TMP = "..data_tmp"
VERSION_PREFIX = "..cred."
MAX_KEY_MODE = 0o640


class AtomicDirError(Exception):
    """The sink cannot be used or written; the message names the path and the reason."""


@dataclass(frozen=True)
class FileNames:
    """User-visible file names in a sink (what nginx & co. are configured with)."""

    key: str = "key.pem"
    cert: str = "cert.pem"
    chain: str = "chain.pem"
    bundle: str = "bundle.pem"


@dataclass(frozen=True)
class CredentialSet:
    """Files that must change together: a key, its certificate, the chain, optionally more."""

    key: bytes = field(repr=False)
    cert: bytes
    chain: bytes
    bundle: bytes | None = None
    extra: tuple[tuple[str, bytes], ...] = ()
    """Further (name, content) pairs installed in the same swap, e.g. the renewal anchor."""

    def extra_file(self, name: str) -> bytes | None:
        return dict(self.extra).get(name)


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or name in (DATA, DATA_TMP):
        raise AtomicDirError(f"invalid credential file name {name!r}: must be a plain name "
                             "not starting with '.'")


def _dir_mode(file_modes: int) -> int:
    """Version directories are traversable by exactly whom the files are readable by."""
    mode = 0o700
    if file_modes & 0o040:
        mode |= 0o050
    if file_modes & 0o004:
        mode |= 0o005
    return mode


class AtomicDir:
    """One sink directory, installed into atomically (see the module docstring)."""

    def __init__(self, path: str | Path, fs: FileSystem | None = None, *, mode: int = 0o600,
                 key_mode: int = 0o600, uid: int = -1, gid: int = -1,
                 names: FileNames | None = None) -> None:
        self.path = str(path)
        self.fs: FileSystem = fs if fs is not None else RealFileSystem()
        if key_mode & ~MAX_KEY_MODE:
            raise AtomicDirError(f"{self.path}: key file mode {key_mode:#o} is broader than "
                                 f"{MAX_KEY_MODE:#o}; private keys are never group-writable or "
                                 "world-readable")
        if mode & 0o7133:
            raise AtomicDirError(f"{self.path}: file mode {mode:#o} grants write or execute beyond "
                                 "the owner (or special bits); use at most 0o644")
        self.mode = mode
        self.key_mode = key_mode
        self.uid = uid
        self.gid = gid
        self.names = names if names is not None else FileNames()

    def _join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def check_directory(self) -> None:
        """Refuse a sink others could tamper with: missing, not a directory, or group/other-writable."""
        st = self.fs.stat(self.path)
        if st is None:
            raise AtomicDirError(f"{self.path}: sink directory does not exist")
        if not is_dir(st):
            raise AtomicDirError(f"{self.path}: sink is not a directory")
        if st.st_mode & 0o022:
            raise AtomicDirError(f"{self.path}: sink directory mode {st.st_mode & 0o7777:#o} lets "
                                 "group or others write (they could swap the key); run chmod go-w")

    def _files(self, creds: CredentialSet) -> list[tuple[str, bytes, int]]:
        files = [(self.names.key, creds.key, self.key_mode), (self.names.cert, creds.cert, self.mode),
                 (self.names.chain, creds.chain, self.mode)]
        if creds.bundle is not None:
            files.append((self.names.bundle, creds.bundle, self.mode))
        files.extend((name, data, self.mode) for name, data in creds.extra)
        seen: set[str] = set()
        for name, _, _ in files:
            _check_name(name)
            if name in seen:
                raise AtomicDirError(f"{self.path}: credential file {name!r} given twice")
            seen.add(name)
        return files

    def _check_visible(self, names: list[str]) -> list[str]:
        """User-visible names that still need their symlink; refuse to shadow anything else."""
        missing = []
        for name in names:
            path = self._join(name)
            st = self.fs.lstat(path)
            if st is None:
                missing.append(name)
            elif not is_symlink(st) or self.fs.readlink(path) != f"{DATA}/{name}":
                raise AtomicDirError(f"{path}: exists and is not the symlink {DATA}/{name} this "
                                     "installer manages; move it away first")
        return missing

    def current_version(self) -> str | None:
        """Name of the version directory ``..data`` points to, None before the first install."""
        target = self.fs.readlink(self._join(DATA))
        if target is None and self.fs.lstat(self._join(DATA)) is not None:
            raise AtomicDirError(f"{self._join(DATA)}: is not a symlink; this is not an atomic sink")
        return target

    def recover(self) -> list[str]:
        """Remove what a crashed install left behind; returns the removed names."""
        self.check_directory()
        removed = []
        if self.fs.lstat(self._join(DATA_TMP)) is not None:
            self.fs.unlink(self._join(DATA_TMP))
            removed.append(DATA_TMP)
        current = self.current_version()
        for entry in sorted(self.fs.listdir(self.path)):
            if entry.startswith(VERSION_PREFIX) and entry != current:
                self.fs.remove_tree(self._join(entry))
                removed.append(entry)
        return removed

    def install(self, creds: CredentialSet) -> str:
        """Write ``creds`` as a new version and swap it in; returns the version's name.

        On failure (e.g. ENOSPC) the previous set keeps serving and AtomicDirError says why.
        """
        self.check_directory()
        files = self._files(creds)
        missing_links = self._check_visible([name for name, _, _ in files])
        self.recover()
        previous = self.current_version()
        version = VERSION_PREFIX + secrets.token_hex(8)
        vdir = self._join(version)
        modes = 0
        for _, _, mode in files:
            modes |= mode
        try:
            self.fs.mkdir(vdir, _dir_mode(modes), self.uid, self.gid)
            for name, data, mode in files:
                self.fs.write_file(os.path.join(vdir, name), data, mode, self.uid, self.gid)
            self.fs.fsync_dir(vdir)
            for name in missing_links:
                self.fs.symlink(f"{DATA}/{name}", self._join(name))
            self.fs.symlink(version, self._join(DATA_TMP))
            self.fs.rename(self._join(DATA_TMP), self._join(DATA))
        except OSError as exc:
            self._discard(vdir)
            raise AtomicDirError(f"{self.path}: cannot write the new credentials "
                                 f"({exc.strerror or exc} at {exc.filename or vdir}); the previous "
                                 "set stays in place") from exc
        try:
            self.fs.fsync_dir(self.path)
            self._after_swap(previous, {name for name, _, _ in files})
        except OSError as exc:
            raise AtomicDirError(f"{self.path}: the new credentials are in place but finishing "
                                 f"failed ({exc.strerror or exc} at {exc.filename}); recover() "
                                 "will retry the clean-up") from exc
        return version

    def _discard(self, vdir: str) -> None:
        """Best effort: a leftover is harmless and the next install or recover() removes it."""
        for path, remove in ((self._join(DATA_TMP), self.fs.unlink), (vdir, self.fs.remove_tree)):
            if self.fs.lstat(path) is not None:
                with contextlib.suppress(OSError):
                    remove(path)

    def _after_swap(self, previous: str | None, installed: set[str]) -> None:
        if previous is not None and self.fs.lstat(self._join(previous)) is not None:
            self.fs.remove_tree(self._join(previous))
        managed = {self.names.key, self.names.cert, self.names.chain, self.names.bundle}
        for name in sorted(managed - installed):  # e.g. a bundle no longer shipped
            if self.fs.readlink(self._join(name)) == f"{DATA}/{name}":
                self.fs.unlink(self._join(name))

    def current(self, attempts: int = 3) -> CredentialSet | None:
        """The installed set, read from one version even if a swap happens meanwhile."""
        for _ in range(attempts):
            version = self.current_version()
            if version is None:
                return None
            try:
                creds = self._read_version(version)
            except FileNotFoundError:
                continue  # removed under us by a concurrent install: look again
            if self.current_version() == version:
                return creds
        raise AtomicDirError(f"{self.path}: credentials changed {attempts} times while being read")

    def _read_version(self, version: str) -> CredentialSet:
        vdir = self._join(version)
        names = set(self.fs.listdir(vdir))

        def read(name: str) -> bytes:
            return self.fs.read_file(os.path.join(vdir, name))

        for required in (self.names.key, self.names.cert, self.names.chain):
            if required not in names:
                raise AtomicDirError(f"{vdir}: {required} is missing from the installed set")
        standard = {self.names.key, self.names.cert, self.names.chain, self.names.bundle}
        extra = tuple((name, read(name)) for name in sorted(names - standard))
        bundle = read(self.names.bundle) if self.names.bundle in names else None
        return CredentialSet(read(self.names.key), read(self.names.cert), read(self.names.chain),
                             bundle, extra)
