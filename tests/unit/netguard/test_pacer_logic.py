"""The pacer's pure scheduling core with a fake clock and tiny test machines (no root)."""

from __future__ import annotations

import socket

import pytest

from tensorguard.netguard.pacer import Drop, PaceScheduler, udp_payload_size
from tensorguard.netguard.shaping.base import Action, Direction, Dummy, Release


class Delay10ms:
    """Release every packet 10 ms after it arrived."""

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        return [Release(packet_id, now + 0.010)]

    def on_timer(self, now: float) -> list[Action]:
        return []

    def next_wakeup(self) -> float | None:
        return None


class PadEvery5ms:
    """Releases nothing itself; a timer every 5 ms emits an outbound and an inbound dummy."""

    def __init__(self) -> None:
        self.wake: float | None = 0.005
        self.timers: list[float] = []

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        return []

    def on_timer(self, now: float) -> list[Action]:
        self.timers.append(now)
        assert self.wake is not None
        at = self.wake
        self.wake += 0.005
        return [Dummy(100, at, Direction.OUT), Dummy(50, at, Direction.IN)]

    def next_wakeup(self) -> float | None:
        return self.wake


class Broken(Delay10ms):
    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        raise ZeroDivisionError("bug")


def test_release_after_delay_and_counters() -> None:
    s = PaceScheduler(Delay10ms())
    s.on_packet(0.000, 1, 100)
    s.on_packet(0.002, 2, 200)
    assert s.held == 2
    assert s.next_deadline() == pytest.approx(0.010)
    assert s.due(0.009) == []
    assert s.due(0.0105) == [Release(1, 0.010)]
    assert s.next_deadline() == pytest.approx(0.012)
    assert s.due(0.013) == [Release(2, 0.012)]
    st = s.stats
    assert (st.received, st.received_bytes, st.released, st.released_bytes, st.held) == (2, 300, 2, 300, 0)
    assert st.max_queue_delay == pytest.approx(0.011)
    assert st.mean_queue_delay == pytest.approx((0.0105 + 0.011) / 2)
    assert st.max_lateness == pytest.approx(0.001)
    assert s.next_deadline() is None


def test_due_in_time_order_and_unknown_release_ignored() -> None:
    s = PaceScheduler(Delay10ms())
    for i, t in enumerate([0.003, 0.001, 0.002]):
        s.on_packet(t, i, 10)
    s._push([Release(99, 0.0), Release(1, 0.0005)])  # unknown id; and a duplicate release of 1
    out = s.due(1.0)
    assert [(a.packet_id, round(a.at, 6)) for a in out if isinstance(a, Release)] == [
        (1, 0.0005), (2, 0.012), (0, 0.013)]
    assert s.stats.unknown_releases == 2  # 99, and the second release of 1
    assert s.stats.released == 3


def test_timer_dummies_and_inbound_skipped() -> None:
    m = PadEvery5ms()
    s = PaceScheduler(m)
    assert s.next_deadline() == pytest.approx(0.005)
    assert s.due(0.004) == []
    assert s.due(0.0051) == [Dummy(100, 0.005, Direction.OUT)]
    assert s.due(0.0126) == [Dummy(100, 0.010, Direction.OUT)]
    assert m.timers == [0.0051, 0.0126]
    # late: the timer is called again while it asks for times <= now, in one due()
    assert s.due(0.0201) == [Dummy(100, 0.015, Direction.OUT), Dummy(100, 0.020, Direction.OUT)]
    assert m.timers[2:] == [0.0201, 0.0201]
    st = s.stats
    assert (st.dummies, st.dummy_bytes, st.dummies_skipped) == (4, 400, 4)
    assert st.max_lateness == pytest.approx(0.0051)


def test_max_hold_safety_net_open_and_closed() -> None:
    class Never(Delay10ms):
        def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
            return []

    s = PaceScheduler(Never(), max_hold=0.5)
    s.on_packet(0.0, 1, 10)
    s.on_packet(0.1, 2, 10)
    assert s.next_deadline() == pytest.approx(0.5)
    assert s.due(0.55) == [Release(1, 0.55)]
    assert s.stats.forced == 1 and s.held == 1
    closed = PaceScheduler(Never(), max_hold=0.5, fail_closed=True)
    closed.on_packet(0.0, 1, 10)
    assert closed.due(0.6) == [Drop(1, 0.6)]
    assert (closed.stats.dropped, closed.stats.released, closed.stats.forced) == (1, 0, 1)


def test_machine_error_lets_packet_go_per_fail_mode() -> None:
    s = PaceScheduler(Broken())
    s.on_packet(1.0, 5, 10)
    assert s.due(1.0) == [Release(5, 1.0)]
    assert s.stats.machine_errors == 1
    c = PaceScheduler(Broken(), fail_closed=True)
    c.on_packet(1.0, 5, 10)
    assert c.due(1.0) == [Drop(5, 1.0)]


def test_drain_releases_or_drops_everything() -> None:
    s = PaceScheduler(Delay10ms())
    for i in range(5):
        s.on_packet(i * 0.001, i, 10)
    assert s.drain(0.002, release=True) == [0, 1, 2, 3, 4]
    assert s.held == 0 and s.next_deadline() is None and s.stats.released == 5
    d = PaceScheduler(Delay10ms())
    d.on_packet(0.0, 1, 10)
    assert d.drain(0.001, release=False) == [1]
    assert d.stats.dropped == 1 and d.stats.released == 0


def test_runaway_timer_bounded() -> None:
    class Always(Delay10ms):
        calls = 0

        def on_timer(self, now: float) -> list[Action]:
            self.calls += 1
            return []

        def next_wakeup(self) -> float | None:
            return 0.0

    m = Always()
    PaceScheduler(m).due(1.0)
    assert m.calls == 1000


def test_dummy_payload_sizes() -> None:
    assert udp_payload_size(100, socket.AF_INET) == 72
    assert udp_payload_size(100, socket.AF_INET6) == 52
    assert udp_payload_size(10, socket.AF_INET) == 0
    assert udp_payload_size(10**6, socket.AF_INET) == 65507
