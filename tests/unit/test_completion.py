"""Completion scripts written by packaging/gen-completions: valid shell that really completes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import shtab

from tensorguard.cli import completion, tgctl

from ..conftest import REPO

GENERATED = {"bash/tgctl", "bash/tensorguard", "zsh/_tgctl", "zsh/_tensorguard"}


def generate(outdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "packaging" / "gen-completions"), str(outdir)],
        env={**os.environ, "PYTHONPATH": str(REPO / "agent"), **env},
        capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("completions")
    done = generate(outdir)
    assert done.returncode == 0, done.stderr
    return outdir


def test_gen_completions_writes_the_four_scripts(scripts: Path) -> None:
    assert {str(p.relative_to(scripts)) for p in scripts.rglob("*") if p.is_file()} == GENERATED
    assert (scripts / "zsh" / "_tgctl").read_text().startswith("#compdef tgctl\n")
    assert (scripts / "zsh" / "_tensorguard").read_text().startswith("#compdef tensorguard\n")


@pytest.mark.parametrize("name", ["tgctl", "tensorguard"])
def test_bash_scripts_are_valid_bash(scripts: Path, name: str) -> None:
    done = subprocess.run(["bash", "-n", str(scripts / "bash" / name)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (apt install zsh)")
@pytest.mark.parametrize("name", ["_tgctl", "_tensorguard"])
def test_zsh_scripts_are_valid_zsh(scripts: Path, name: str) -> None:
    done = subprocess.run(["zsh", "-n", str(scripts / "zsh" / name)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, done.stderr


def complete(script: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of ``words``: the function the script registers, called as bash would."""
    program = words[0]
    array = " ".join(f"'{w}'" for w in words)
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'source "$1" || exit 9\n'
         f'fn=$(complete -p {program} | sed -n "s/.* -F \\([^ ]*\\) .*/\\1/p")\n'
         f'[ -n "$fn" ] || {{ echo "no completion function for {program}" >&2; exit 8; }}\n'
         f'COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}\n'
         f'COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}\n'
         '"$fn" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
         'printf "%s\\n" "${COMPREPLY[@]}"',
         "complete", str(script)],
        capture_output=True, text=True, cwd=cwd, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(("words", "expected", "absent"), [
    (["tgctl", "st"], {"status"}, {"config", "net"}),
    (["tgctl", ""], {"status", "config", "net", "identity", "completion"}, set()),
    (["tgctl", "--j"], {"--json"}, {"--unit"}),
    (["tgctl", "--"], {"--json", "--unit", "--config", "--socket-dir", "--timeout"}, set()),
    (["tgctl", "--unit", ""], {"netguard", "identity", "fl"}, {"status"}),
    (["tgctl", "--unit", "fl", "config", ""], {"validate", "show", "reload", "example"}, {"status"}),
    (["tgctl", "--json", "config", "re"], {"reload"}, {"show"}),
    (["tgctl", "net", "defence", ""], {"none", "cbr", "front", "wtfpad", "regulator"}, set()),
    (["tgctl", "net", "defence", "cbr", "--"], {"--rate"}, set()),
    (["tgctl", "identity", "audit", ""], {"verify", "proof"}, set()),
    (["tgctl", "identity", "enrol", "--"], {"--token-file"}, set()),
    (["tgctl", "completion", ""], {"bash", "zsh"}, set()),
])
def test_bash_completes_tgctl(scripts: Path, words: list[str], expected: set[str], absent: set[str]) -> None:
    offered = set(complete(scripts / "bash" / "tgctl", words))
    assert expected <= offered, offered
    assert not absent & offered, offered


@pytest.mark.parametrize(("words", "expected"), [
    (["tensorguard", "s"], {"server"}),
    (["tensorguard", ""], {"netguard", "identity", "fl", "agent", "server", "bench"}),
    (["tensorguard", "netguard", "--"], {"--config", "--drop-in-dir"}),
    (["tensorguard", "bench", ""], {"datapath", "renewal", "identity"}),
    (["tensorguard", "bench", "identity", "--"], {"--quick", "--json"}),
    (["tensorguard", "server", ""], {"ca", "token", "serve", "bench"}),
    (["tensorguard", "server", "ca", ""], {"init", "show"}),
    (["tensorguard", "server", "serve", "--t"], {"--tls"}),
    (["tensorguard", "server", "serve", "--tls", ""], {"auto", "rustls", "openssl"}),
])
def test_bash_completes_tensorguard_and_its_server_tree(scripts: Path, words: list[str],
                                                        expected: set[str]) -> None:
    offered = set(complete(scripts / "bash" / "tensorguard", words))
    assert expected <= offered, offered


