"""The renewal scheduler on simulated clocks: renewal window, backoff guarantees, clock faults,
restart and expiry; and the two baseline policies it is compared with."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorguard.identity.baselines import CertManagerPolicy, StepCaPolicy
from tensorguard.identity.clocks import SimulatedClocks, SystemClocks
from tensorguard.identity.renewal import Anchor, Phase, RenewalPolicy, RenewalScheduler, Validity

T0 = 1_717_200_000.0
L = 3600.0
BACKDATE = 60.0


def issue(clocks: SimulatedClocks, lifetime: float = L) -> tuple[Validity, Anchor]:
    """What the CA hands out at true time now (not_before backdated), and the robot's anchor."""
    return Validity(clocks.true - BACKDATE, clocks.true + lifetime), Anchor.take(clocks)


def scheduler(clocks: SimulatedClocks, seed: int = 1, **policy: Any) -> RenewalScheduler:
    return RenewalScheduler(RenewalPolicy(backdate_s=BACKDATE, **policy), clocks, random.Random(seed))


def loaded(seed: int = 1, wall_offset: float = 0.0, **policy: Any) -> tuple[SimulatedClocks, RenewalScheduler]:
    clocks = SimulatedClocks(T0, wall_offset=wall_offset)
    sched = scheduler(clocks, seed, **policy)
    sched.load(*issue(clocks))
    return clocks, sched


# -- policy validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"fraction": 1.0}, "fraction=1.0"),
    ({"jitter": 0.5}, "jitter=0.5"),
    ({"min_retry_s": 20.0}, "min_retry_s (20.0)"),
    ({"backoff_cap_s": 5.0}, "backoff_cap_s (5.0)"),
    ({"min_attempts_before_expiry": 0}, "min_attempts_before_expiry=0"),
])
def test_invalid_policy_names_the_setting(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match="invalid renewal policy") as info:
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


# -- renewal point ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(fraction=st.floats(0.2, 0.9), jitter_share=st.floats(0.0, 0.99), lifetime=st.floats(60, 86400 * 30),
       seed=st.integers(0, 2**32))
def test_renewal_point_is_jittered_only_earlier(fraction: float, jitter_share: float, lifetime: float,
                                                seed: int) -> None:
    jitter = fraction * jitter_share
    clocks = SimulatedClocks(T0)
    sched = scheduler(clocks, seed, fraction=fraction, jitter=jitter)
    validity, anchor = issue(clocks, lifetime)
    sched.load(validity, anchor)
    low = validity.not_before + (fraction - jitter) * validity.lifetime
    high = validity.not_before + fraction * validity.lifetime
    assert low - 1e-6 <= sched.renew_at <= high + 1e-6


def test_jitter_spreads_over_the_whole_window() -> None:
    points = []
    for seed in range(2000):
        _clocks, sched = loaded(seed)
        assert sched.validity is not None
        points.append((sched.renew_at - sched.validity.not_before) / sched.validity.lifetime)
    assert 0.4 <= min(points) < 0.405
    assert 0.495 < max(points) <= 0.5
    assert sum(p < 0.45 for p in points) == pytest.approx(1000, abs=120)


def test_not_due_before_the_renewal_point_and_due_at_it() -> None:
    clocks, sched = loaded()
    wait = sched.next_attempt_in()
    assert wait is not None and 0.4 * L < wait < 0.5 * L + BACKDATE
    assert sched.phase() is Phase.WAITING and not sched.due()
    clocks.advance(wait - 1)
    assert not sched.due()
    clocks.advance(1.001)
    assert sched.due() and sched.phase() is Phase.RENEWING


def test_sleep_is_capped_so_a_resume_is_noticed() -> None:
    clocks, sched = loaded(max_sleep_s=60.0)
    assert sched.sleep_for() == 60.0
    attempt_in = sched.next_attempt_in()
    assert attempt_in is not None
    clocks.advance(attempt_in - 10)
    assert sched.sleep_for() == pytest.approx(10)


# -- backoff --------------------------------------------------------------------------------------


POLICIES = st.builds(
    lambda base, cap_mult, floor_share, attempts: RenewalPolicy(
        backoff_base_s=base, backoff_cap_s=base * cap_mult, min_retry_s=base * floor_share,
        min_attempts_before_expiry=attempts, backdate_s=BACKDATE),
    st.floats(1, 120), st.floats(1, 100), st.floats(0.05, 1.0), st.integers(1, 12))


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, lifetime=st.floats(300, 86400), start_share=st.floats(0.0, 0.999),
       seed=st.integers(0, 2**32))
