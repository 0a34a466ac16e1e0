#!/usr/bin/python3
"""Clean-install harness: a throw-away Debian 12 or 13 root booted with systemd-nspawn.

Used by tests/e2e/, and by hand:

    packaging/rootfs.py cache [--suite S]             # build (or reuse) the cached base tarball
    packaging/rootfs.py shell [--suite S] [DEBS_DIR]  # extract, install the .debs, boot, print
                                                      # how to get in, wait for Enter, tear down

Pieces:
  * ``ensure_base_tarball(suite=...)``: ``debootstrap --variant=minbase`` of bookworm
    (Debian 12) or trixie (Debian 13) with systemd, cached as a tarball under
    /var/cache/tensorguard-e2e/, keyed by suite + mirror + variant + include list +
    architecture. Rebuilt only when absent. Nothing else lives in the cache.
  * ``Rootfs``: the tarball extracted into a fresh temporary directory; runs
    commands in it with chroot (with /proc, /sys, /dev, /dev/pts mounted for the
    duration of the call and unmounted afterwards).
  * ``Container``: ``systemd-nspawn --boot --register=no --keep-unit`` of that
    root in the background; finds the container's PID 1 and runs commands in it
    with ``nsenter -t PID -a``; ``stop()`` powers it off (escalating to
    SIGKILL of the container's PID 1 if needed) and waits for nspawn to exit.
  * ``booted()``: the two together for a test: install some of the .debs,
    boot, yield the Container, always tear down (also on SIGTERM).

Every mount this module makes is recorded and undone in ``close()``; the
temporary root is only deleted once no mount is left below it, and then with
``rm --one-file-system`` so a leftover bind mount can never take host files
with it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TG_E2E_CACHE", "/var/cache/tensorguard-e2e"))
# The Debian releases the packages are built for and tested on: 12 (Python 3.11) and 13 (3.13).
SUITES = ("bookworm", "trixie")
SUITE = SUITES[0]
MIRROR = os.environ.get("TG_E2E_MIRROR", "http://deb.debian.org/debian")
VARIANT = "minbase"
# What the base root has besides minbase: an init that can boot, and a bus.
# Everything the .debs need must come from their Depends through apt.
INCLUDE = ("systemd", "systemd-sysv", "dbus")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_RUN_DIR = Path("/run/systemd/nspawn")


def _print_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# Replaceable sink for progress lines (the e2e test routes them past pytest's
# output capture so that a run of several minutes shows where it is).
LOG_SINK = _print_log


def log(msg: str) -> None:
    LOG_SINK(f"[e2e {time.strftime('%H:%M:%S')}] {msg}")


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Print a step's start and its duration (the e2e takes minutes)."""
    log(f"{name} ...")
    t0 = time.monotonic()
    try:
        yield
    except BaseException:
        log(f"{name}: FAILED after {time.monotonic() - t0:.1f}s")
        raise
    log(f"{name}: done in {time.monotonic() - t0:.1f}s")


def run(cmd: Sequence[str], *, check: bool = True, capture: bool = False,
        timeout: float | None = None, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), check=check, text=True, timeout=timeout, env=env, input=input,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True,
                          capture_output=True, text=True).stdout.strip()


def cache_key(include: Sequence[str] = INCLUDE, suite: str = SUITE) -> str:
    material = "|".join([suite, MIRROR, VARIANT, ",".join(sorted(include)), host_arch()])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def tarball_path(include: Sequence[str] = INCLUDE, suite: str = SUITE) -> Path:
    return CACHE_DIR / f"rootfs-{suite}-{VARIANT}-{cache_key(include, suite)}.tar.zst"


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def is_mountpoint(path: Path) -> bool:
    return str(path) in mounts_below(path) if path.exists() else False


