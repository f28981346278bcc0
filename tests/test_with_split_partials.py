"""benchmarks/with_split_partials.py: the model's split-partials table replaced for the script it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, with_split_partials
from jpaged.models import llama


def test_the_script_runs_with_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(
        "import json, sys\n"
        "from jpaged.models import llama\n"
        "json.dump([[*key, s] for key, s in llama.H200_SPLIT_PARTIALS.items()], open(sys.argv[1], 'w'))\n"
    )
    monkeypatch.setattr(llama, "H200_SPLIT_PARTIALS", {(1, 1, 1): 1})  # restored after the test
    monkeypatch.setenv(common.SPLIT_PARTIALS_ENV, "")  # main() sets it: teardown then removes it
    with_split_partials.main(["4096x4096x1=8, 11008x4096x1=16", str(script), str(out)])
    assert json.loads(out.read_text()) == [[4096, 4096, 1, 8], [11008, 4096, 1, 16]]
    assert common.env_info()["split_partials"] == "4096x4096x1=8, 11008x4096x1=16"
    with_split_partials.main(["", str(script), str(out)])  # empty: the table emptied
    assert json.loads(out.read_text()) == []
    assert common.env_info()["split_partials"] == "none"


def test_bad_tables_and_a_missing_script_are_refused() -> None:
    with pytest.raises(SystemExit, match="usage"):
        with_split_partials.main(["4096x4096x1=8"])
    with pytest.raises(ValueError, match=r"bad entry '4096x4096=8': expected KxNxM=S"):
        with_split_partials.parse_table("4096x4096=8")
    with pytest.raises(ValueError, match="S must divide K"):
        with_split_partials.parse_table("11008x4096x1=3")
