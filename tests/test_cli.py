"""`jpaged generate` (and the flags generated from the config dataclasses)."""

from __future__ import annotations

import dataclasses

from conftest import KNOWN_GREEDY

from jpaged.cli import build_parser, main
from jpaged.config import EngineConfig
from jpaged.sampling_params import SamplingParams


def test_generate_streams_the_greedy_completion(capsys):
    assert main(["generate", "--max-tokens", "60", "--max-model-len", "128", "Once upon a time"]) == 0
    assert capsys.readouterr().out == KNOWN_GREEDY + "\n"


def test_generate_several_prompts_with_stop(capsys):
    assert main(["generate", "--max-tokens", "60", "--stop", "Lily", "--", "Once upon a time", "Once upon a"]) == 0
    out = capsys.readouterr().out
    assert "--- 'Once upon a time' [0] (stop)\nOnce upon a time, there was a little girl named \n" in out
    assert "--- 'Once upon a' [0]" in out


def test_every_engine_and_sampling_field_has_a_flag():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    flags = {a.dest for a in generate._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= flags
    exempt = {
        "seed",
        "n",
        "logprobs",
        "prompt_logprobs",
        "logit_bias",
    }  # engine seed; dicts and multi-output stay API-only
    assert {f.name for f in dataclasses.fields(SamplingParams)} - exempt <= flags


def test_bad_model_folder_is_a_clear_error(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hello"]) == 2
    assert "does not exist" in capsys.readouterr().err
