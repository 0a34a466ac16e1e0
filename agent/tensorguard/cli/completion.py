"""Shell completion scripts, written by shtab from the argparse parsers themselves."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")

# shtab before 1.5.6 (Debian 12 ships 1.5.5) writes bash scripts that offer only the first choice of
# each list: `tgctl co<TAB>` completes nothing. Its zsh scripts are fine.
BASH_MIN_SHTAB = (1, 5, 6)

# shtab.FILE and shtab.DIRECTORY, the values of its documented ``action.complete`` hook: copied so
# that building a parser does not import shtab (the unit tests check they still equal shtab's).
FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}


class CompletionUnavailable(RuntimeError):
    """shtab, which writes the scripts, is missing or known to write a broken one."""


def complete_as(action: argparse.Action, kind: dict[str, str]) -> argparse.Action:
    """Mark an argument's values as paths (FILE or DIRECTORY) for the completion scripts."""
    action.complete = kind  # type: ignore[attr-defined]  # read by shtab, ignored by argparse
    return action


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``parser.prog`` in ``shell`` (one of SHELLS)."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for shell {shell!r}: choose one of {', '.join(SHELLS)}")
    try:
        import shtab  # noqa: PLC0415 (only completion needs it)
    except ImportError:
        raise CompletionUnavailable(
            "writing a completion script needs the Python module shtab (apt install python3-shtab, "
            "or pip install 'shtab>=1.5.6'); the Debian packages already install the scripts") from None
    check_version(getattr(shtab, "__version__", "UNKNOWN"), shell)
    text: str = shtab.complete(parser, shell)
    return text if text.endswith("\n") else text + "\n"


def check_version(version: str, shell: str) -> None:
    """Refuse a shtab known to write a broken script for ``shell``; an unparsable version passes."""
    parts = version.split(".")[:3]
    if shell != "bash" or not all(part.isdigit() for part in parts):
        return
    if tuple(int(part) for part in parts) < BASH_MIN_SHTAB:
        wanted = ".".join(map(str, BASH_MIN_SHTAB))
        raise CompletionUnavailable(
            f"shtab {version} writes bash scripts that complete only the first choice of each list; "
            f"{wanted} or later is needed (pip install 'shtab>={wanted}')")
