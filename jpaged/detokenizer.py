"""Incremental detokenization and stop strings for one request.

`tokenizers`' `DecodeStream` turns one token at a time into text (it buffers split UTF-8 bytes and keeps the leading
spaces that depend on the previous token), so each step costs O(1) instead of re-decoding the whole output.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from jpaged.sampling_params import SamplingParams

_PROMPT_CONTEXT = 6  # prompt tokens replayed into the stream so the first output token decodes in context


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """With no tokenizer (skip_tokenizer_init), the text stays empty."""
        self._tokenizer = tokenizer
        self._stream = DecodeStream(
            ids=prompt_token_ids[-_PROMPT_CONTEXT:], skip_special_tokens=params.skip_special_tokens
        )
        self._skip_special = params.skip_special_tokens
        self._output_ids: list[int] = []
        self._full_decode: str | None = None  # set once the stream gave up: decode the whole output instead
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0  # output tokens added, the stop token included
        # Text that might be the start of a stop string is held back from streamed output until it is decided.
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""

    def add(self, token_id: int, *, stop_token: bool = False) -> str | None:
        """Appends a token's text; returns the stop string it completed (the text is then cut there), or None.

        As vLLM does: `stop_token` (the token ended the request: EOS or a stop token id) adds no text unless
        include_stop_str_in_output; stop strings are looked for only in text after the first min_tokens tokens' (a
        match may start in that text, not lie in it)."""
        self._num_tokens += 1
        if self._tokenizer is None or (stop_token and not self._include_stop):
            return None
        self._output_ids.append(token_id)
        chunk = self._next_chunk(token_id)
        if not chunk:
            return None
        before = len(self.text)
        self.text += chunk
        if not self._stops or self._num_tokens <= self._min_tokens:
            return None
        # each stop may begin in the text before this chunk, but must end in it (else an earlier chunk completed it)
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[: index + (len(stop) if self._include_stop else 0)]
        return stop

    def _next_chunk(self, token_id: int) -> str | None:
        assert self._tokenizer is not None
        if self._full_decode is None:
            try:
                return self._stream.step(self._tokenizer, token_id)
            except Exception:
                self._full_decode = self.text
        # Slow but total: invalid bytes decode to U+FFFD, as in tokenizer.decode.
        full = self._tokenizer.decode(self._output_ids, skip_special_tokens=self._skip_special)
        chunk = full[len(self._full_decode) :] if full.startswith(self._full_decode) else ""
        self._full_decode = full
        return chunk

    def visible_text(self, finished: bool) -> str:
        if finished or not self._hold:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold)]