def test_enough_attempts_always_fit_before_expiry(policy: RenewalPolicy, lifetime: float,
                                                  start_share: float, seed: int) -> None:
    """Failing from any moment on, the next min_attempts_before_expiry attempts all come before
    not_after, as long as that many floor intervals still fit in the remaining time."""
    clocks = SimulatedClocks(T0)
    sched = RenewalScheduler(policy, clocks, random.Random(seed))
    validity, anchor = issue(clocks, lifetime)
    sched.load(validity, anchor)
    clocks.advance(start_share * (validity.not_after - clocks.true))
    remaining = validity.not_after - clocks.true
    if remaining <= policy.min_attempts_before_expiry * policy.min_retry_s + 0.01:
        return  # the guarantee is stated only above the floor (at it, the last attempt is at expiry)
    attempts = []
    for failure in range(1, policy.min_attempts_before_expiry + 1):
        delay = sched.failed()
        assert policy.min_retry_s <= delay <= max(policy.min_retry_s, policy.backoff_cap_s)
        assert delay <= max(policy.min_retry_s, policy.backoff_base_s * 2 ** (failure - 1))
        clocks.advance(delay)
        attempts.append(clocks.true)
        assert sched.due()
    assert max(attempts) < validity.not_after


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), outage_share=st.floats(0.0, 0.45))
def test_an_outage_of_up_to_045_lifetime_from_the_latest_renewal_point_is_survived(
        seed: int, outage_share: float) -> None:
    """The CA goes down when the first attempt is due and stays down outage_share x L: some
    retry still lands after the outage and before expiry."""
    clocks, sched = loaded(seed)
    wait = sched.next_attempt_in()
    assert wait is not None and sched.validity is not None
    clocks.advance(wait)
    outage_end = clocks.true + outage_share * sched.validity.lifetime
    while True:
        assert sched.due()
        if clocks.true >= outage_end:
            break
        clocks.advance(sched.failed())
    assert clocks.true < sched.validity.not_after


def test_backoff_grows_then_shrinks_towards_expiry() -> None:
    clocks, sched = loaded(seed=3, backoff_base_s=10.0, backoff_cap_s=300.0)
    assert sched.validity is not None
    caps = [sched.policy.backoff_cap(n, 1e9) for n in range(1, 8)]
    assert caps == [10, 20, 40, 80, 160, 300, 300]
    assert sched.policy.backoff_cap(10, 60.0) == pytest.approx(10.0)  # 60 s left / 6 attempts
    clocks.advance(sched.validity.not_after - 65 - clocks.true)
    assert sched.failed() <= max(5.0, 65 / 6)


# -- clocks ------------------------------------------------------------------------------------


def test_wall_step_is_reported_and_does_not_move_renewal() -> None:
    clocks, sched = loaded()
    before = sched.next_attempt_in()
    clocks.advance(100)
    clocks.step_wall(+600)
    assert sched.next_attempt_in() == pytest.approx(before - 100)  # type: ignore[operator]
    assert not sched.due()
    events = sched.events()
    assert [e.kind for e in events] == ["wall_step"]
    assert events[0].seconds == pytest.approx(600)
    assert "stepped by +600.0 s" in str(events[0])
    clocks.step_wall(-600)
    sched.due()
    assert [(e.kind, round(e.seconds)) for e in sched.events()] == [("wall_step", -600)]


def test_small_wall_drift_is_not_an_event() -> None:
    clocks, sched = loaded()
    clocks.step_wall(5)
    sched.due()
    assert sched.events() == []


def test_suspend_past_the_renewal_point_makes_renewal_due_on_resume() -> None:
    clocks, sched = loaded()
    wait = sched.next_attempt_in()
    assert wait is not None
    clocks.advance(60)
    clocks.suspend(wait + 300)  # monotonic stands still: an asyncio sleep would not have fired
    assert sched.due()
    events = sched.events()
    assert [e.kind for e in events] == ["suspend"]
    assert events[0].seconds == pytest.approx(wait + 300)


def test_restart_rebuilds_the_same_view_from_disk_state() -> None:
    """A new process gets only the certificate, its anchor and the clocks (same boot)."""
    clocks, first = loaded(seed=7)
    assert first.validity is not None and first.anchor is not None
    clocks.advance(1500)
    clocks.step_wall(-400)  # an NTP step while the agent was down
    second = scheduler(clocks, seed=99)
    second.load(first.validity, first.anchor)
    assert second.now_ca() == pytest.approx(first.now_ca())
    assert second.now_ca() == pytest.approx(clocks.true, abs=1.0)
    assert [e.kind for e in second.events()] == ["wall_step"]
    clocks.advance(0.5 * L - 1500 + BACKDATE)
    assert second.due()


