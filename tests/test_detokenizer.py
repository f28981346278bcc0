from __future__ import annotations

import pytest
from conftest import STORIES
from tokenizers import Tokenizer

from jpaged.detokenizer import Detokenizer
from jpaged.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(STORIES / "tokenizer.json"))


def feed(tokenizer, text: str, **params) -> tuple[Detokenizer, str | None]:
    prompt = tokenizer.encode("Once upon a time").ids
    detok = Detokenizer(tokenizer, prompt, SamplingParams(**params))
    stop = None
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        stop = detok.add(token)
        if stop:
            break
    return detok, stop


def test_incremental_text_equals_full_decode(tokenizer):
    text = " there was a girl named Lily. She said: é中!"
    detok, _ = feed(tokenizer, text)
    prompt = tokenizer.encode("Once upon a time").ids
    output = tokenizer.encode(text, add_special_tokens=False).ids
    whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert detok.text == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]


def test_stop_string_across_tokens_cuts_before_it(tokenizer):
    detok, stop = feed(tokenizer, " there was a girl named Lily. She", stop=["named Li"])
    assert stop == "named Li" and detok.text == " there was a girl "
    detok, _ = feed(tokenizer, " there was a girl named Lily. She", stop=["named Li"], include_stop_str_in_output=True)
    assert detok.text == " there was a girl named Li"


def test_partial_stop_string_is_held_back_until_decided(tokenizer):
    detok, stop = feed(tokenizer, " there was a girl na", stop=["named"])
    assert stop is None and detok.text.endswith(" na")
    assert not detok.visible_text(finished=False).endswith("na")  # might still become "named"
    assert detok.visible_text(finished=True) == detok.text


def test_invalid_utf8_byte_runs_do_not_raise(tokenizer):
    prompt = tokenizer.encode("Once").ids
    detok = Detokenizer(tokenizer, prompt, SamplingParams())
    byte_tokens = [t for t in range(3, 259) if tokenizer.id_to_token(t).startswith("<0x")]
    for token in [byte_tokens[200], byte_tokens[3], 382, byte_tokens[250], 400]:  # continuation bytes with no lead
        detok.add(token)
    assert "\ufffd" in detok.text and detok.text.endswith(tokenizer.decode([400]).strip())
