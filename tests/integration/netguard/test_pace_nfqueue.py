"""NFQUEUE pace mode end to end: rules in the robot namespace, the pacer in a thread, capture in the peer.

Root only (namespaces, iptables, NFQUEUE). Everything happens inside the two namespaces made by
`tests.netns.veth_pair`, which deletes them (with their netfilter tables and queues) afterwards.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tensorguard.netguard.kernel import iptables as ipt
from tensorguard.netguard.kernel.iptables import FailMode, Ruleset, Selector
from tensorguard.netguard.pacer import NfqueuePacer
from tensorguard.netguard.shaping.base import Action, Direction, Dummy, Release
from tests.netns import Link, require_root_netns, veth_pair

pytestmark = pytest.mark.root

PROTECTED = 5000
UNPROTECTED = 5001
QUEUE = 3
RATE = 200.0


def setup_module() -> None:
    require_root_netns()
    if shutil.which("iptables-restore") is None:
        pytest.skip("needs iptables (iptables-nft) for the pace-mode rules")


class ConstantRate:
    """Minimal CBR for this test: slots every 1/rate s on a grid from t0, at most one packet each."""

    def __init__(self, rate: float, t0: float) -> None:
        self.period = 1.0 / rate
        self.t0 = t0
        self.last_slot = -1

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        slot = max(self.last_slot + 1, math.ceil((now - self.t0) / self.period))
        self.last_slot = slot
        return [Release(packet_id, self.t0 + slot * self.period)]

    def on_timer(self, now: float) -> list[Action]:
        return []

    def next_wakeup(self) -> float | None:
        return None


class Immediate(ConstantRate):
    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        return [Release(packet_id, now)]


CAPTURE = r"""
import json, socket, struct, sys, time
iface, ports, count, timeout = sys.argv[1], {int(p) for p in sys.argv[2].split(",")}, int(sys.argv[3]), float(sys.argv[4])
SO_TIMESTAMPNS = 35
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.bind((iface, 0))
s.settimeout(0.1)
print("ready", flush=True)
out = []
deadline = time.monotonic() + timeout
while time.monotonic() < deadline and len(out) < count:
    try:
        data, anc, _, addr = s.recvmsg(256, 256)
    except TimeoutError:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    ether = struct.unpack("!H", data[12:14])[0]
    if ether == 0x0800:
        proto, l4, iplen = data[23], 14 + (data[14] & 15) * 4, struct.unpack("!H", data[16:18])[0]
    elif ether == 0x86DD:
        proto, l4, iplen = data[20], 54, 40 + struct.unpack("!H", data[18:20])[0]
    else:
        continue
    if proto != 17:
        continue
    dport = struct.unpack("!H", data[l4 + 2:l4 + 4])[0]
    if dport not in ports:
        continue
    ts = None
    for level, kind, val in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", val[:16])
            ts = sec + nsec * 1e-9
    out.append([dport, ts, ether == 0x86DD, iplen])
print(json.dumps(out), flush=True)
"""

SEND = r"""
import socket, sys, time
dst, n, ports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
duration = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
socks = []
for _ in ports:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE: held packets count against it
    socks.append(s)
payload = b"x" * 100
sent = 0
start = time.monotonic()
if duration:
    while time.monotonic() - start < duration:
        for _ in range(50):
            socks[0].sendto(payload, (dst, ports[0]))
        sent += 50
        if rate:  # paced: batches of 50 on schedule
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
else:
    for _ in range(n):
        for s, p in zip(socks, ports):
            s.sendto(payload, (dst, p))
        sent += 1
print(sent, time.monotonic() - start, flush=True)
"""


@contextmanager
def capture(link: Link, ports: list[int], count: int, timeout: float) -> Iterator[list[list[object]]]:
    """Capture matching UDP packets in the peer namespace; the list is filled when the block ends."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", link.peer_ns, sys.executable, "-c", CAPTURE, link.peer_if,
         ",".join(map(str, ports)), str(count), str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result: list[list[object]] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield result
        out, err = proc.communicate(timeout=timeout + 10)
        assert proc.returncode == 0, err
        result.extend(json.loads(out))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def send(link: Link, dst: str, n: int, ports: list[int], duration: float = 0.0,
         rate: float = 0.0) -> tuple[int, float]:
    out = link.robot(sys.executable, "-c", SEND, dst, str(n), ",".join(map(str, ports)), str(duration),
                     str(rate), timeout=60).stdout.split()
    return int(out[0]), float(out[1])


