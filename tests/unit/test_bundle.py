"""The launchers' choice of compiled-wheel directory (tensorguard/bundle.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tensorguard import bundle

REPO = Path(__file__).resolve().parents[2]


def test_version_dir_is_per_interpreter(tmp_path: Path) -> None:
    assert bundle.version_dir(tmp_path, (3, 13)) == tmp_path / "python3.13"
    assert bundle.version_dir(tmp_path) == tmp_path / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def test_supported_versions_sorted_numerically(tmp_path: Path) -> None:
    for v in ("3.13", "3.9", "3.11"):
        (tmp_path / f"python{v}").mkdir()
    (tmp_path / "python").mkdir()  # the pure-Python directory is no version
    (tmp_path / "python3.12").write_text("")  # a file is no directory
    assert bundle.supported_versions(tmp_path) == ["3.9", "3.11", "3.13"]


def test_use_bundled_binaries_puts_the_directory_first(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    here = bundle.version_dir(tmp_path)
    here.mkdir()
    monkeypatch.setattr(sys, "path", ["/somewhere"])
    bundle.use_bundled_binaries(tmp_path)
    bundle.use_bundled_binaries(tmp_path)  # idempotent
    assert sys.path == [str(here), "/somewhere"]


def test_unsupported_python_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "python3.99").mkdir()
    with pytest.raises(SystemExit) as caught:
        bundle.use_bundled_binaries(tmp_path)
    message = str(caught.value)
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}" in message
    assert "bundled for: 3.99" in message


@pytest.mark.parametrize("launcher", ["tensorguard", "tgctl"])
def test_launcher_refuses_an_install_without_this_python(launcher: str, tmp_path: Path) -> None:
    """The shipped launcher, pointed at a tree without this Python's directory, says so (exit 1)."""
    text = (REPO / "debian" / "launchers" / launcher).read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    script = tmp_path / launcher
    script.write_text(text.replace('"/usr/lib/tensorguard/python"', repr(str(REPO / "agent")))
                      .replace("use_bundled_binaries()", f"use_bundled_binaries({str(tmp_path)!r})"))
    r = subprocess.run([sys.executable, "-I", str(script), "--version"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "has no compiled modules for Python" in r.stderr, r.stderr
    (tmp_path / f"python{sys.version_info[0]}.{sys.version_info[1]}").mkdir()
    r = subprocess.run([sys.executable, "-I", str(script), "--version"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "0.1.0" in r.stdout + r.stderr, (r.stdout, r.stderr)