def test_path_arguments_complete_files_and_directories(scripts: Path, tmp_path: Path) -> None:
    (tmp_path / "agent-test.toml").write_text("")
    (tmp_path / "agent-sockets").mkdir()
    tgctl_script = scripts / "bash" / "tgctl"
    assert {"agent-test.toml", "agent-sockets"} <= set(
        complete(tgctl_script, ["tgctl", "config", "validate", "ag"], tmp_path))
    assert set(complete(tgctl_script, ["tgctl", "--config", "agent-t"], tmp_path)) == {"agent-test.toml"}
    assert set(complete(tgctl_script, ["tgctl", "--socket-dir", "ag"], tmp_path)) == {"agent-sockets"}
    assert set(complete(scripts / "bash" / "tensorguard", ["tensorguard", "identity", "--drop-in-dir", "ag"],
                        tmp_path)) == {"agent-sockets"}


def test_scripts_do_not_depend_on_the_building_host(scripts: Path, tmp_path: Path) -> None:
    """The server's help names what this host would pick (TLS front, parser); the scripts must not."""
    front = tmp_path / "tensorguard-tlsfront"
    front.write_text("#!/bin/sh\n")
    front.chmod(0o755)
    other = tmp_path / "out"
    done = generate(other, TENSORGUARD_TLSFRONT=str(front))
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        assert (other / name).read_text() == (scripts / name).read_text(), name
    assert "here:" not in (scripts / "zsh" / "_tensorguard").read_text()


def test_packaged_scripts_are_current(scripts: Path) -> None:
    """The .debs install packaging/completions (Debian 12's shtab cannot write them at build time)."""
    committed = REPO / "packaging" / "completions"
    for name in sorted(GENERATED):
        assert (committed / name).read_text() == (scripts / name).read_text(), (
            f"packaging/completions/{name} is stale: run `make docs`")


def test_path_markers_are_shtabs() -> None:
    assert completion.FILE.items() <= shtab.FILE.items()
    assert completion.DIRECTORY.items() <= shtab.DIRECTORY.items()


def test_tgctl_completion_prints_the_packaged_script(scripts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for shell, name in (("bash", "bash/tgctl"), ("zsh", "zsh/_tgctl")):
        assert tgctl.main(["completion", shell]) == 0
        assert capsys.readouterr().out == (scripts / name).read_text()


def test_tgctl_completion_without_shtab_says_what_to_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['shtab'] = None\n"
         "from tensorguard.cli.tgctl import main; sys.exit(main(['completion', 'bash']))"],
        env={**os.environ, "PYTHONPATH": str(REPO / "agent")}, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "tgctl completion bash: " in done.stderr and "python3-shtab" in done.stderr
    assert "Traceback" not in done.stderr


def test_gen_completions_reports_an_unwritable_outdir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = generate(blocker / "out")
    assert done.returncode == 1
    assert "gen-completions: cannot write into" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("version", "shell", "refused"), [
    ("1.5.5", "bash", True), ("1.4.2", "bash", True), ("1.5.5", "zsh", False),
    ("1.5.6", "bash", False), ("1.7.2", "bash", False), ("1.13.0", "bash", False),
    ("UNKNOWN", "bash", False),
])
def test_a_shtab_that_writes_broken_bash_scripts_is_refused(version: str, shell: str, refused: bool) -> None:
    if refused:
        with pytest.raises(completion.CompletionUnavailable, match=f"shtab {version} writes bash scripts"):
            completion.check_version(version, shell)
    else:
        completion.check_version(version, shell)


DEBIAN_PYTHON = Path("/usr/bin/python3")


def debian_shtab_version() -> str | None:
    if not DEBIAN_PYTHON.exists():
        return None
    done = subprocess.run([str(DEBIAN_PYTHON), "-I", "-c", "import shtab; print(shtab.__version__)"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.skipif(debian_shtab_version() not in {"1.5.5"}, reason="needs Debian 12's python3-shtab 1.5.5")
def test_debian_12s_shtab_is_refused_for_bash_and_used_for_zsh() -> None:
    code = ("import argparse, sys\nfrom tensorguard.cli.completion import CompletionUnavailable, script\n"
            "p = argparse.ArgumentParser(prog='x'); p.add_argument('--pick', choices=['a', 'b'])\n"
            "assert script(p, 'zsh').startswith('#compdef x')\n"
            "try:\n    script(p, 'bash')\nexcept CompletionUnavailable as exc:\n    print(exc)\n")
    done = subprocess.run([str(DEBIAN_PYTHON), "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "agent")},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "shtab 1.5.5 writes bash scripts that complete only the first choice" in done.stdout