def safe_rmtree(path: Path) -> None:
    """Delete a temporary root, refusing while anything is still mounted below it."""
    if not path.exists():
        return
    left = mounts_below(path)
    for mnt in sorted(left, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)
    left = mounts_below(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def ensure_base_tarball(include: Sequence[str] = INCLUDE, suite: str = SUITE) -> Path:
    """Return the cached base tarball, debootstrapping it first when absent."""
    target = tarball_path(include, suite)
    if target.exists():
        log(f"base rootfs cache hit: {target}")
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same one
        if target.exists():
            return target
        build = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
        build.chmod(0o755)  # becomes the container's /
        tmp = target.with_suffix(".partial")
        try:
            with step(f"debootstrap {suite} ({VARIANT}, +{','.join(include)}) [cold cache]"):
                run(["debootstrap", f"--variant={VARIANT}", f"--include={','.join(include)}",
                     suite, str(build), MIRROR])
            # Smaller and deterministic: no downloaded .debs, no apt lists
            # (the test runs apt-get update against the live archive anyway).
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (build / sub).glob("*"):
                    if p.is_file():
                        p.unlink()
            with step(f"pack {target.name}"):
                run(["tar", "--numeric-owner", "--xattrs", "--acls", "-C", str(build),
                     "--zstd", "-cpf", str(tmp), "."])
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)  # only left when packing failed
            safe_rmtree(build)
    return target


WORK_PREFIX = "tensorguard-e2e-"
WORK_PARENT = "/var/tmp"  # noqa: S108 (mkdtemp below: private, unpredictable names)


def reap_stale(max_age_s: float = 3600) -> None:
    """Delete work directories of runs that were killed before their teardown.

    Only directories older than ``max_age_s`` with nothing mounted below them
    and no process referring to them (a live run has nspawn or chroot mounts)
    are removed, so concurrent runs are never touched.
    """
    now = time.time()
    for workdir in Path(WORK_PARENT).glob(WORK_PREFIX + "*"):
        try:
            if not workdir.is_dir() or now - workdir.stat().st_mtime < max_age_s:
                continue
        except OSError:
            continue
        if mounts_below(workdir) or _referenced(workdir):
            continue
        log(f"removing stale {workdir} (left by a killed run)")
        with contextlib.suppress(RuntimeError, subprocess.CalledProcessError):
            safe_rmtree(workdir)


def _referenced(path: Path) -> bool:
    needle = str(path).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "cmdline").read_bytes():
                    return True
    return False


class Rootfs:
    """A fresh copy of the base root in a temporary directory."""

    def __init__(self, tarball: Path, parent: str = WORK_PARENT) -> None:
        # workdir/root is the container's /, workdir/ also holds logs. /var/tmp:
        # on disk (a root is ~400 MB), where /tmp may be a small tmpfs.
        self.workdir = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent))
        self.path = self.workdir / "root"
        self._mounts: list[Path] = []
        try:
            # mkdtemp makes 0700 directories; a root dir that only root may
            # traverse breaks every service running as another user.
            self.path.mkdir(mode=0o755)
            self.path.chmod(0o755)
            with step(f"extract base rootfs into {self.path}"):
                run(["tar", "--numeric-owner", "--xattrs", "--acls", "-C", str(self.path),
                     "--zstd", "-xpf", str(tarball)])
            self.path.chmod(0o755)  # tar -p restores "." from the archive
        except BaseException:
            self.close()
            raise

    # -- chroot -------------------------------------------------------------

    def _mount(self, *args: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(target)])
        self._mounts.append(target)

    def _umount_all(self) -> None:
        while self._mounts:
            mnt = self._mounts.pop()
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)

    @contextlib.contextmanager
    def chroot_mounts(self) -> Iterator[None]:
        """/proc, /sys, /dev, /dev/pts and resolv.conf for chrooted commands."""
        root = self.path
        if Path("/etc/resolv.conf").exists():
            (root / "etc/resolv.conf").unlink(missing_ok=True)
            shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
        try:
            self._mount("-t", "proc", "proc", target=root / "proc")
            self._mount("-t", "sysfs", "-o", "ro", "sysfs", target=root / "sys")
            self._mount("--bind", "/dev", target=root / "dev")
            self._mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
                        target=root / "dev/pts")
            yield
        finally:
            self._umount_all()

    def chroot(self, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
        env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root",
               "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}
        return run(["chroot", str(self.path), *cmd], env=env, **kw)

    def install_debs(self, debs: Sequence[Path], packages: Sequence[str] | None = None) -> str:
        """Copy the .debs in and ``apt-get install`` them from the Debian archive."""
        dest = self.path / "root/debs"
        dest.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            shutil.copy2(deb, dest / deb.name)
        names = [f"/root/debs/{d.name}" for d in debs if packages is None
                 or d.name.split("_")[0] in packages]
        with self.chroot_mounts():
            with step("apt-get update (in chroot)"):
                self.chroot(["apt-get", "-q", "update"], capture=True, timeout=600)
            with step(f"apt-get install {' '.join(Path(n).name for n in names)} (in chroot)"):
                out = self.chroot(
                    ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0",
                     "--no-install-recommends", "install", *names],
                    capture=True, check=False, timeout=900)
                print(out.stdout, file=sys.stderr)
                if out.returncode != 0:
                    raise RuntimeError(f"apt-get install failed (exit {out.returncode})")
            self.chroot(["apt-get", "clean"], check=False)
        return out.stdout

    def close(self) -> None:
        self._umount_all()
        safe_rmtree(self.workdir)


