"""Which units tgctl expects: all three in a checkout, the installed ones on a packaged system."""

from __future__ import annotations

from pathlib import Path

from tensorguard.cli.tgctl import installed_units


def test_development_checkout_expects_all_three(tmp_path: Path) -> None:
    assert installed_units((tmp_path,)) == (["netguard", "identity", "fl"], [])


def test_packaged_system_without_fl(tmp_path: Path) -> None:
    lib, etc = tmp_path / "lib", tmp_path / "etc"
    lib.mkdir()
    etc.mkdir()
    for name in ("tensorguard-agent.target", "tensorguard-netguard.service",
                 "tensorguard-identity.service"):
        (lib / name).write_text("")
    assert installed_units((etc, lib)) == (["netguard", "identity"], ["fl"])
    (etc / "tensorguard-fl.service").write_text("")
    assert installed_units((etc, lib)) == (["netguard", "identity", "fl"], [])