def test_same_boot_ignores_the_wall_clock_offset() -> None:
    clocks, sched = loaded(wall_offset=-200)
    clocks.advance(1000)
    assert sched.now_ca() == pytest.approx(clocks.true)
    assert clocks.wall() == pytest.approx(clocks.true - 200)


def test_after_reboot_the_estimate_falls_back_to_the_wall_clock() -> None:
    clocks, sched = loaded(wall_offset=-200)  # the robot's clock was 200 s late at issuance
    assert sched.validity is not None and sched.anchor is not None
    clocks.advance(600)
    clocks.reboot(downtime=120)
    after = scheduler(clocks)
    after.load(sched.validity, sched.anchor)
    assert [e.kind for e in after.events()] == ["reboot"]
    # Still 200 s late: the wall time elapsed since the anchor is right, the raw wall is not.
    assert after.now_ca() == pytest.approx(clocks.true)
    assert clocks.wall() == pytest.approx(clocks.true - 200)
    # NTP fixes the clock after boot: the estimates now disagree and the earlier renewal wins.
    clocks.step_wall(+200)
    assert after.now_ca() == pytest.approx(clocks.true + 200)
    # A clock far ahead: the raw wall is the later estimate and wins.
    clocks.step_wall(+900)
    assert after.now_ca() == pytest.approx(clocks.true + 1100)


def test_without_an_anchor_the_wall_clock_is_used() -> None:
    clocks = SimulatedClocks(T0, wall_offset=-120)
    sched = scheduler(clocks)
    validity, _ = issue(clocks)
    sched.load(validity, None)
    assert sched.now_ca() == clocks.wall()


def test_expired_certificate_stops_renewal() -> None:
    clocks, sched = loaded()
    assert sched.validity is not None
    clocks.advance(sched.validity.not_after - clocks.true)
    assert sched.phase() is Phase.EXPIRED
    assert not sched.due()
    assert sched.next_attempt_in() is None
    assert sched.sleep_for() == sched.policy.max_sleep_s


def test_suspend_through_expiry_ends_in_expired_not_renewing() -> None:
    clocks, sched = loaded()
    clocks.suspend(L + 10)
    assert not sched.due() and sched.phase() is Phase.EXPIRED


def test_unenrolled_scheduler_asks_for_nothing() -> None:
    sched = scheduler(SimulatedClocks(T0))
    assert sched.phase() is Phase.UNENROLLED and not sched.due()
    with pytest.raises(RuntimeError, match="without a loaded certificate"):
        sched.failed()


def test_anchor_round_trip_and_bad_file() -> None:
    anchor = Anchor("b", 12.5, T0)
    assert Anchor.from_bytes(anchor.to_bytes(), "x") == anchor
    with pytest.raises(ValueError, match=r"/var/lib/x/anchor.json: not a renewal anchor"):
        Anchor.from_bytes(b'{"boot_id": "b"}', "/var/lib/x/anchor.json")


def test_system_clocks_are_consistent() -> None:
    clocks = SystemClocks()
    assert len(clocks.boot_id()) == 36
    assert clocks.boottime() >= clocks.monotonic() - 1e-3
    assert abs(clocks.wall() - __import__("time").time()) < 1


# -- baselines -----------------------------------------------------------------------------------


def test_step_ca_renews_at_two_thirds_and_retries_every_minute() -> None:
    clocks = SimulatedClocks(T0)
    step = StepCaPolicy(clocks)
    validity, anchor = issue(clocks)
    step.load(validity, anchor)
    assert step.next_attempt_in() == pytest.approx(validity.not_before + 2 / 3 * validity.lifetime - T0)
    clocks.advance(step.sleep_for())  # one Go-timer sleep, not capped
    assert step.due()
    assert [step.failed() for _ in range(3)] == [60.0, 60.0, 60.0]


def test_cert_manager_backs_off_from_an_hour_to_32_hours() -> None:
    clocks = SimulatedClocks(T0)
    cm = CertManagerPolicy(clocks)
    cm.load(*issue(clocks))
    assert [cm.failed() / 3600 for _ in range(8)] == [1, 2, 4, 8, 16, 32, 32, 32]


def test_baselines_follow_the_wall_clock() -> None:
    clocks = SimulatedClocks(T0)
    step = StepCaPolicy(clocks, max_sleep_s=60)
    step.load(*issue(clocks))
    before = step.next_attempt_in()
    clocks.step_wall(-600)  # the robot's clock runs 10 min late: renewal comes 10 min late
    assert step.next_attempt_in() == pytest.approx(before + 600)  # type: ignore[operator]
    assert step.sleep_for() == 60
    assert step.events() == []
