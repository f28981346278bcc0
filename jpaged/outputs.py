"""What `LLM.generate` and the engine return: shaped like vLLM's `RequestOutput`, so vLLM users feel at home."""

from __future__ import annotations

from dataclasses import dataclass

from jpaged.request import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprob] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[Logprob | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
