"""benchmarks/with_step_copies.py: the engine's step compiled twice, each variant's calls taking the copies in turn."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import REPO, STORIES, write_engine_probe

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, with_step_copies
from jpaged import runner as runner_module


def test_the_copies_alternate_and_give_the_same_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment's wrapper: the same greedy tokens as the engine as it is, each copy of the step serving
    calls (the warm-up runs every variant on each), and the copy count in every record's env."""
    script = write_engine_probe(tmp_path / "probe.py", before="list(getattr(runner._jitted_step, 'calls', []))",
                                after="getattr(runner._jitted_step, 'calls', None)")  # fmt: skip
    plain, copied = tmp_path / "plain.json", tmp_path / "copied.json"
    monkeypatch.setattr(sys, "argv", [str(script), str(STORIES), str(plain)])
    runpy.run_path(str(script), run_name="__main__")
    # restored after the test: the wrapper replaces both process-wide
    monkeypatch.setattr(runner_module, "_jitted_step", runner_module._jitted_step)
    monkeypatch.setattr(runner_module.ModelRunner, "warm_up", runner_module.ModelRunner.warm_up)
    monkeypatch.setenv(common.STEP_COPIES_ENV, "")  # main() sets it: teardown then removes it
    with_step_copies.main(["2", str(script), str(STORIES), str(copied)])
    expected, got = json.loads(plain.read_text()), json.loads(copied.read_text())
    assert expected["after"] is None and got["tokens"] == expected["tokens"]
    variants = len(runner_module._jitted_step._turns)  # type: ignore[attr-defined]
    assert got["before"][0] == got["before"][1] > 0  # the warm-up ran every variant it compiles on each copy
    assert abs(got["after"][0] - got["after"][1]) <= variants  # each variant's calls alternate
    assert common.env_info()["step_copies"] == 2
    with pytest.raises(ValueError, match=">= 2"):
        with_step_copies.parse_copies("1")