class Container:
    """``systemd-nspawn --boot`` of a Rootfs, driven from outside with nsenter."""

    def __init__(self, rootfs: Rootfs, name: str | None = None,
                 capabilities: Sequence[str] = ()) -> None:
        """``capabilities``: more than nspawn's default set (e.g. CAP_NET_ADMIN, CAP_BPF for
        netguard; the container shares the host's network, so netguard is given interfaces in a
        network namespace made inside the container)."""
        self.rootfs = rootfs
        self.capabilities = tuple(capabilities)
        self.name = name or f"tg-e2e-{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.console_log = rootfs.workdir / "console.log"
        self.pidns: str | None = None
        self._mounted_nspawn_dir = False

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        if not is_mountpoint(NSPAWN_RUN_DIR):
            NSPAWN_RUN_DIR.mkdir(parents=True, exist_ok=True)
            run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUN_DIR)])
            self._mounted_nspawn_dir = True
        cmd = ["systemd-nspawn", "-q", "-D", str(self.rootfs.path), "--boot",
               "--register=no", "--keep-unit", f"--machine={self.name}",
               "--console=read-only"]
        if self.capabilities:
            cmd.append("--capability=" + ",".join(self.capabilities))
        log("boot: " + " ".join(cmd))
        with open(self.console_log, "wb") as console:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console()}")
            pid = self._find_pid1()
            if pid:
                self.pid1 = pid
                self.pidns = os.readlink(f"/proc/{pid}/ns/pid")
                log(f"container PID 1 is host PID {pid} (nspawn PID {self.proc.pid})")
                return
            time.sleep(0.2)
        raise TimeoutError(f"no systemd under nspawn after {timeout}s:\n{self.console()}")

    def _find_pid1(self) -> int | None:
        assert self.proc is not None
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        for kid in kids:
            try:
                comm = Path(f"/proc/{kid}/comm").read_text().strip()
                if comm == "systemd" and os.readlink(f"/proc/{kid}/ns/pid") != os.readlink(
                        "/proc/self/ns/pid"):
                    return int(kid)
            except OSError:
                continue
        return None

    def console(self, tail: int = 80) -> str:
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def wait_running(self, timeout: float = 180) -> str:
        """Wait for ``systemctl is-system-running --wait``; returns the state."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            try:
                r = self.sh("systemctl is-system-running --wait", check=False,
                            timeout=max(5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                state = "timeout"
                break
            state = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "unknown"
            if state in ("running", "degraded"):
                return state
            if state in ("maintenance", "stopping", "offline"):
                break
            time.sleep(1)  # bus not up yet: retry
        jobs = self.sh("systemctl list-jobs --no-pager", check=False, timeout=30).stdout
        raise RuntimeError(f"container did not reach running (state {state!r}); jobs:\n{jobs}\n"
                           f"console:\n{self.console()}")

    def stop(self, timeout: float = 60) -> None:
        """Power off; escalate to SIGKILL of the container's PID 1. Always reaps nspawn."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.pid1:
                # SIGRTMIN+4 asks systemd for poweroff.target.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 4)
                self._wait_exit(timeout / 2)
            if self.proc.poll() is None:
                log("container did not power off in time: SIGTERM to nspawn")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                self._wait_exit(timeout / 4)
            if self.proc.poll() is None:
                log("still running: SIGKILL to the container's PID 1 and to nspawn")
                # Killing a PID namespace's init kills every process in it.
                if self.pid1:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid1, signal.SIGKILL)
                self._wait_exit(10)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        finally:
            self._release_nspawn_dir()
        log(f"nspawn exited with {self.proc.returncode}")

    def _wait_exit(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)  # type: ignore[union-attr]

    def _release_nspawn_dir(self) -> None:
        if not self._mounted_nspawn_dir:
            return
        # Another container (someone else's) may be using it: only unmount when
        # no machine left anything in it.
        if not any((NSPAWN_RUN_DIR / "propagate").glob("*")):
            subprocess.run(["umount", str(NSPAWN_RUN_DIR)], check=False)
            self._mounted_nspawn_dir = False

    # -- running things inside ----------------------------------------------

    def exec(self, cmd: Sequence[str], *, check: bool = True, timeout: float | None = 120,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the booted container (all its namespaces)."""
        if self.pid1 is None:
            raise RuntimeError("container not started")
        env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
               "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *cmd],
                           text=True, capture_output=True, env=env, timeout=timeout,
                           input=input, check=False)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.exec(["/bin/sh", "-c", script], **kw)

    def processes(self) -> list[str]:
        """Host PIDs and command lines of processes still running for this container:
        nspawn itself and everything in the container's PID namespace."""
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                mine = (self.proc is not None and int(d.name) == self.proc.pid
                        and self.proc.poll() is None)
                if mine or (self.pidns and os.readlink(d / "ns/pid") == self.pidns):
                    found.append(f"{d.name}: " + (d / "cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                continue
        return found


@contextlib.contextmanager
def booted(debs: Sequence[Path], packages: Sequence[str], suite: str = SUITE,
           capabilities: Sequence[str] = ()) -> Iterator[Container]:
    """A fresh ``suite`` with ``packages`` (from ``debs``, all copied to /root/debs) installed
    by apt-get, booted with systemd-nspawn; always powered off, unmounted and deleted.

    A SIGTERM (CI time-out, ``kill``) becomes an interruption so that the teardown still
    runs. After the teardown, a process left in the container or an undeleted root is an
    error (RuntimeError)."""
    t_start = time.monotonic()
    reap_stale()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, interrupted)
    left: list[str] = []
    root: Rootfs | None = None
    try:
        root = Rootfs(ensure_base_tarball(suite=suite))
        box = Container(root, capabilities=capabilities)
        try:
            root.install_debs(list(debs), packages=packages)
            with step("boot with systemd-nspawn"):
                box.start()
                state = box.wait_running()
            log(f"system state: {state}")
            if state != "running":
                failed = box.sh("systemctl --failed --no-legend --no-pager", check=False).stdout
                log(f"failed units:\n{failed}")
            log(f"machine ready after {time.monotonic() - t_start:.1f}s")
            yield box
        finally:
            with step("teardown: power off, unmount, delete"):
                try:
                    box.stop()
                    left = box.processes()
                finally:
                    root.close()
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        log(f"e2e total {time.monotonic() - t_start:.1f}s")
    if left:
        raise RuntimeError(f"processes left after teardown: {left}")
    if root is not None and root.workdir.exists():
        raise RuntimeError(f"{root.workdir} not deleted")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="TensorGuard clean-install harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cache = sub.add_parser("cache", help="build (or reuse) the cached base rootfs tarball")
    sh = sub.add_parser("shell", help="install the .debs in a fresh root, boot it, wait")
    for p in (cache, sh):
        p.add_argument("--suite", choices=SUITES, default=SUITE, help="Debian release (default: %(default)s)")
    sh.add_argument("debs", nargs="?", default=os.environ.get(
        "TG_DEBS_DIR", str(Path(__file__).resolve().parent.parent / "build" / "debs")))
    args = ap.parse_args(argv)

    tarball = ensure_base_tarball(suite=args.suite)
    if args.cmd == "cache":
        print(tarball)
        return 0
    debs = sorted(Path(args.debs).glob("*.deb"))
    root = Rootfs(tarball)
    box = Container(root)
    try:
        if debs:
            root.install_debs(debs)
        box.start()
        print(f"state: {box.wait_running()}")
        print(f"get in with: nsenter -t {box.pid1} -a /bin/bash   (Enter here to tear down)")
        with contextlib.suppress(EOFError):
            input()
    finally:
        box.stop()
        root.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
