"""Token strings and the two logprobs shapes: the legacy completions one and the chat one.

A token's string is its text as it appears inside a text (with its leading space), found by decoding it after an
anchor token and cutting the anchor off; a byte-fallback token (`<0x0A>`) reports its byte. Strings are cached per
token id: the vocabulary is finite and a token's string does not depend on its neighbours here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from jpaged.request import Logprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FLOOR = -9999.0  # JSON has no -inf: a probability of zero is reported as this, as vLLM does


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenStrings:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor = anchor[-1:] if anchor else []
        self._anchor_text = tokenizer.decode(self._anchor) if self._anchor else ""
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and (m := _BYTE_TOKEN.fullmatch(piece)):
                raw = [int(m.group(1), 16)]
                hit = (bytes(raw).decode("utf-8", errors="replace"), raw)
            else:
                decoded = self._tokenizer.decode([*self._anchor, token_id])
                text = decoded[len(self._anchor_text) :] if decoded.startswith(self._anchor_text) else decoded
                hit = (text, list(text.encode("utf-8")))
            self._cache[token_id] = hit
        return hit


_SLACK = 4  # characters past the scan position where a token's text may still start (see text_offsets)
_REPLACEMENT = "\ufffd"  # the string of a byte token that is part of a character


def text_offsets(text: str, token_texts: Sequence[str], start: int = 0) -> tuple[list[int], int]:
    """Where each token's text begins in `text`, scanning from `start`; and where the scan ends.

    A token's string (`TokenStrings.text`) is its text inside a text, leading space included, but the returned text
    is the detokenizer's: it drops the leading space of a SentencePiece text's first token, may leave special tokens
    out, and shows a character split over byte tokens once. So a token is looked for at the scan position, as it is
    or without its leading space, then up to _SLACK characters on; one not found (a special token left out, a byte
    of a split character, text a stop string cut or a stream has not shown yet) begins where the scan stands, and
    moves it past its text only where that text would run past the end. So the scan over a stream's growing text
    gives the offsets it gives over the whole text.
    """
    pos, offsets = start, []
    for token_text in token_texts:
        candidates = [c for c in (token_text, token_text[1:] if token_text.startswith(" ") else "") if c]
        match = next(((pos, c) for c in candidates if text.startswith(c, pos)), None)
        if match is None:
            match = next(((at, c) for c in candidates if (at := text.find(c, pos, pos + len(c) + _SLACK)) >= 0), None)
        if match is None:
            offsets.append(pos)
            # Its text runs past the text's end (a stream's held-back tail, text a stop string cut): the scan moves
            # past it as it will once the text shows it. A byte of a split character moves nothing.
            if token_text != _REPLACEMENT and any(c.startswith(text[pos:]) for c in candidates):
                pos += len(candidates[0])
        else:
            offsets.append(match[0])
            pos = match[0] + len(match[1])
    return offsets, pos


def completion_logprobs(
    strings: TokenStrings,
    token_ids: Sequence[int],
    logprobs: Sequence[Logprob | None],
    offsets: Sequence[int],
) -> dict[str, list[Any]]:
    """The completions shape: parallel lists; `top_logprobs` maps token strings to logprobs, the chosen one included.

    `offsets`: each token's `text_offset` in the choice's text (`text_offsets`).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text = strings.text(token_id)
        tokens.append(text)
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_finite(lp.logprob))
        entry = {strings.text(t): _finite(v) for t, v in lp.top}
        entry.setdefault(text, _finite(lp.logprob))
        top.append(entry)
    return {"text_offset": list(offsets), "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}


def chat_logprobs(
    strings: TokenStrings, token_ids: Sequence[int], logprobs: Sequence[Logprob], num_top: int
) -> list[dict[str, Any]]:
    """The chat shape: one entry per token with its string, logprob, UTF-8 bytes and its `num_top` alternatives."""
    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        content.append(
            {
                "token": strings.text(token_id),
                "logprob": _finite(lp.logprob),
                "bytes": strings.bytes(token_id),
                "top_logprobs": [
                    {"token": strings.text(t), "logprob": _finite(v), "bytes": strings.bytes(t)}
                    for t, v in lp.top[:num_top]
                ],
            }
        )
    return content


def prompt_logprobs(
    strings: TokenStrings, token_ids: Sequence[int], logprobs: Sequence[Logprob | None]
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt position, None or {token id: {logprob, rank, decoded_token}}."""
    result: list[dict[str, dict[str, Any]] | None] = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        if lp is None:
            result.append(None)
            continue
        ranks = {t: i + 1 for i, (t, _) in enumerate(lp.top)}
        entry = {
            str(token_id): {
                "logprob": _finite(lp.logprob),
                "rank": lp.rank if lp.rank is not None else ranks.get(token_id),
                "decoded_token": strings.text(token_id),
            }
        }
        for t, v in lp.top:
            entry.setdefault(str(t), {"logprob": _finite(v), "rank": ranks[t], "decoded_token": strings.text(t)})
        result.append(entry)
    return result
