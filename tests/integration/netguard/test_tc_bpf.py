"""tc/eBPF datapath in network namespaces: telemetry, leak guard, detach, crash cleanup, ABI check.

Needs root, bpffs, libbpf.so.1 and the object bpf/build/netguard.bpf.o (built here with
`make -C bpf` when missing and clang is installed). Traffic stays inside the two namespaces of
each test; namespaces, qdiscs, filters and pinned maps are removed even when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorguard.netguard.kernel import bpf_maps as m
from tensorguard.netguard.kernel import libbpf
from tensorguard.netguard.kernel.tc import (
    CGROUP2_MOUNTS,
    AbiMismatch,
    DatapathError,
    TcDatapath,
    cgroup_ref,
    cleanup_stale,
    in_netns,
    is_cgroup2,
    read_pinned_stats,
)
from tests.netns import Link, require_root_netns, veth_pair

REPO = Path(__file__).resolve().parents[3]
BPF_DIR = REPO / "bpf"
OBJECT = BPF_DIR / "build" / "netguard.bpf.o"
MISMATCH_OBJECT = BPF_DIR / "build" / "netguard-abi-mismatch.bpf.o"
BPFFS = Path("/sys/fs/bpf")
MARK = 0x10000
SO_MARK = 36
SO_RCVBUFFORCE = 33

pytestmark = pytest.mark.root


def _is_bpffs(path: Path) -> bool:
    try:
        with open("/proc/mounts") as mounts:
            return any(line.split()[1] == str(path) and line.split()[2] == "bpf" for line in mounts)
    except OSError:
        return False


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    require_root_netns()
    try:
        libbpf.lib()
    except Exception as exc:
        pytest.skip(f"libbpf.so.1 unavailable: {exc}")
    if not _is_bpffs(BPFFS):
        res = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            pytest.skip(f"no bpffs at {BPFFS} and mounting failed: {res.stderr.strip()}")
    if not OBJECT.exists():
        if shutil.which(os.environ.get("CLANG", "clang")) is None:
            pytest.skip(f"{OBJECT} missing and no clang to build it (make -C bpf)")
        subprocess.run(["make", "-C", str(BPF_DIR)], check=True, capture_output=True, timeout=300)
    return OBJECT


@pytest.fixture
def pin_dir(bpf_object: Path) -> Iterator[Path]:
    path = BPFFS / f"tensorguard-test-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def link(bpf_object: Path) -> Iterator[Link]:
    with veth_pair(subnet=secrets.randbelow(200) + 20) as lk:
        yield lk


@pytest.fixture
def datapath(link: Link, pin_dir: Path, bpf_object: Path) -> Iterator[TcDatapath]:
    dp = TcDatapath(link.robot_if, link.robot_ns, pin_dir, bpf_object)
    try:
        yield dp
    finally:
        dp.detach()


# --- traffic helpers (sockets are created inside a namespace and stay bound to it) -----------


def _socket_in(ns: str, family: int) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, socket.SOCK_DGRAM)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _mac(link: Link, robot: bool) -> str:
    run = link.robot if robot else link.peer
    info = json.loads(run("ip", "-j", "link", "show", link.robot_if if robot else link.peer_if).stdout)
    return str(info[0]["address"])


def warm_up(link: Link) -> None:
    """Static neighbours (no test packet waits, or is dropped, in an ARP/ND queue) and carrier."""
    robot_mac, peer_mac = _mac(link, True), _mac(link, False)
    for ip in (link.peer_ip, link.peer_ip6):
        link.robot("ip", "neigh", "replace", ip, "lladdr", peer_mac, "dev", link.robot_if,
                   "nud", "permanent")
    for ip in (link.robot_ip, link.robot_ip6):
        link.peer("ip", "neigh", "replace", ip, "lladdr", robot_mac, "dev", link.peer_if,
                  "nud", "permanent")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        up = [json.loads(run("ip", "-j", "link", "show", dev).stdout)[0].get("operstate")
              for run, dev in ((link.robot, link.robot_if), (link.peer, link.peer_if))]
        if up == ["UP", "UP"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"veth pair never came up: {up}")


class Receiver:
    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.sock = _socket_in(ns, _family(addr))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.bind((addr, port))

    def drain(self, quiet: float = 0.3, limit: float = 5.0) -> list[int]:
        """Sizes of datagrams received until `quiet` seconds pass without one (bounded)."""
        sizes: list[int] = []
        deadline = time.monotonic() + limit
        self.sock.settimeout(quiet)
        while time.monotonic() < deadline:
            try:
                sizes.append(len(self.sock.recv(65535)))
            except TimeoutError:
                break
        return sizes

    def reply(self, dst: str, port: int, sizes: list[int]) -> None:
        """Send from the receiving socket (its address and port are the source)."""
        for size in sizes:
            self.sock.sendto(b"\xa5" * size, (dst, port))

    def close(self) -> None:
        self.sock.close()


def send(ns: str, dst: str, port: int, sizes: list[int], mark: int | None = None) -> int:
    """Send one datagram per size; returns the local port used."""
    s = _socket_in(ns, _family(dst))
    try:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        s.bind(("::" if _family(dst) == socket.AF_INET6 else "0.0.0.0", 0))
        for size in sizes:
            s.sendto(b"\x5a" * size, (dst, port))
        return int(s.getsockname()[1])
    finally:
        s.close()


UDP4 = 28  # IPv4 + UDP header bytes
UDP6 = 48


def _selectors(link: Link) -> list[m.Selector]:
    return [
        m.Selector(1, ipaddress.ip_network(f"{link.peer_ip}/32"), "udp", 5000, 5001),
        m.Selector(2, ipaddress.ip_network(f"{link.peer_ip6}/128"), "udp", 5000, 5000),
    ]


# --- tests -----------------------------------------------------------------------------------


def test_counters_and_histograms_match_what_was_sent(link: Link, datapath: TcDatapath,
                                                     pin_dir: Path) -> None:
    dp = datapath
    dp.load()
    dp.set_selectors(_selectors(link))
    dp.attach()
    warm_up(link)

    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    rx_other = Receiver(link.peer_ns, link.peer_ip, 6000)
    rx6 = Receiver(link.peer_ns, link.peer_ip6, 5000)
    try:
        sizes = [200] * 100 + [1000] * 50
        sport = send(link.robot_ns, link.peer_ip, 5000, sizes)
        send(link.robot_ns, link.peer_ip, 6000, [400] * 20)          # unprotected port
        send(link.robot_ns, link.peer_ip6, 5000, [300] * 30)
        # Replies from the protected remote port: ingress of selector 1.
        rx.reply(link.robot_ip, sport, [100] * 10)
        assert len(rx.drain()) == 150
        assert len(rx_other.drain()) == 20
        assert len(rx6.drain()) == 30
    finally:
        for r in (rx, rx_other, rx6):
            r.close()
    time.sleep(0.2)

    st = dp.stats()
    eg = st.selector(1, m.Direction.EGRESS)
    assert eg is not None
    assert eg.packets == 150
    assert eg.bytes == 100 * (200 + UDP4) + 50 * (1000 + UDP4)
    expected_hist = [0] * m.SIZE_BINS
    expected_hist[m.size_bin(200 + UDP4)] += 100
    expected_hist[m.size_bin(1000 + UDP4)] += 50
    assert list(eg.size_hist) == expected_hist
    assert sum(eg.iat_hist) == 149
    assert eg.unshaped == 0 and eg.dropped == 0  # observe mode

    eg6 = st.selector(2, m.Direction.EGRESS)
    assert eg6 is not None and eg6.packets == 30 and eg6.bytes == 30 * (300 + UDP6)
    assert eg6.size_hist[m.size_bin(300 + UDP6)] == 30 and sum(eg6.iat_hist) == 29

    ing = st.selector(1, m.Direction.INGRESS)
    assert ing is not None and ing.packets == 10 and ing.bytes == 10 * (100 + UDP4)
    assert sum(ing.iat_hist) == 9

    # Unprotected traffic (port 6000, ICMP, ARP/ND) is seen but not counted as protected.
    assert st.counter(m.Direction.EGRESS, m.GlobalCounter.PROTECTED) == 180
    assert st.counter(m.Direction.INGRESS, m.GlobalCounter.PROTECTED) == 10
    assert st.counter(m.Direction.EGRESS, m.GlobalCounter.PACKETS) >= 200
    assert st.counter(m.Direction.EGRESS, m.GlobalCounter.IPV4) >= 170

    flows = [f for f in st.flows if f.selector_id == 1 and f.direction == m.Direction.EGRESS]
    assert len(flows) == 1
    flow = flows[0]
    assert (str(flow.remote), flow.remote_port, flow.local_port) == (link.peer_ip, 5000, sport)
    assert (flow.packets, flow.bytes) == (150, eg.bytes)
    assert not [f for f in st.flows if f.remote_port == 6000]

    # Another process reads the same numbers from the pinned maps.
    pinned = read_pinned_stats(pin_dir)
    assert pinned.selector(1, m.Direction.EGRESS) == eg
    assert pinned.counter(m.Direction.EGRESS, m.GlobalCounter.PROTECTED) == 180


def test_fragments_of_protected_flows_are_classified_and_guarded(link: Link,
                                                                datapath: TcDatapath) -> None:
    """Non-first fragments carry no ports: they match on address and protocol (no leak)."""
    dp = datapath
    dp.load()
    dp.set_selectors(_selectors(link))
    dp.attach()
    warm_up(link)
    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    rx6 = Receiver(link.peer_ns, link.peer_ip6, 5000)
    try:
        send(link.robot_ns, link.peer_ip, 5000, [3000] * 5)   # 3 fragments each at MTU 1500
        send(link.robot_ns, link.peer_ip6, 5000, [3000] * 5)
        assert rx.drain() == [3000] * 5 and rx6.drain() == [3000] * 5
        st = dp.stats()
        v4, v6 = st.selector(1, m.Direction.EGRESS), st.selector(2, m.Direction.EGRESS)
        assert v4 is not None and v4.packets == 15 and v4.bytes == 5 * (3000 + 8 + 3 * 20)
        assert v6 is not None and v6.packets == 15 and v6.bytes == 5 * (3000 + 8 + 3 * 48)

        dp.set_mode(m.Mode.FAIL_CLOSED)
        send(link.robot_ns, link.peer_ip, 5000, [3000] * 4)
        send(link.robot_ns, link.peer_ip6, 5000, [3000] * 4)
        assert rx.drain() == [] and rx6.drain() == []
        st = dp.stats()
        v4, v6 = st.selector(1, m.Direction.EGRESS), st.selector(2, m.Direction.EGRESS)
        # A drop of the first fragment makes the IP stack abandon the rest of the datagram, so
        # 1 to 3 fragments per datagram reach tc; none reaches the peer, none is counted as sent.
        assert v4 is not None and 4 <= v4.dropped <= 12 and v4.packets == 15
        assert v6 is not None and 4 <= v6.dropped <= 12 and v6.packets == 15
    finally:
        rx.close()
        rx6.close()


def test_leak_guard_fail_closed_drops_unmarked_and_fail_open_counts(link: Link,
                                                                   datapath: TcDatapath) -> None:
    dp = datapath
    dp.load()
    dp.set_selectors(_selectors(link))
    dp.attach()
    dp.set_mode(m.Mode.FAIL_CLOSED)
    warm_up(link)

    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    rx_other = Receiver(link.peer_ns, link.peer_ip, 6000)
    try:
        send(link.robot_ns, link.peer_ip, 5000, [500] * 40)                 # no shaper mark
        assert rx.drain() == []
        send(link.robot_ns, link.peer_ip, 5000, [500] * 25, mark=MARK)      # "released by the shaper"
        assert len(rx.drain()) == 25
        send(link.robot_ns, link.peer_ip, 6000, [500] * 10)                 # unprotected: passes
        assert len(rx_other.drain()) == 10

        st = dp.stats()
        sel = st.selector(1, m.Direction.EGRESS)
        assert sel is not None
        assert (sel.dropped, sel.unshaped, sel.packets) == (40, 40, 25)
        assert st.counter(m.Direction.EGRESS, m.GlobalCounter.DROPPED) == 40

        dp.set_mode(m.Mode.FAIL_OPEN)
        send(link.robot_ns, link.peer_ip, 5000, [500] * 30)
        assert len(rx.drain()) == 30
        st = dp.stats()
        sel = st.selector(1, m.Direction.EGRESS)
        assert sel is not None
        assert (sel.dropped, sel.unshaped, sel.packets) == (40, 70, 55)
        assert st.counter(m.Direction.EGRESS, m.GlobalCounter.UNSHAPED) == 70
    finally:
        rx.close()
        rx_other.close()


def _tc_show(link: Link) -> str:
    out = [link.robot("tc", "qdisc", "show", "dev", link.robot_if).stdout]
    for hook in ("ingress", "egress"):
        out.append(link.robot("tc", "filter", "show", "dev", link.robot_if, hook).stdout)
    return "\n".join(out)


def test_detach_removes_qdisc_filters_and_pins(link: Link, datapath: TcDatapath, pin_dir: Path) -> None:
    dp = datapath
    dp.load()
    dp.attach()
    shown = _tc_show(link)
    assert "clsact" in shown and "tensorguard:tg_egress" in shown and "tensorguard:tg_ingress" in shown
    assert sorted(p.name for p in pin_dir.iterdir()) == sorted(
        ["tg_config", "tg_selectors", "tg_sel_stats", "tg_flows", "tg_global"])
    dp.detach()
    shown = _tc_show(link)
    assert "clsact" not in shown and "tensorguard" not in shown and "bpf" not in shown
    assert not pin_dir.exists()
    dp.detach()  # idempotent


def test_detach_keeps_a_foreign_clsact_and_its_filters(link: Link, datapath: TcDatapath) -> None:
    link.robot("tc", "qdisc", "add", "dev", link.robot_if, "clsact")
    # A classic-BPF filter ("return 0": no verdict): needs only cls_bpf, like ours.
    link.robot("tc", "filter", "add", "dev", link.robot_if, "ingress", "prio", "7", "bpf",
               "bytecode", "1,6 0 0 0")
    dp = datapath
    dp.load()
    dp.attach()
    assert "tensorguard:tg_ingress" in _tc_show(link)
    dp.detach()
    shown = _tc_show(link)
    assert "clsact" in shown and "bytecode '1,6 0 0 0'" in shown and "tensorguard" not in shown


CRASH_SCRIPT = textwrap.dedent("""
    import ipaddress, os, sys
    from tensorguard.netguard.kernel import bpf_maps as m
    from tensorguard.netguard.kernel.tc import TcDatapath
    ifname, ns, pins, obj, peer = sys.argv[1:6]
    dp = TcDatapath(ifname, ns, pins, obj)
    dp.load()
    dp.set_selectors([m.Selector(1, ipaddress.ip_network(peer + "/32"), "udp", 5000, 5000)])
    dp.attach()
    dp.set_mode(m.Mode.FAIL_CLOSED)
    print("attached", flush=True)
    os.kill(os.getpid(), 9)   # crash: nothing is detached
