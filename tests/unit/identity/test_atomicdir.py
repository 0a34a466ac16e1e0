"""The credential installer on real directories: a kill -9 at every step, a full disk, recovery of
leftovers and permission checks. Pairs are real ECDSA keys with real self-signed certificates."""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tensorguard.identity.atomicdir import (
    DATA,
    DATA_TMP,
    VERSION_PREFIX,
    AtomicDir,
    AtomicDirError,
    CredentialSet,
)
from tensorguard.identity.certinfo import pair_matches
from tensorguard.identity.filesystem import FaultyFileSystem, SimulatedCrash

WHENS = ("before", "during", "after")


def make_set(tag: str) -> CredentialSet:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, tag)])
    start = datetime.datetime(2024, 6, 1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return CredentialSet(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM), f"chain {tag}\n".encode(),
        extra=(("anchor.json", f'{{"tag": "{tag}"}}'.encode()),))


A, B, C = make_set("a"), make_set("b"), make_set("c")


def pair(creds: CredentialSet) -> tuple[bytes, bytes]:
    return creds.cert, creds.key


def read_pair(directory: Path) -> tuple[bytes | None, bytes | None]:
    """What a reader opening cert.pem and then key.pem gets right now."""
    out: list[bytes | None] = []
    for name in ("cert.pem", "key.pem"):
        try:
            out.append((directory / name).read_bytes())
        except FileNotFoundError:
            out.append(None)
    return out[0], out[1]


def recorder(seen: list[tuple[bytes | None, bytes | None]], directory: Path) -> Callable[[int, str], None]:
    """An on_step hook: a reader opens the pair after every step."""
    return lambda _number, _name: seen.append(read_pair(directory))


def versions(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(VERSION_PREFIX))


def sink(tmp_path: Path, name: str = "sink") -> Path:
    directory = tmp_path / name
    directory.mkdir(mode=0o700)
    return directory


def clean_install_log(tmp_path: Path) -> list[str]:
    """The steps of an install over an existing set, as the fault-injecting seam numbers them."""
    directory = sink(tmp_path, "measure")
    AtomicDir(directory).install(A)
    fs = FaultyFileSystem()
    AtomicDir(directory, fs).install(B)
    return fs.log


def test_layout_and_step_order(tmp_path: Path) -> None:
    log = clean_install_log(tmp_path)
    shape = [re.sub(r"\.\.cred\.[0-9a-f]+", "..cred.*", step) for step in log]
    assert shape == ["mkdir ..cred.*", "write key.pem", "write cert.pem", "write chain.pem",
                     "write anchor.json", "fsync ..cred.*/", "symlink ..data_tmp", "rename ..data_tmp",
                     "fsync measure/", "rmtree ..cred.*"]
    directory = tmp_path / "measure"
    assert os.readlink(directory / DATA).startswith(VERSION_PREFIX)
    for name in ("key.pem", "cert.pem", "chain.pem", "anchor.json"):
        assert os.readlink(directory / name) == f"{DATA}/{name}"
    assert read_pair(directory) == pair(B)
    assert len(versions(directory)) == 1


@pytest.mark.parametrize("when", WHENS)
def test_kill_at_every_step_leaves_a_matching_pair(tmp_path: Path, when: str) -> None:
    log = clean_install_log(tmp_path)
    swap = log.index("rename ..data_tmp") + 1
    for step in range(1, len(log) + 1):
        directory = sink(tmp_path, f"{when}-{step}")
        AtomicDir(directory).install(A)
        seen: list[tuple[bytes | None, bytes | None]] = []
        fs = FaultyFileSystem(on_step=recorder(seen, directory))
        fs.crash_at(step, when)  # type: ignore[arg-type]
        with pytest.raises(SimulatedCrash):
            AtomicDir(directory, fs).install(B)
        seen.append(read_pair(directory))
        assert set(seen) <= {pair(A), pair(B)}, f"mixed pair after a kill {when} step {step} ({log[step - 1]})"
        swapped = step > swap or (step == swap and when == "after")
        assert read_pair(directory) == pair(B if swapped else A)
        assert pair_matches(read_pair(directory)[1] or b"", read_pair(directory)[0] or b"")

        removed = AtomicDir(directory).recover()  # the restarted agent
        assert read_pair(directory) == pair(B if swapped else A)
        assert len(versions(directory)) == 1 and not (directory / DATA_TMP).exists()
        nothing_left = (step == 1 and when != "after") or (step == len(log) and when == "after")
        assert bool(removed) is not nothing_left, removed
        AtomicDir(directory).install(C)
        assert read_pair(directory) == pair(C) and len(versions(directory)) == 1