def ruleset(link: Link, fail_mode: FailMode = FailMode.OPEN) -> Ruleset:
    return Ruleset((Selector.parse("cmd4", f"{link.peer_ip}/32", protocol="udp", ports=PROTECTED),
                    Selector.parse("cmd6", f"{link.peer_ip6}/128", protocol="udp", ports=PROTECTED)),
                   queue_num=QUEUE, fail_mode=fail_mode)


def queues_bound(link: Link) -> list[str]:
    proc = link.robot("cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
    return [line for line in proc.stdout.splitlines() if line.split() and line.split()[0] == str(QUEUE)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def grid_deviation(times: list[float], period: float) -> tuple[list[float], list[float]]:
    """(inter-arrival deviations from a multiple of the period, per-packet distance to the grid).

    One late packet spoils two inter-arrival gaps but only its own grid phase; the grid is
    anchored at the median phase of all packets.
    """
    gaps = [b - a for a, b in itertools.pairwise(times)]
    gap_dev = [abs(g - round(g / period) * period) for g in gaps]

    def wrap(x: float) -> float:
        return (x + period / 2) % period - period / 2

    phases = [wrap(t - times[0]) for t in times]
    anchor = statistics.median(phases)
    return gap_dev, [abs(wrap(p - anchor)) for p in phases]


def make_pacer(machine: ConstantRate, link: Link, **kw: Any) -> NfqueuePacer:
    return NfqueuePacer(machine, QUEUE, netns=link.robot_ns, **kw)


TIMING_ATTEMPTS = 3


def within_timing_bound(measure: Callable[[], tuple[bool, str]]) -> None:
    """Retry a measurement whose timing bound was missed (a 2-core machine shared with the test
    run has rare scheduling outliers); every attempt's correctness assertions stay strict."""
    reports = []
    for _ in range(TIMING_ATTEMPTS):
        ok, report = measure()
        print(report)
        reports.append(report)
        if ok:
            return
    pytest.fail(f"timing bound missed in {TIMING_ATTEMPTS} attempts:\n" + "\n".join(reports))


@pytest.mark.parametrize("rt", [None, 10], ids=["normal-thread", "sched-fifo"])
def test_constant_rate_on_grid_unprotected_untouched(rt: int | None) -> None:
    within_timing_bound(lambda: constant_rate_run(rt))


def constant_rate_run(rt: int | None) -> tuple[bool, str]:
    n = 200
    with veth_pair(31) as link:
        ipt.apply(ruleset(link), link.robot_ns)
        pacer = make_pacer(ConstantRate(RATE, time.monotonic()), link, realtime_priority=rt)
        pacer.start()
        try:
            assert queues_bound(link), "queue not bound"
            with capture(link, [PROTECTED, UNPROTECTED], 2 * n, timeout=n / RATE + 5) as got:
                sent, took = send(link, link.peer_ip, n, [PROTECTED, UNPROTECTED])
            assert sent == n
        finally:
            pacer.stop()
        stats = pacer.stats
        assert pacer.error is None
        assert not queues_bound(link), "pacer shutdown left the queue bound"
        ipt.remove(link.robot_ns)

    prot = sorted(float(ts) for port, ts, *_ in got if port == PROTECTED)  # type: ignore[arg-type]
    unprot = sorted(float(ts) for port, ts, *_ in got if port == UNPROTECTED)  # type: ignore[arg-type]
    period = 1.0 / RATE
    slots = [round((b - a) / period) for a, b in itertools.pairwise(prot)]
    dev, phase = grid_deviation(prot, period)
    mean_dev, p99_dev = statistics.fmean(dev), percentile(dev, 0.99)
    phase_p99 = percentile(phase, 0.99)
    report = (f"\npace grid {RATE:.0f} Hz ({'SCHED_FIFO' if rt else 'normal'} thread): {len(prot)}/{n} protected, {len(unprot)}/{n} unprotected; "
          f"sender took {took * 1e3:.1f} ms; inter-arrival deviation from the {period * 1e3:.0f} ms grid: "
          f"mean {mean_dev * 1e6:.1f} us, p99 {p99_dev * 1e6:.1f} us, max {max(dev) * 1e6:.1f} us; "
          f"per-packet distance to the grid: mean {statistics.fmean(phase) * 1e6:.1f} us, "
          f"p99 {phase_p99 * 1e6:.1f} us; "
          f"pacer max lateness {stats.max_lateness * 1e6:.1f} us, max hold {stats.max_queue_delay * 1e3:.1f} ms")
    assert len(prot) == n, "protected packets lost below capacity"
    assert len(unprot) == n, "unprotected packets lost"
    assert stats.released == n and stats.held == 0 and stats.forced == 0
    # Unprotected traffic is not held by slots: it all arrives while the sender runs, before
    # almost all protected packets (which take n / RATE = 1 s to drain).
    assert unprot[-1] - unprot[0] < 0.1
    assert sum(t > unprot[-1] for t in prot) >= 0.9 * n
    # Bounds on the bulk of the packets, not the tail: on this shared 2-core virtual machine the
    # whole VM is sometimes descheduled for tens of ms (seen: 48 ms of pacer lateness even under
    # SCHED_FIFO), which delays the ~10 packets of that window whatever the pacer does. The p99
    # figures are printed above.
    if rt is not None:
        # SCHED_FIFO: 90 % of the packets within 1 ms of their slot, slots not shared.
        timing_ok = sum(k == 0 for k in slots) <= 2 and percentile(phase, 0.90) < 0.001
    else:
        # A normal thread also waits behind other tasks: the median deviation is bounded.
        timing_ok = statistics.median(dev) < 0.0005
    return timing_ok, report


def test_fail_open_and_fail_closed_without_pacer() -> None:
    n = 20
    with veth_pair(32) as link:
        ipt.apply(ruleset(link, FailMode.OPEN), link.robot_ns)
        assert not queues_bound(link)
        for dst in (link.peer_ip, link.peer_ip6):
            with capture(link, [PROTECTED], n, timeout=3) as got:
                send(link, dst, n, [PROTECTED])
            assert len(got) == n, f"fail-open: {len(got)}/{n} protected packets to {dst} passed"

        # re-apply fail-closed: one atomic swap, the jump stays single
        ipt.apply(ruleset(link, FailMode.CLOSED), link.robot_ns)
        ours = ipt.list_ours(link.robot_ns)
        assert ours[4].jumps == 1 and ours[6].jumps == 1
        assert any("--queue-bypass" not in r and "NFQUEUE" in r
                   for r in ours[4].chains["TENSORGUARD-PROTECT"])
        for dst in (link.peer_ip, link.peer_ip6):
            with capture(link, [PROTECTED, UNPROTECTED], 2 * n, timeout=1.5) as got:
                send(link, dst, n, [PROTECTED, UNPROTECTED])
            assert [p for p, *_ in got].count(PROTECTED) == 0, "fail-closed let protected packets through"
            assert [p for p, *_ in got].count(UNPROTECTED) == n

        ipt.remove(link.robot_ns)
        ipt.remove(link.robot_ns)  # idempotent
        for tool in ("iptables-save", "ip6tables-save"):
            saved = link.robot(tool).stdout
            assert "TENSORGUARD" not in saved, saved
        with capture(link, [PROTECTED], n, timeout=3) as got:
            send(link, link.peer_ip, n, [PROTECTED])
        assert len(got) == n


def test_unappliable_ruleset_refused_and_nothing_changes() -> None:
    with veth_pair(33) as link:
        ipt.apply(ruleset(link), link.robot_ns)
        before = ipt.list_ours(link.robot_ns)
        # syntactically fine, but the kernel rejects a cgroup path that does not exist
        bad = Ruleset((Selector.parse("ghost", f"{link.peer_ip}/32", unit="tg-no-such-unit.service"),),
                      queue_num=QUEUE)
        with pytest.raises(ipt.IptablesError, match="iptables-restore"):
            ipt.apply(bad, link.robot_ns)
        assert ipt.list_ours(link.robot_ns) == before
        # IPv4 commits, the kernel rejects IPv6: IPv4 is rolled back to what it was
        half = Ruleset((Selector.parse("fine4", f"{link.peer_ip}/32"),
                        Selector.parse("ghost6", f"{link.peer_ip6}/128", unit="tg-no-such-unit.service")),
                       queue_num=QUEUE + 1)
        with pytest.raises(ipt.IptablesError, match="ip6tables-restore"):
            ipt.apply(half, link.robot_ns)
        assert ipt.list_ours(link.robot_ns) == before
        ipt.remove(link.robot_ns)
        with pytest.raises(ipt.IptablesError, match="ip6tables-restore"):
            ipt.apply(half, link.robot_ns)
        assert all(state.empty for state in ipt.list_ours(link.robot_ns).values())
        # only-IPv4 rule set: our IPv6 chains are removed, IPv4 ones replaced
        v4 = Ruleset((Selector.parse("only4", f"{link.peer_ip}/32", protocol="udp", ports=PROTECTED),),
                     queue_num=QUEUE)
        ipt.apply(v4, link.robot_ns)
        after = ipt.list_ours(link.robot_ns)
        assert after[6].empty and after[4].jumps == 1
        assert any("tg:only4" in r for r in after[4].chains["TENSORGUARD-OUTPUT"])


def kernel_drops(link: Link) -> tuple[int, int]:
    """(queue full, netlink delivery failed) drop counters of our queue, from /proc."""
    fields = next(iter(queues_bound(link)), "").split()
    return (int(fields[5]), int(fields[6])) if len(fields) > 6 else (0, 0)


def test_pacer_throughput_immediate_release() -> None:
    """Capacity: flood the pace path (machine releases at once); then offer 80% of it, and
    min(30,000, 50%) pkt/s: the latter must pass without loss. Figures are printed."""
    duration = 1.5
    with veth_pair(34) as link:
        base_sent, base_took = send(link, link.peer_ip, 0, [PROTECTED], duration=duration)
        ipt.apply(ruleset(link), link.robot_ns)
        pacer = make_pacer(Immediate(1.0, 0.0), link)
        pacer.start()
        runs: list[tuple[float, int, float, int, tuple[int, int]]] = []
        try:
            sent, took = send(link, link.peer_ip, 0, [PROTECTED], duration=duration)
            time.sleep(0.2)
            flood = pacer.stats.released
            capacity = flood / took
            flood_drops = kernel_drops(link)
            for offered in (0.8 * capacity, min(30_000.0, 0.5 * capacity)):
                before, drops = pacer.stats.released, kernel_drops(link)
                n, t = send(link, link.peer_ip, 0, [PROTECTED], duration=duration, rate=offered)
                deadline = time.monotonic() + 5
                while pacer.stats.released - before < n and time.monotonic() < deadline:
                    time.sleep(0.05)
                after = kernel_drops(link)
                runs.append((n / t, n, t, pacer.stats.released - before,
                             (after[0] - drops[0], after[1] - drops[1])))
        finally:
            pacer.stop()
        stats = pacer.stats
    print(f"\npace path, immediate release, one pacer thread: flood {sent / took:,.0f} pkt/s offered, "
          f"{flood} passed in {took:.2f} s = capacity {capacity:,.0f} pkt/s (kernel drops queue-full/"
          f"netlink {flood_drops}); sender alone without rules: {base_sent / base_took:,.0f} pkt/s; "
          f"mean hold {stats.mean_queue_delay * 1e6:.0f} us")
    for rate, n, _, passed, drops in runs:
        print(f"  offered {rate:,.0f} pkt/s: {passed}/{n} passed, kernel drops queue-full/netlink {drops}")
    assert pacer.error is None
    assert stats.held == 0
    rate, n, _, passed, _ = runs[-1]
    assert passed == n, f"loss at {rate:,.0f} pkt/s: {n - passed} of {n}"


class DummiesAndDelay:
    """Holds each real packet 20 ms; a timer every 10 ms sends one 300-byte outbound dummy
    (and one inbound one, which single-ended mode must skip), ``count`` times."""

    def __init__(self, t0: float, count: int) -> None:
        self.wake: float | None = t0 + 0.010
        self.left = count

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        return [Release(packet_id, now + 0.020)]

    def on_timer(self, now: float) -> list[Action]:
        assert self.wake is not None
        at = self.wake
        self.left -= 1
        self.wake = at + 0.010 if self.left else None
        return [Dummy(300, at, Direction.OUT), Dummy(300, at, Direction.IN)]

    def next_wakeup(self) -> float | None:
        return self.wake


def test_dummies_and_shaper_mark() -> None:
    """Dummies reach the discard port with the asked-for IP size and are not queued again (the
    discard port is itself protected); released packets carry the shaper mark downstream."""
    n_dummies, n_real, discard = 20, 10, 9
    with veth_pair(35) as link:
        rs = Ruleset((Selector.parse("cmd", f"{link.peer_ip}/32", protocol="udp", ports=PROTECTED),
                      Selector.parse("discard", f"{link.peer_ip}/32", protocol="udp", ports=discard)),
                     queue_num=QUEUE)
        ipt.apply(rs, link.robot_ns)
        # a counting rule after ours (filter runs after mangle): marked packets per port
        link.robot("iptables", "-t", "filter", "-A", "OUTPUT", "-p", "udp", "-m", "mark", "--mark",
                   f"{rs.mark:#x}/{rs.mask:#x}", "-m", "udp", "--dport", str(PROTECTED))
        with capture(link, [PROTECTED, discard], n_dummies + n_real, timeout=5) as got:
            pacer = make_pacer(DummiesAndDelay(time.monotonic(), n_dummies), link,
                               discard=(link.peer_ip, discard))
            pacer.start()
            try:
                send(link, link.peer_ip, n_real, [PROTECTED])
                deadline = time.monotonic() + 3
                while pacer.stats.dummies < n_dummies and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                pacer.stop()
        counted = link.robot("iptables", "-t", "filter", "-L", "OUTPUT", "-v", "-x", "-n").stdout
        stats = pacer.stats
    marked = int(next(line for line in counted.splitlines() if "mark match" in line).split()[0])
    ports = [p for p, *_ in got]
    print(f"\ndummies: {ports.count(discard)}/{n_dummies} arrived, skipped inbound "
          f"{stats.dummies_skipped}; real {ports.count(PROTECTED)}/{n_real}, marked downstream {marked}")
    assert stats.dummies_failed == 0
    assert ports.count(discard) == n_dummies
    assert {size for p, _, _, size in got if p == discard} == {300}, "dummy IP size differs from the machine's"
    assert ports.count(PROTECTED) == n_real
    assert stats.received == n_real, "dummies were queued again: the mark rule did not skip them"
    assert (stats.dummies, stats.dummy_bytes, stats.dummies_skipped, stats.dummies_failed) == (
        n_dummies, 300 * n_dummies, n_dummies, 0)
    assert marked == n_real


def test_ipv6_paced_on_grid() -> None:
    within_timing_bound(ipv6_paced_run)


def ipv6_paced_run() -> tuple[bool, str]:
    n = 100
    with veth_pair(36) as link:
        # Resolve the peer first: while the fresh link-local address is tentative the first
        # neighbour solicitation is lost and packets queue in the neighbour table for ~1 s,
        # arriving in one burst whatever the pacer does.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            send(link, link.peer_ip6, 1, [UNPROTECTED])
            neigh = link.robot("ip", "-6", "neigh", "show", link.peer_ip6).stdout
            if "REACHABLE" in neigh or "STALE" in neigh:
                break
            time.sleep(0.05)
        ipt.apply(ruleset(link), link.robot_ns)
        pacer = make_pacer(ConstantRate(RATE, time.monotonic()), link, realtime_priority=10)
        pacer.start()
        try:
            with capture(link, [PROTECTED], n, timeout=n / RATE + 5) as got:
                send(link, link.peer_ip6, n, [PROTECTED])
        finally:
            pacer.stop()
        stats = pacer.stats
    times = sorted(float(ts) for _, ts, v6, _ in got if v6)  # type: ignore[arg-type]
    period = 1.0 / RATE
    dev, phase = grid_deviation(times, period)
    report = (f"\npace grid IPv6 {RATE:.0f} Hz (SCHED_FIFO): {len(times)}/{n}; inter-arrival deviation "
          f"mean {statistics.fmean(dev) * 1e6:.1f} us, p99 {percentile(dev, 0.99) * 1e6:.1f} us; "
          f"distance to the grid mean {statistics.fmean(phase) * 1e6:.1f} us, "
          f"p99 {percentile(phase, 0.99) * 1e6:.1f} us")
    assert len(times) == n and stats.released == n
    assert stats.released_bytes == n * (40 + 8 + 100)
    return percentile(phase, 0.90) < 0.001, report  # the bulk, as in the IPv4 test


@pytest.mark.parametrize("fail_mode", [FailMode.OPEN, FailMode.CLOSED])
def test_a_full_queue_fails_as_configured(fail_mode: FailMode) -> None:
    """The pacer holds packets (1 Hz slots) in a queue of 8: the rest find the queue full. Fail-open
    (NFQA_CFG_F_FAIL_OPEN) lets them through unshaped; fail-closed lets the kernel drop them."""
    n, maxlen = 40, 8
    closed = fail_mode == FailMode.CLOSED
    with veth_pair(34) as link:
        pacer = NfqueuePacer(ConstantRate(1.0, time.monotonic()), QUEUE, netns=link.robot_ns,
                             queue_maxlen=maxlen, fail_closed=closed, max_hold=30.0)
        pacer.start()
        try:
            assert pacer.fail_open_when_full is not closed
            ipt.apply(ruleset(link, fail_mode), link.robot_ns)
            with capture(link, [PROTECTED], n, timeout=1.5) as got:
                send(link, link.peer_ip, n, [PROTECTED])
            stats = queues_bound(link)[0].split()
            print(f"fail-{fail_mode.value}: {len(got)} of {n} passed within 1.5 s; kernel queue stats {stats}")
            # the pacer released at most a slot or two; the kernel decided the rest
            if closed:
                assert len(got) <= 2 and int(stats[5]) >= n - maxlen - 2  # queue_dropped
            else:
                assert len(got) >= n - maxlen - 2 and int(stats[5]) == 0
        finally:
            ipt.remove(link.robot_ns)
            pacer.stop()
