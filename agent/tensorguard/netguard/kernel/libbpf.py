"""Minimal ctypes bindings on libbpf.so.1: open/load an object, find programs and maps, pin, and
the low-level map syscalls. No compiler and no kernel headers are needed at run time.

Errors raise `LibbpfError` (an `OSError` with the errno and its text) carrying the lines libbpf
logged during the failing call, which for a rejected program include the verifier log.

libbpf's print callback is process-global; `install_logger()` sets ours once (warnings and info
are kept in a bounded buffer, debug chatter is dropped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

LIBBPF_SONAME = "libbpf.so.1"

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_LOG_WARN, _LOG_INFO, _LOG_DEBUG = 0, 1, 2
_LOG_TAIL = 8000
"""Characters of libbpf log kept in an error message (the verifier's verdict is at the end)."""
_LOG_BUF = 1 << 20
"""One libbpf message, formatted (a verifier log is printed as one message)."""


class LibbpfError(OSError):
    """A libbpf call failed: errno, what was attempted, and what libbpf logged meanwhile."""

    def __init__(self, err: int, what: str, log: list[str] | None = None) -> None:
        self.log = list(log or [])
        text = f"{what}: {os.strerror(err)} (errno {err})"
        if self.log:
            joined = "".join(line if line.endswith("\n") else line + "\n" for line in self.log)
            if len(joined) > _LOG_TAIL:
                joined = "...\n" + joined[-_LOG_TAIL:]
            text += "\nlibbpf log:\n" + joined
        super().__init__(err, text)

    def __str__(self) -> str:
        return str(self.args[1])


class LibbpfUnavailable(RuntimeError):
    """libbpf.so.1 cannot be loaded (package libbpf1 missing)."""


_lock = threading.Lock()


class _State:
    lib: ctypes.CDLL | None = None
    print_cb: Any = None  # keeps the ctypes callback alive for the life of the process


_state = _State()
_log: deque[tuple[int, str]] = deque(maxlen=400)
_log_seq = [0]
_log_lock = threading.Lock()
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _proto(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def lib() -> ctypes.CDLL:
    """The loaded libbpf with prototypes set (loaded once per process)."""
    with _lock:
        if _state.lib is not None:
            return _state.lib
        try:
            handle = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
        except OSError as exc:
            raise LibbpfUnavailable(f"cannot load {LIBBPF_SONAME} (install libbpf1): {exc}") from exc
        vp, cp, i, u32, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
        _proto(handle, "libbpf_set_print", vp, _PRINT_FN)
        _proto(handle, "bpf_object__open_file", vp, cp, vp)
        _proto(handle, "bpf_object__load", i, vp)
        _proto(handle, "bpf_object__close", None, vp)
        _proto(handle, "bpf_object__find_program_by_name", vp, vp, cp)
        _proto(handle, "bpf_program__fd", i, vp)
        _proto(handle, "bpf_object__find_map_by_name", vp, vp, cp)
        _proto(handle, "bpf_map__fd", i, vp)
        _proto(handle, "bpf_map__pin", i, vp, cp)
        _proto(handle, "bpf_map__unpin", i, vp, cp)
        _proto(handle, "bpf_map__key_size", u32, vp)
        _proto(handle, "bpf_map__value_size", u32, vp)
        _proto(handle, "bpf_map__initial_value", vp, vp, ctypes.POINTER(sz))
        _proto(handle, "bpf_map_update_elem", i, i, vp, vp, ctypes.c_uint64)
        _proto(handle, "bpf_map_lookup_elem", i, i, vp, vp)
        _proto(handle, "bpf_map_delete_elem", i, i, vp)
        _proto(handle, "bpf_map_get_next_key", i, i, vp, vp)
        _proto(handle, "bpf_obj_get", i, cp)
        _proto(handle, "libbpf_num_possible_cpus", i)
        _state.lib = handle
    install_logger()
    return handle


def install_logger() -> None:
    """Route libbpf's messages (warnings and info) into our buffer; idempotent."""
    if _state.print_cb is not None or _state.lib is None:
        return
    libc = _libc()
    vsnprintf = libc.vsnprintf
    vsnprintf.restype = ctypes.c_int
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
        if level >= _LOG_DEBUG or fmt is None:
            return 0
        buf = ctypes.create_string_buffer(_LOG_BUF)
        vsnprintf(buf, len(buf), fmt, args)
        with _log_lock:
            _log_seq[0] += 1
            _log.append((_log_seq[0], buf.value.decode(errors="replace")))
        return 0

    _state.print_cb = _PRINT_FN(_on_print)
    _state.lib.libbpf_set_print(_state.print_cb)


def _mark_log() -> int:
    """Sequence number of the last logged line: pass to `_log_since` after a call."""
    with _log_lock:
        return _log_seq[0]


def _log_since(mark: int) -> list[str]:
    with _log_lock:
        return [line for seq, line in _log if seq > mark]


def _err(ret: int) -> int:
    """errno of a failed call: libbpf 1.x returns -errno (and sets errno)."""
    if ret < 0:
        return -ret
    return ctypes.get_errno() or errno.EINVAL


def num_possible_cpus() -> int:
    n = int(lib().libbpf_num_possible_cpus())
    if n <= 0:
        raise LibbpfError(-n if n < 0 else errno.EINVAL, "libbpf_num_possible_cpus")
    return n


class BpfObject:
    """A libbpf bpf_object: open (no kernel change), check, load, then use programs and maps."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lib = lib()
        mark = _mark_log()
        ctypes.set_errno(0)
        ptr = self._lib.bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            raise LibbpfError(ctypes.get_errno() or errno.EINVAL, f"cannot open BPF object {path}",
                              _log_since(mark))
        self._obj: int | None = ptr
        self.loaded = False

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the object; its fds close (attached programs and pinned maps stay in the kernel)."""
        if self._obj is not None:
            self._lib.bpf_object__close(self._obj)
            self._obj = None

    def _handle(self) -> int:
        if self._obj is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._obj

    def _map(self, name: str) -> int:
        ptr = self._lib.bpf_object__find_map_by_name(self._handle(), name.encode())
        if not ptr:
            raise LibbpfError(errno.ENOENT, f"{self.path} has no map {name!r}")
        return int(ptr)

    def has_map(self, name: str) -> bool:
        return bool(self._lib.bpf_object__find_map_by_name(self._handle(), name.encode()))

    def map_sizes(self, name: str) -> tuple[int, int]:
        """(key size, value size) as declared in the object (available before load)."""
        m = self._map(name)
        return int(self._lib.bpf_map__key_size(m)), int(self._lib.bpf_map__value_size(m))

    def initial_value(self, name: str) -> bytes:
        """Initial contents of a global-data map such as ``.rodata.tg_abi`` (before load)."""
        size = ctypes.c_size_t(0)
        ptr = self._lib.bpf_map__initial_value(self._map(name), ctypes.byref(size))
        if not ptr:
            raise LibbpfError(errno.ENOENT, f"{self.path}: map {name!r} has no initial value")
        return ctypes.string_at(ptr, size.value)

    def load(self) -> None:
        """Create the maps and verify/load the programs in the kernel."""
        mark = _mark_log()
        ret = self._lib.bpf_object__load(self._handle())
        if ret != 0:
            raise LibbpfError(_err(ret), f"cannot load BPF object {self.path}", _log_since(mark))
        self.loaded = True

    def program_fd(self, name: str) -> int:
        prog = self._lib.bpf_object__find_program_by_name(self._handle(), name.encode())
        if not prog:
            raise LibbpfError(errno.ENOENT, f"{self.path} has no program {name!r}")
        fd = int(self._lib.bpf_program__fd(prog))
        if fd < 0:
            raise LibbpfError(-fd, f"program {name!r} has no fd (not loaded?)")
        return fd

    def map_fd(self, name: str) -> int:
        fd = int(self._lib.bpf_map__fd(self._map(name)))
        if fd < 0:
            raise LibbpfError(-fd, f"map {name!r} has no fd (not loaded?)")
        return fd

    def pin_map(self, name: str, path: str) -> None:
        mark = _mark_log()
        ret = self._lib.bpf_map__pin(self._map(name), os.fsencode(path))
        if ret != 0:
            raise LibbpfError(_err(ret), f"cannot pin map {name!r} at {path}", _log_since(mark))

    def unpin_map(self, name: str, path: str) -> None:
        ret = self._lib.bpf_map__unpin(self._map(name), os.fsencode(path))
        if ret != 0:
            raise LibbpfError(_err(ret), f"cannot unpin map {name!r} from {path}")


# --- low-level map access (any map fd, including ones opened from a pin) ---------------------


def _buf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, len(data))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    ret = lib().bpf_map_update_elem(fd, _buf(key), _buf(value), flags)
    if ret != 0:
        raise LibbpfError(_err(ret), f"bpf_map_update_elem(fd {fd})")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None when the key is absent. Per-CPU maps: value_size covers all CPUs."""
    out = ctypes.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, _buf(key), out)
    if ret != 0:
        code = _err(ret)
        if code == errno.ENOENT:
            return None
        raise LibbpfError(code, f"bpf_map_lookup_elem(fd {fd})")
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete a key; False when it was not there."""
    ret = lib().bpf_map_delete_elem(fd, _buf(key))
    if ret != 0:
        code = _err(ret)
        if code == errno.ENOENT:
            return False
        raise LibbpfError(code, f"bpf_map_delete_elem(fd {fd})")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """All keys of a hash/LPM map (a snapshot walk; concurrent changes may skip or repeat)."""
    prev: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(10_000_000):  # bounded: maps here hold far fewer entries
        nxt = ctypes.create_string_buffer(key_size)
        ret = lib().bpf_map_get_next_key(fd, prev, nxt)
        if ret != 0:
            code = _err(ret)
            if code == errno.ENOENT:
                return
            raise LibbpfError(code, f"bpf_map_get_next_key(fd {fd})")
        yield nxt.raw
        prev = nxt


def obj_get(path: str) -> int:
    """fd of a pinned object (caller closes it with os.close)."""
    ret = int(lib().bpf_obj_get(os.fsencode(path)))
    if ret < 0:
        raise LibbpfError(_err(ret), f"bpf_obj_get({path})")
    return ret
