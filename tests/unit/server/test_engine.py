"""Parser and loop selection: the C ones when they import, the pure-Python ones otherwise, and a clear
error when one that was asked for cannot be used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tensorguard.server.engine import Engine, EngineError, installed, preview, select, usable
from tensorguard.server.settings import ServerSettings
from tensorguard.server.tlsproto import PeerCertH11Protocol


def test_auto_takes_the_fast_ones_when_they_work() -> None:
    engine = select()
    assert engine.http == ("httptools" if usable("httptools") else "h11")
    assert engine.loop == ("uvloop" if usable("uvloop") else "asyncio")
    assert preview() == engine  # --help says what serve will run


def test_the_pure_python_stack_can_always_be_chosen() -> None:
    engine = select("h11", "asyncio")
    assert engine == Engine("h11", "asyncio")
    protocol = engine.protocol("PEM")
    assert issubclass(protocol, PeerCertH11Protocol) and protocol.server_cert_pem == "PEM"
    assert engine.describe().startswith("h11 0.") and engine.describe().endswith(" on asyncio")


@pytest.mark.skipif(not usable("httptools"), reason="httptools is not installed here")
def test_the_httptools_protocol_carries_the_tls_extension() -> None:
    from tensorguard.server.tls_httptools import PeerCertHttpToolsProtocol  # noqa: PLC0415

    protocol = Engine("httptools", "asyncio").protocol(None)
    assert issubclass(protocol, PeerCertHttpToolsProtocol)


@pytest.mark.parametrize(("http", "loop", "needle"), [("h2", "auto", "HTTP parser must be one of"),
                                                      ("auto", "trio", "event loop must be one of")])
def test_unknown_names_are_refused(http: str, loop: str, needle: str) -> None:
    with pytest.raises(EngineError, match=needle):
        select(http, loop)
    with pytest.raises(ValueError, match="must be one of"):
        ServerSettings(ca_dir=Path("/nonexistent"), http=http, loop=loop)


def test_a_fast_module_that_does_not_import_is_not_used(tmp_path: Path) -> None:
    """A broken install (here: modules that raise on import, ahead on sys.path) falls back under auto and is
    refused by name when asked for."""
    for name in ("uvloop", "httptools"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('broken on purpose')\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tensorguard.server.engine import EngineError, select\n"
        "print(select().http, select().loop)\n"
        "for kind in ('http', 'loop'):\n"
        "    try:\n"
        "        select(**{kind: 'httptools' if kind == 'http' else 'uvloop'})\n"
        "    except EngineError as exc:\n"
        "        print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0] == "h11 asyncio"
    for line, name in zip(out[1:], ("httptools", "uvloop"), strict=True):
        assert line.startswith(name) and f"apt install python3-{name}" in line
        assert ("is not installed" if not installed(name) else "or broken") in line
