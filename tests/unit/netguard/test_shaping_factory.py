"""The configured defence becomes the right machine; a bad histogram file is named in the error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tensorguard.config.schema import DefenceSettings
from tensorguard.netguard.shaping.base import Direction
from tensorguard.netguard.shaping.cbr import CbrMachine
from tensorguard.netguard.shaping.factory import HistogramFileError, build_machine, load_histograms
from tensorguard.netguard.shaping.front import FrontMachine
from tensorguard.netguard.shaping.regulator import RegulatorMachine
from tensorguard.netguard.shaping.wtfpad import WtfPadMachine

HISTS = {"edges": [0.001, 0.01, 0.1, 1.0],
         "out": {"burst": {"counts": [3, 1, 0], "infinity": 1}, "gap": {"counts": [0, 2, 2], "infinity": 1}}}


def test_each_kind_builds_its_machine(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text(json.dumps(HISTS))
    rng = random.Random(1)
    assert build_machine(DefenceSettings(), rng) is None
    cbr = build_machine(DefenceSettings(kind="cbr", rate_hz=200, burst=2), rng)
    assert isinstance(cbr, CbrMachine) and cbr.period == pytest.approx(0.005) and cbr.burst == 2
    assert cbr.ledger.caps.max_added_delay == pytest.approx(0.05)
    assert isinstance(build_machine(DefenceSettings(kind="front"), rng), FrontMachine)
    assert isinstance(build_machine(DefenceSettings(kind="regulator"), rng), RegulatorMachine)
    wtf = build_machine(DefenceSettings.model_validate(
        {"kind": "wtfpad", "wtfpad": {"histograms": str(path)}}), rng)
    assert isinstance(wtf, WtfPadMachine) and set(wtf.lanes) == {Direction.OUT}


@pytest.mark.parametrize(("content", "fragment"), [
    ("not json", "cannot read histograms"),
    (json.dumps({"edges": [1, 0.5]}), "increasing"),
    (json.dumps({"edges": [0, 1], "out": {"burst": {"counts": [1, 2], "infinity": 0},
                                          "gap": {"counts": [1], "infinity": 0}}}), "one count per bin"),
    (json.dumps({"edges": [0, 1]}), 'no "out" or "in"'),
    (json.dumps({"edges": [0, 1], "out": {"burst": {}}}), "invalid histograms"),
])
def test_bad_histogram_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "h.json"
    path.write_text(content)
    with pytest.raises(HistogramFileError, match=fragment) as info:
        load_histograms(path)
    assert str(path) in str(info.value)
