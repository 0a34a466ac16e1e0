"""NFQUEUE pacer: holds protected packets and releases them on a defence machine's schedule.

Two layers, so the scheduling is tested without root:

* `PaceScheduler` (pure): held packets, a heap of timed actions, the machine's timer, a safety
  net for packets a machine never releases, and the counters. It is given ``now`` by its driver.
* `NfqueuePacer` (I/O): binds an NFQUEUE queue (`kernel.nfqueue`), feeds arriving packets to
  the scheduler, sleeps in ``select`` on the queue socket until the next due action, and executes
  actions: `Release` → verdict ACCEPT with the shaper mark set (so the rules do not queue the
  packet again and the eBPF leak guard sees it was shaped); `Dummy` → a UDP datagram to a discard
  destination from a socket with ``SO_MARK`` = shaper mark.

Single-ended pace mode sees outgoing packets only: a machine's inbound (`Direction.IN`) dummies
cannot be sent (the peer would have to send them) and are counted as ``dummies_skipped``.

Stopping: remove the iptables rules first (nothing new enters the queue), then `stop()`: every
held packet gets ACCEPT (fail-open) or DROP (fail-closed) and the queue is unbound. Packets that
reach the kernel queue between the final read and the unbind are dropped by the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .kernel.nfqueue import NETLINK_NETFILTER, NfQueue, QueuedPacket
from .shaping.base import Action, Direction, Dummy, Machine, Release

log = logging.getLogger(__name__)

Clock = Callable[[], float]

IPV4_UDP_OVERHEAD = 20 + 8
IPV6_UDP_OVERHEAD = 40 + 8
MAX_UDP_PAYLOAD = 65507
HEADER_COPY = 64
"""Bytes of each packet copied to userspace (its length comes in NFQA_CAP_LEN); not 0, which
means the whole packet."""
TIMER_ROUNDS = 1000
"""Upper bound on ``on_timer`` calls per `PaceScheduler.due` (a machine asking for "now" forever)."""


@dataclass
class PacerStats:
    received: int = 0
    received_bytes: int = 0
    released: int = 0
    released_bytes: int = 0
    forced: int = 0
    """Released (fail-open) or dropped (fail-closed) by the ``max_hold`` safety net."""
    dropped: int = 0
    """Dropped by the pacer: fail-closed shutdown, safety net or machine error."""
    dummies: int = 0
    dummy_bytes: int = 0
    dummies_skipped: int = 0
    """Inbound dummies: single-ended pace mode cannot send them."""
    dummies_failed: int = 0
    unknown_releases: int = 0
    """Release actions naming a packet that is not held (already released, or never seen)."""
    machine_errors: int = 0
    max_queue_delay: float = 0.0
    """Longest time a packet was held (seconds, arrival to verdict)."""
    total_queue_delay: float = 0.0
    max_lateness: float = 0.0
    """Longest time an action was executed after the time it asked for."""
    held: int = 0
    """Packets held right now."""

    @property
    def mean_queue_delay(self) -> float:
        done = self.released + self.dropped
        return self.total_queue_delay / done if done else 0.0


@dataclass(frozen=True)
class Drop:
    """Internal action (never from a machine): drop held packet ``packet_id`` (fail-closed)."""

    packet_id: int
    at: float


Due = Action | Drop


@dataclass(frozen=True)
class _Held:
    arrival: float
    size: int


class PaceScheduler:
    """The pacer's pure core: which packets are held and which actions are due when."""

    def __init__(self, machine: Machine, max_hold: float | None = None,
                 fail_closed: bool = False) -> None:
        """``max_hold``: a packet held that long without a Release is let go (or dropped when
        ``fail_closed``): the safety net for a machine that forgets a packet."""
        self.machine = machine
        self.max_hold = max_hold
        self.fail_closed = fail_closed
        self.stats = PacerStats()
        self._held: dict[int, _Held] = {}  # insertion order == arrival order
        self._heap: list[tuple[float, int, Due]] = []
        self._seq = itertools.count()
        self._forced: set[int] = set()

    @property
    def held(self) -> int:
        return len(self._held)

    def _push(self, actions: Sequence[Due]) -> None:
        for action in actions:
            heapq.heappush(self._heap, (action.at, next(self._seq), action))

    def on_packet(self, now: float, packet_id: int, size: int,
                  direction: Direction = Direction.OUT) -> None:
        """A packet arrived and is held until a Release for it is due."""
        self._held[packet_id] = _Held(now, size)
        self.stats.received += 1
        self.stats.received_bytes += size
        self.stats.held = len(self._held)
        try:
            actions = self.machine.on_packet(now, packet_id, size, direction)
        except Exception:
            log.exception("defence machine failed on a packet; letting it go per fail mode")
            self.stats.machine_errors += 1
            self._force(packet_id, now)
            return
        self._push(actions)

    def replace_machine(self, machine: Machine, now: float) -> None:
        """Switch defences: everything held is let go now and the old machine's plans dropped."""
        self._heap.clear()
        self._push([Release(packet_id, now) for packet_id in self._held])
        self.machine = machine

    def _force(self, packet_id: int, now: float) -> None:
        self.stats.forced += 1
        self._push([Drop(packet_id, now) if self.fail_closed else Release(packet_id, now)])

    def next_deadline(self) -> float | None:
        """Earliest of: the next action, the machine's wakeup, the oldest packet's hold limit."""
        times: list[float] = []
        if self._heap:
            times.append(self._heap[0][0])
        wake = self.machine.next_wakeup()
        if wake is not None:
            times.append(wake)
        if self.max_hold is not None and self._held:
            times.append(next(iter(self._held.values())).arrival + self.max_hold)
        return min(times) if times else None

    def due(self, now: float) -> list[Due]:
        """Actions to execute now, in time order; counters updated as if they were executed.

        Releases come back only for held packets (each once); the driver gives the verdicts.
        """
        for _ in range(TIMER_ROUNDS):
            wake = self.machine.next_wakeup()
            if wake is None or wake > now:
                break
            try:
                self._push(self.machine.on_timer(now))
            except Exception:
                log.exception("defence machine failed on a timer")
                self.stats.machine_errors += 1
                break
        if self.max_hold is not None:
            limit = now - self.max_hold
            for packet_id, held in list(self._held.items()):
                if held.arrival > limit:
                    break
                if packet_id not in self._forced:
                    self._forced.add(packet_id)
                    self._force(packet_id, now)
        out: list[Due] = []
        stats = self.stats
        while self._heap and self._heap[0][0] <= now:
            at, _, action = heapq.heappop(self._heap)
            if isinstance(action, Release | Drop):
                pkt = self._held.pop(action.packet_id, None)
                self._forced.discard(action.packet_id)
                if pkt is None:
                    stats.unknown_releases += 1
                    continue
                if isinstance(action, Drop):
                    stats.dropped += 1
                else:
                    stats.released += 1
                    stats.released_bytes += pkt.size
                delay = now - pkt.arrival
                stats.total_queue_delay += delay
                stats.max_queue_delay = max(stats.max_queue_delay, delay)
            elif action.direction is Direction.IN:
                stats.dummies_skipped += 1
                continue
            else:
                stats.dummies += 1
                stats.dummy_bytes += action.size
            stats.max_lateness = max(stats.max_lateness, now - at)
            out.append(action)
        stats.held = len(self._held)
        return out

    def drain(self, now: float, release: bool) -> list[int]:
        """Shutdown: every held packet's id (to ACCEPT if ``release`` else DROP); pending actions go."""
        ids = list(self._held)
        for held in self._held.values():
            delay = now - held.arrival
            self.stats.total_queue_delay += delay
            self.stats.max_queue_delay = max(self.stats.max_queue_delay, delay)
            if release:
                self.stats.released += 1
                self.stats.released_bytes += held.size
            else:
                self.stats.dropped += 1
        self._held.clear()
        self._heap.clear()
        self._forced.clear()
        self.stats.held = 0
        return ids


