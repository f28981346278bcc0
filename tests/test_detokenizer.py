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


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """As vLLM: no stop string is looked for in the first min_tokens tokens' text; one may begin there and end
    after (it is then cut where it begins)."""
    text = " there was a girl. She was a girl. The end"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    first_dot = next(i for i, t in enumerate(ids) if tokenizer.decode(ids[: i + 1]).endswith("."))
    detok, stop = feed(tokenizer, text, stop=["."], min_tokens=first_dot + 1, max_tokens=50)
    assert stop == "." and detok.text == " there was a girl. She was a girl"
    detok, stop = feed(tokenizer, text, stop=["."], min_tokens=first_dot, max_tokens=50)
    assert stop == "." and detok.text == " there was a girl"  # the first "." is token min_tokens + 1
    straddling = [" girl", "l. S"]  # " girl" begins in the first min_tokens tokens' text and ends after it
    girl = next(i for i, t in enumerate(ids) if tokenizer.decode(ids[: i + 1]).endswith(" girl"))
    detok, stop = feed(tokenizer, text, stop=straddling, min_tokens=girl, max_tokens=50)
    assert stop == " girl" and detok.text == " there was a"


@pytest.mark.parametrize("include", [False, True])
def test_the_token_that_stops_a_request_adds_text_only_when_asked(tokenizer, include):
    """EOS or a stop token id ends a request: its text is left out of the output unless include_stop_str_in_output
    (vLLM), and skip_special_tokens=False does not bring EOS's "</s>" back."""
    prompt = tokenizer.encode("Once upon a time").ids
    params = SamplingParams(include_stop_str_in_output=include, skip_special_tokens=False)
    detok = Detokenizer(tokenizer, prompt, params)
    for token in tokenizer.encode(" the end.", add_special_tokens=False).ids[:-1]:
        detok.add(token)
    dot = tokenizer.encode(" the end.", add_special_tokens=False).ids[-1]
    assert detok.add(dot, stop_token=True) is None
    assert detok.text == (" the end." if include else " the end")
    eos = Detokenizer(tokenizer, prompt, params)
    eos.add(tokenizer.token_to_id("</s>"), stop_token=True)
    assert eos.text == ("</s>" if include else "")