""")


def test_cleanup_stale_after_a_crash(link: Link, pin_dir: Path, bpf_object: Path) -> None:
    res = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, link.robot_if, link.robot_ns,
                          str(pin_dir), str(bpf_object), link.peer_ip],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == -9 and "attached" in res.stdout, res.stderr
    # The kernel keeps enforcing the policy of the dead agent (fail-closed drops).
    assert "tensorguard:tg_egress" in _tc_show(link)
    assert (pin_dir / "tg_selectors").exists()
    warm_up(link)
    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    try:
        send(link.robot_ns, link.peer_ip, 5000, [100] * 5)
        assert rx.drain() == []

        # A new run refuses to start on top of the leftovers, then cleans them up and resumes.
        dp = TcDatapath(link.robot_if, link.robot_ns, pin_dir, bpf_object)
        with pytest.raises(Exception, match="cleanup_stale"):
            dp.load()
        report = cleanup_stale(pin_dir, [link.robot_if, "tg-absent0"], netns=link.robot_ns)
        assert sorted(report.filters) == [f"{link.robot_if}:tensorguard:tg_egress",
                                          f"{link.robot_if}:tensorguard:tg_ingress"]
        assert report.qdiscs == [f"{link.robot_if}:clsact"]
        assert len(report.pins) == 5
        shown = _tc_show(link)
        assert "clsact" not in shown and "tensorguard" not in shown
        assert not pin_dir.exists()
        send(link.robot_ns, link.peer_ip, 5000, [100] * 5)
        assert len(rx.drain()) == 5
        assert cleanup_stale(pin_dir, [link.robot_if], netns=link.robot_ns).empty

        try:
            dp.load()
            dp.attach()
            assert "tensorguard:tg_egress" in _tc_show(link)
        finally:
            dp.detach()
    finally:
        rx.close()
        cleanup_stale(pin_dir, [link.robot_if], netns=link.robot_ns)


def test_mismatched_abi_is_refused_before_any_kernel_change(link: Link, pin_dir: Path,
                                                            bpf_object: Path) -> None:
    # Same object, a loader expecting another version.
    dp = TcDatapath(link.robot_if, link.robot_ns, pin_dir, bpf_object, expected_abi=m.ABI_VERSION + 1)
    with pytest.raises(AbiMismatch, match=f"ABI version {m.ABI_VERSION}, this agent expects"):
        dp.load()
    # An object built with another TG_ABI_VERSION.
    if not MISMATCH_OBJECT.exists():
        if shutil.which(os.environ.get("CLANG", "clang")) is None:
            pytest.skip("no clang to build the mismatched test object")
        subprocess.run(["make", "-C", str(BPF_DIR), "test-objects"], check=True, capture_output=True,
                       timeout=300)
    dp = TcDatapath(link.robot_if, link.robot_ns, pin_dir, MISMATCH_OBJECT)
    with pytest.raises(AbiMismatch, match=r"ABI version 32767, this agent expects"):
        dp.load()
    assert not dp.loaded
    assert not pin_dir.exists()
    assert "clsact" not in _tc_show(link)


def test_unknown_interface_or_namespace_is_refused(link: Link, pin_dir: Path,
                                                   bpf_object: Path) -> None:
    with pytest.raises(DatapathError, match="unknown interface 'tg-nope0'"):
        TcDatapath("tg-nope0", link.robot_ns, pin_dir, bpf_object).load()
    with pytest.raises(DatapathError, match="does not exist"):
        TcDatapath(link.robot_if, "tg-no-such-ns", pin_dir, bpf_object).load()
    assert not pin_dir.exists()
    assert not Path("/run/netns/tg-no-such-ns").exists()


def test_selector_swap_keeps_stats_of_kept_selectors_and_drops_removed(link: Link,
                                                                      datapath: TcDatapath) -> None:
    dp = datapath
    dp.load()
    sels = _selectors(link)
    dp.set_selectors(sels)
    dp.attach()
    warm_up(link)
    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    try:
        send(link.robot_ns, link.peer_ip, 5000, [64] * 7)
        assert len(rx.drain()) == 7
        # Keep selector 1, drop 2, add 3 (a wider prefix with another port).
        new = [sels[0], m.Selector(3, ipaddress.ip_network(f"{link.peer_ip}/24", strict=False),
                                   "udp", 7000, 7000)]
        dp.set_selectors(new)
        with pytest.raises(ValueError, match="empty"):
            dp.set_selectors([m.Selector.parse(9, "10.0.0.0/8", "udp", "9-1")])
        st = dp.stats()
        ids = {(s.selector_id, s.direction) for s in st.selectors}
        assert ids == {(1, m.Direction.EGRESS), (1, m.Direction.INGRESS),
                       (3, m.Direction.EGRESS), (3, m.Direction.INGRESS)}
        kept = st.selector(1, m.Direction.EGRESS)
        assert kept is not None and kept.packets == 7
        send(link.robot_ns, link.peer_ip, 5000, [64] * 3)
        assert len(rx.drain()) == 3
        st = dp.stats()
        kept = st.selector(1, m.Direction.EGRESS)
        assert kept is not None and kept.packets == 10
    finally:
        rx.close()


CGROUP_SENDER = textwrap.dedent("""
    import socket, sys
    from tensorguard.netguard.kernel.tc import in_netns
    procs, ns, dst, port, count = sys.argv[1:6]
    with open(procs, "w") as f:          # join the cgroup before the socket exists
        f.write("0")
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(count)):
        s.sendto(b"c" * 100, (dst, int(port)))
