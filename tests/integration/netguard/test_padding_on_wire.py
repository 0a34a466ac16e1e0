"""FRONT and WTF-PAD through the live datapath: the padding captured on the peer's wire follows the
machine's parameters (fixed seeds; goodness-of-fit tests)."""

from __future__ import annotations

import itertools
import json
import math
import random
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorguard.config.schema import NetworkSettings
from tensorguard.netguard.datapath import Datapath
from tensorguard.netguard.shaping.base import Direction
from tensorguard.netguard.shaping.front import FrontMachine
from tensorguard.netguard.shaping.wtfpad import WtfPadMachine

from ...netns import Link, require_root_netns, veth_pair
from .test_netguard_unit import setup_module as _datapath_prerequisites
from .test_pace_nfqueue import capture, send

PROTECTED, DISCARD = 5400, 9
BPFFS = Path("/sys/fs/bpf")


def setup_module() -> None:
    require_root_netns()
    _datapath_prerequisites()


def settings(link: Link, defence: dict[str, Any]) -> NetworkSettings:
    return NetworkSettings.model_validate({
        "enabled": True, "interfaces": [link.robot_if], "netns": link.robot_ns, "fail_mode": "open",
        "protect": [{"name": "cmd", "destination": f"{link.peer_ip}/32", "protocol": "udp",
                     "ports": str(PROTECTED)}],
        "defence": {"max_padding_fraction": 0.95, "dummy_size": 100, "max_added_delay_ms": 100,
                    "discard": f"{link.peer_ip}:{DISCARD}", **defence},
    })


@pytest.fixture
def pin_root() -> Iterator[Path]:
    path = BPFFS / f"tensorguard-test-{secrets.token_hex(3)}"
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def run_defence(link: Link, pin_root: Path, defence: dict[str, Any], seed: int, real: int,
                seconds: float) -> tuple[list[float], list[float], Any]:
    """Send ``real`` protected packets, capture for ``seconds``; (real times, dummy times, machine)."""
    datapath = Datapath(settings(link, defence), netns=link.robot_ns, pin_root=pin_root,
                        rng=random.Random(seed))
    datapath.start()
    try:
        with capture(link, [PROTECTED, DISCARD], 1_000_000, timeout=seconds) as got:
            send(link, link.peer_ip, real, [PROTECTED])
        assert datapath.pacer is not None
        machine = datapath.pacer.scheduler.machine
        stats = datapath.pacer.stats
    finally:
        datapath.stop()
    assert stats.dummies_failed == 0
    real_times = sorted(float(ts) for port, ts, *_ in got if port == PROTECTED)  # type: ignore[arg-type]
    dummy_times = sorted(float(ts) for port, ts, *_ in got if port == DISCARD)  # type: ignore[arg-type]
    assert len(real_times) == real
    return real_times, dummy_times, machine


def test_front_padding_times_follow_the_drawn_rayleigh_window(pin_root: Path) -> None:
    with veth_pair(45) as link:
        real, dummies, machine = run_defence(
            link, pin_root, {"kind": "front", "front": {"max_dummies": 400, "window_min_s": 0.4,
                                                       "window_max_s": 0.4}},
            seed=11, real=50, seconds=3.0)
    assert isinstance(machine, FrontMachine)
    n = machine.planned[Direction.OUT]
    assert len(dummies) == n > 30
    w = machine.windows[Direction.OUT]
    samples = sorted(t - real[0] for t in dummies)
    d = max(max((i + 1) / n - (1 - math.exp(-x * x / (2 * w * w))),
                (1 - math.exp(-x * x / (2 * w * w))) - i / n) for i, x in enumerate(samples))
    critical = 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov, 1 % level
    print(f"\nFRONT on the wire: {n} dummies, window {w} s, KS D = {d:.4f} (1 % critical {critical:.4f})")
    assert d < critical


def test_wtfpad_gap_dummies_follow_the_gap_histogram(pin_root: Path, tmp_path: Path) -> None:
    edges = [0.002, 0.005, 0.010, 0.020, 0.050]
    gap = [4, 8, 6, 2]
    hist = tmp_path / "wtfpad.json"
    hist.write_text(json.dumps({"edges": edges, "out": {
        "burst": {"counts": [1, 0, 0, 0], "infinity": 0},
        "gap": {"counts": gap, "infinity": 0}}}))
    with veth_pair(46) as link:
        _, dummies, machine = run_defence(
            link, pin_root, {"kind": "wtfpad", "wtfpad": {"histograms": str(hist)}},
            seed=5, real=20, seconds=6.0)
    assert isinstance(machine, WtfPadMachine)
    intervals = [b - a for a, b in itertools.pairwise(dummies)]
    counts = [0] * len(gap)
    for value in intervals:
        index = sum(1 for edge in edges[1:-1] if value >= edge)
        counts[index] += 1
    total = sum(counts)
    expected = [total * c / sum(gap) for c in gap]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))
    print(f"\nWTF-PAD on the wire: {len(dummies)} dummies, gap bins observed {counts}, expected "
          f"{[round(e) for e in expected]}, chi2 = {chi2:.2f} (1 % critical, 3 dof: 11.34)")
    assert total > 200
    assert chi2 < 11.34