@pytest.mark.parametrize("when", WHENS)
def test_kill_during_the_first_install_never_shows_half_a_pair(tmp_path: Path, when: str) -> None:
    fs_log = FaultyFileSystem()
    AtomicDir(sink(tmp_path, "measure-first"), fs_log).install(A)
    for step in range(1, len(fs_log.log) + 1):
        directory = sink(tmp_path, f"first-{when}-{step}")
        seen: list[tuple[bytes | None, bytes | None]] = []
        fs = FaultyFileSystem(on_step=recorder(seen, directory))
        fs.crash_at(step, when)  # type: ignore[arg-type]
        with pytest.raises(SimulatedCrash):
            AtomicDir(directory, fs).install(A)
        seen.append(read_pair(directory))
        assert set(seen) <= {(None, None), pair(A)}, f"half a pair after step {step} {when}"
        AtomicDir(directory).recover()
        assert read_pair(directory) in {(None, None), pair(A)}
        AtomicDir(directory).install(B)
        assert read_pair(directory) == pair(B)


def test_disk_full_keeps_the_old_set_serving(tmp_path: Path) -> None:
    directory = sink(tmp_path)
    AtomicDir(directory).install(A)
    fs = FaultyFileSystem()
    fs.disk_full = True
    with pytest.raises(AtomicDirError) as info:
        AtomicDir(directory, fs).install(B)
    message = str(info.value)
    assert str(directory) in message and "No space left on device" in message and "previous set stays" in message
    assert B.key.decode() not in message and b"PRIVATE" not in message.encode()
    assert read_pair(directory) == pair(A)
    assert len(versions(directory)) == 1, "the torn version directory is cleaned up"
    fs.disk_full = False
    AtomicDir(directory, fs).install(B)
    assert read_pair(directory) == pair(B)


def test_recover_removes_leftovers(tmp_path: Path) -> None:
    directory = sink(tmp_path)
    AtomicDir(directory).install(A)
    stray = directory / f"{VERSION_PREFIX}0123456789abcdef"
    stray.mkdir()
    (stray / "key.pem").write_bytes(b"torn")
    os.symlink(stray.name, directory / DATA_TMP)
    removed = AtomicDir(directory).recover()
    assert removed == [DATA_TMP, stray.name]
    assert not stray.exists() and not os.path.lexists(directory / DATA_TMP)
    assert read_pair(directory) == pair(A)
    assert AtomicDir(directory).recover() == []


def test_current_reads_one_version_with_extras_and_bundle(tmp_path: Path) -> None:
    directory = sink(tmp_path)
    installer = AtomicDir(directory)
    assert installer.current() is None
    with_bundle = CredentialSet(A.key, A.cert, A.chain, b"bundle\n", A.extra)
    installer.install(with_bundle)
    assert installer.current() == with_bundle
    assert (directory / "bundle.pem").read_bytes() == b"bundle\n"
    installer.install(B)  # no bundle any more: its link goes too
    assert installer.current() == B
    assert not os.path.lexists(directory / "bundle.pem")


def test_modes_owner_and_directory_checks(tmp_path: Path) -> None:
    directory = sink(tmp_path)
    installer = AtomicDir(directory, mode=0o644, key_mode=0o640, uid=os.getuid(), gid=os.getgid())
    installer.install(A)
    data = directory / DATA
    assert stat.S_IMODE(os.stat(data / "key.pem").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(data / "cert.pem").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o755
    assert os.stat(data / "key.pem").st_gid == os.getgid()
    private = sink(tmp_path, "private")
    AtomicDir(private).install(A)
    assert stat.S_IMODE(os.stat(private / DATA / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(private / DATA).st_mode) == 0o700

    with pytest.raises(AtomicDirError, match=r"key file mode 0o644 is broader than 0o640"):
        AtomicDir(directory, key_mode=0o644)
    with pytest.raises(AtomicDirError, match=r"file mode 0o664 grants write"):
        AtomicDir(directory, mode=0o664)
    os.chmod(directory, 0o775)
    with pytest.raises(AtomicDirError, match=rf"{directory}: sink directory mode 0o775 lets group"):
        installer.install(B)
    with pytest.raises(AtomicDirError, match="does not exist"):
        AtomicDir(tmp_path / "missing").install(A)


def test_refuses_to_shadow_a_file_it_does_not_manage(tmp_path: Path) -> None:
    directory = sink(tmp_path)
    (directory / "cert.pem").write_bytes(b"hand-made")
    with pytest.raises(AtomicDirError, match=r"cert.pem: exists and is not the symlink \.\.data/cert.pem"):
        AtomicDir(directory).install(A)
    assert versions(directory) == [] and (directory / "cert.pem").read_bytes() == b"hand-made"


def test_bad_extra_file_names_are_refused(tmp_path: Path) -> None:
    bad = CredentialSet(A.key, A.cert, A.chain, extra=(("../evil", b""),))
    with pytest.raises(AtomicDirError, match=r"invalid credential file name '\.\./evil'"):
        AtomicDir(sink(tmp_path)).install(bad)