def udp_payload_size(size: int, family: int) -> int:
    """UDP payload bytes so that the IP packet is ``size`` bytes (clamped to what fits)."""
    overhead = IPV4_UDP_OVERHEAD if family == socket.AF_INET else IPV6_UDP_OVERHEAD
    return max(0, min(size - overhead, MAX_UDP_PAYLOAD))


# ---------------------------------------------------------------------------------------------
# I/O

_CLONE_NEWNET = 0x40000000
_PR_SET_TIMERSLACK = 29


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def socket_in_netns(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside network namespace ``netns`` (``ip netns`` name), or here if None.

    A socket belongs to the namespace it was created in; ``setns`` is done in a short-lived
    thread so the calling thread (and the process) stay where they are.
    """
    if netns is None:
        return socket.socket(family, kind, proto)
    result: list[socket.socket] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind, proto))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class NfqueuePacer:
    """Binds one NFQUEUE queue and paces its packets with ``machine`` in a dedicated thread."""

    def __init__(self, machine: Machine, queue_num: int, *, mark: int = 0x10000, mask: int = 0x10000,
                 discard: tuple[str, int] | None = None, fail_closed: bool = False,
                 netns: str | None = None, clock: Clock = time.monotonic,
                 max_hold: float | None = 5.0, queue_maxlen: int = 4096, batch: int = 64,
                 spin: float = 0.0002, realtime_priority: int | None = None) -> None:
        """``spin``: wake this long before a due action and busy-wait the rest (timer wakeups on a
        normal thread are 50-300 us late, with rare ms outliers under load); 0 disables it.
        ``realtime_priority``: run the pacing thread SCHED_FIFO at this priority (1-99; needs
        CAP_SYS_NICE): removes the ms outliers caused by other tasks. Refused → logged, ignored."""
        if mark == 0 or mark & ~mask:
            raise ValueError(f"mark {mark:#x} must be non-zero and inside mask {mask:#x}")
        self.queue_num = queue_num
        self.mark = mark
        self.mask = mask
        self.discard = discard
        self.fail_closed = fail_closed
        self.netns = netns
        self.clock = clock
        self.queue_maxlen = queue_maxlen
        self.batch = batch
        self.spin = spin
        self.realtime_priority = realtime_priority
        self.scheduler = PaceScheduler(machine, max_hold=max_hold, fail_closed=fail_closed)
        self._marks: dict[int, int] = {}
        """Held packets' marks as they arrived, by packet id."""
        self._queue: NfQueue | None = None
        self._dummy: socket.socket | None = None
        self._dummy_family = socket.AF_INET
        self._dummy_addr: Any = None
        self._zeros = memoryview(bytes(MAX_UDP_PAYLOAD))
        self._wake_r, self._wake_w = -1, -1
        self._stop = threading.Event()
        self._next_machine: Machine | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.fail_open_when_full = False
        """The kernel accepts packets the full queue cannot take (fail-open only)."""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the queue (errors raise here, in the caller) and start the pacing thread."""
        if self._thread is not None:
            raise RuntimeError("pacer already started")
        try:
            sock = socket_in_netns(self.netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
            self._queue = NfQueue.bind(self.queue_num, copy_range=HEADER_COPY, max_len=self.queue_maxlen,
                                       receive_buffer=2 * 1024 * 1024, sock=sock)
            if not self.fail_closed:  # a full queue (pacer behind) lets packets pass, unshaped
                try:
                    self._queue.set_fail_open()
                    self.fail_open_when_full = True
                except OSError as exc:
                    log.warning("NFQUEUE %d: %s; when the queue is full the kernel drops packets",
                                self.queue_num, exc)
            self._queue.setblocking(False)
            if self.discard is not None:
                host, port = self.discard
                info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
                self._dummy_family = info[0]
                self._dummy = socket_in_netns(self.netns, info[0], socket.SOCK_DGRAM)
                self._dummy.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
                # not connected: an ICMP "port unreachable" from a peer without a discard
                # service would otherwise fail the next send (ECONNREFUSED)
                self._dummy_addr = info[4]
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._close()
            self._close_pipe()
            raise
        self._thread = threading.Thread(target=self._run, name=f"tg-pacer-q{self.queue_num}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Release (or drop, fail-closed) every held packet and unbind the queue."""
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"pacer thread for queue {self.queue_num} did not stop")
            self._thread = None
        self._close_pipe()

    def replace_machine(self, machine: Machine) -> None:
        """Hand a new defence to the pacing thread, which switches between two packets."""
        self._next_machine = machine
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"m")

    def __enter__(self) -> NfqueuePacer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> PacerStats:
        """A snapshot of the counters (taken without stopping the pacer)."""
        return replace(self.scheduler.stats)

    # -- the pacing thread -----------------------------------------------------------------

    def _on_packet(self, packet: QueuedPacket) -> None:
        now = self.clock()
        self._marks[packet.packet_id] = packet.mark
        self.scheduler.on_packet(now, packet.packet_id, packet.length, Direction.OUT)

    def _verdict(self, packet_id: int, accept: bool) -> tuple[int, bool, int] | None:
        mark = self._marks.pop(packet_id, None)
        if mark is None:
            return None
        return packet_id, accept, (mark & ~self.mask) | self.mark if accept else mark

    def _give(self, verdicts: list[tuple[int, bool, int]]) -> None:
        if not verdicts or self._queue is None:
            return
        try:
            self._queue.verdicts(verdicts)
        except OSError as exc:  # queue gone: the kernel has dropped them
            log.warning("verdicts for %d packets failed: %s", len(verdicts), exc)

    def _execute(self, actions: list[Due]) -> None:
        verdicts = []
        for action in actions:
            if isinstance(action, Release | Drop):
                verdict = self._verdict(action.packet_id, isinstance(action, Release))
                if verdict is not None:
                    verdicts.append(verdict)
            else:
                self._give(verdicts)  # in order: a dummy scheduled after a release follows it
                verdicts = []
                self._send_dummy(action)
        self._give(verdicts)

    def _read(self, count: int, until: float) -> None:
        """Take up to ``count`` datagrams from the queue, stopping early once ``until`` has come
        (so reading a burst never delays a due release by more than one packet)."""
        assert self._queue is not None
        for _ in range(count):
            packets = self._queue.receive()
            if packets is None:
                return
            for packet in packets:
                self._on_packet(packet)
            if self.clock() >= until:
                return

    def _send_dummy(self, action: Dummy) -> None:
        if self._dummy is None:
            self.scheduler.stats.dummies_failed += 1
            return
        n = udp_payload_size(action.size, self._dummy_family)
        try:
            self._dummy.sendto(self._zeros[:n], socket.MSG_DONTWAIT, self._dummy_addr)
        except OSError:
            self.scheduler.stats.dummies_failed += 1

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            _libc().prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)  # 1 ns slack: wake on time
        if self.realtime_priority is not None:
            try:  # pid 0 = the calling thread only
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.realtime_priority))
            except OSError as exc:
                log.warning("pacer: SCHED_FIFO %d refused (%s); timing will be less precise",
                            self.realtime_priority, exc)
        assert self._queue is not None
        queue_fd = self._queue.fileno()
        fds = [queue_fd, self._wake_r]
        sched = self.scheduler
        clock = self.clock
        try:
            while not self._stop.is_set():
                now = clock()
                if self._next_machine is not None:
                    sched.replace_machine(self._next_machine, now)
                    self._next_machine = None
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                actions = sched.due(now)
                if actions:
                    self._execute(actions)
                deadline = sched.next_deadline()
                timeout: float | None = None
                if deadline is not None:
                    timeout = deadline - clock() - self.spin
                    if timeout <= 0:
                        while clock() < deadline:  # the last `spin` seconds: busy-wait
                            pass
                        continue
                ready, _, _ = select.select(fds, [], [], timeout)
                if queue_fd in ready:
                    self._read(self.batch, math.inf if deadline is None else deadline - self.spin)
        except BaseException as exc:
            self.error = exc
            log.exception("pacer for queue %d failed", self.queue_num)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._read(1_000_000, math.inf)  # take what is already queued, to give it a verdict
        release = not self.fail_closed
        verdicts = [self._verdict(packet_id, release)
                    for packet_id in self.scheduler.drain(self.clock(), release)]
        self._give([v for v in verdicts if v is not None])
        self._marks.clear()
        self._close()

    def _close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        if self._dummy is not None:
            self._dummy.close()
        self._dummy = None

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