""")


@pytest.fixture
def cgroup_dir() -> Iterator[Path]:
    root = next((Path(r) for r in CGROUP2_MOUNTS if is_cgroup2(Path(r))), None)
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    path = root / f"tg-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):  # bounded: the sender has exited, the cgroup empties at once
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_cgroup_scoped_selector_guards_only_that_cgroups_traffic(link: Link, datapath: TcDatapath,
                                                                  cgroup_dir: Path) -> None:
    dp = datapath
    dp.load()
    cg_id, cg_level = cgroup_ref(cgroup_dir)
    dp.set_selectors([m.Selector(1, ipaddress.ip_network(f"{link.peer_ip}/32"), "udp", 5000, 5000,
                                 cgroup_id=cg_id, cgroup_level=cg_level)])
    dp.attach()
    dp.set_mode(m.Mode.FAIL_CLOSED)
    warm_up(link)
    rx = Receiver(link.peer_ns, link.peer_ip, 5000)
    try:
        res = subprocess.run([sys.executable, "-c", CGROUP_SENDER, str(cgroup_dir / "cgroup.procs"),
                              link.robot_ns, link.peer_ip, "5000", "12"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert rx.drain() == []                                   # the unit's traffic: guarded
        send(link.robot_ns, link.peer_ip, 5000, [100] * 8)        # another sender: not protected
        assert len(rx.drain()) == 8
        sel = dp.stats().selector(1, m.Direction.EGRESS)
        assert sel is not None and sel.dropped == 12 and sel.packets == 0
    finally:
        rx.close()
    with pytest.raises(DatapathError, match="does not exist"):
        cgroup_ref(cgroup_dir / "absent")
    with pytest.raises(DatapathError, match="not inside a cgroup v2"):
        cgroup_ref("/tmp")
