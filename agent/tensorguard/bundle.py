"""Where an installed TensorGuard finds its bundled compiled wheels: one directory per Python version.

The .debs ship the pure-Python dependencies once, in ``/usr/lib/tensorguard/python``, and each compiled
one (pydantic-core, uvloop, httptools) once per supported CPython, in ``/usr/lib/tensorguard/python3.X``,
so that one build installs on Debian 12 (Python 3.11) and Debian 13 (Python 3.13). The launchers call
``use_bundled_binaries`` before anything imports pydantic. Nothing here may import a dependency.
"""

from __future__ import annotations

import sys
from pathlib import Path

LIBDIR = Path("/usr/lib/tensorguard")


def version_dir(libdir: Path | str = LIBDIR, version: tuple[int, int] | None = None) -> Path:
    """The directory holding the compiled wheels for ``version`` (default: this interpreter)."""
    major, minor = version or sys.version_info[:2]
    return Path(libdir) / f"python{major}.{minor}"


def supported_versions(libdir: Path | str = LIBDIR) -> list[str]:
    """The Python versions this installation carries compiled wheels for, e.g. ``["3.11", "3.13"]``."""
    found = [p.name.removeprefix("python") for p in Path(libdir).glob("python3.*") if p.is_dir()]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def use_bundled_binaries(libdir: Path | str = LIBDIR) -> None:
    """Put this interpreter's compiled-wheel directory first on ``sys.path``, or exit with a clear error."""
    here = version_dir(libdir)
    if not here.is_dir():
        have = ", ".join(supported_versions(libdir)) or "none"
        major, minor = sys.version_info[:2]
        raise SystemExit(
            f"tensorguard: this installation has no compiled modules for Python {major}.{minor} "
            f"({here} is missing; bundled for: {have}). Install the TensorGuard packages built for "
            f"this release, or run them with a supported python3.")
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
