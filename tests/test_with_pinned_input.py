"""benchmarks/with_pinned_input.py: each step's packed input staged in pinned host memory, copied in by the step."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import REPO, STORIES, write_engine_probe

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, with_pinned_input
from jpaged import runner as runner_module


def test_the_staged_input_gives_the_same_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment's wrapper: the same greedy tokens as the engine as it is (warm-up and every step through the
    staged path, its inputs in pinned host memory), and the flag in every record's env."""
    calls = "getattr(runner._jitted_step, 'calls', None)"
    script = write_engine_probe(tmp_path / "probe.py", before=calls, after=calls)
    plain, staged = tmp_path / "plain.json", tmp_path / "staged.json"
    monkeypatch.setattr(sys, "argv", [str(script), str(STORIES), str(plain)])
    runpy.run_path(str(script), run_name="__main__")
    monkeypatch.setattr(runner_module, "_jitted_step", runner_module._jitted_step)  # restored after the test
    monkeypatch.setenv(common.PINNED_INPUT_ENV, "")  # main() sets it: teardown then removes it
    with_pinned_input.main([str(script), str(STORIES), str(staged)])
    expected, got = json.loads(plain.read_text()), json.loads(staged.read_text())
    assert expected["after"] is None and got["tokens"] == expected["tokens"]
    assert got["after"] - got["before"] >= 6  # every generate step went through the wrapper (6 tokens: >= 6 steps)
    assert common.env_info()["pinned_input"] is True


def test_it_needs_a_script() -> None:
    with pytest.raises(SystemExit, match="usage"):
        with_pinned_input.main([])
