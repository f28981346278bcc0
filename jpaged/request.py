"""One sequence being generated, as the host sees it.

A user request with `n` samples becomes `n` `Request`s that share a prompt (and, with prefix caching, its pages);
`sample_index` tells them apart and feeds their random keys.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jpaged.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token still on the device (async scheduling): the next step reads it there


class RequestIdInUseError(ValueError):
    """A request id that a request still running holds: the caller chose it (an automatic id never clashes)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


def seed32(seed: int) -> int:
    """A user's seed (64 bits; a negative one as its two's complement, -1 as 2**64 - 1, though SamplingParams reads a
    seed of -1 as none) as the sampler's uint32: itself below 2**32; above, its low half mixed with a hash of its high
    half, so that seeds differing only there (5 and 5 + 2**32) do not draw alike."""
    seed &= 0xFFFF_FFFF_FFFF_FFFF
    high = seed >> 32
    return (seed ^ ((high * 0x9E3779B97F4A7C15) >> 32)) & 0xFFFFFFFF


@dataclass(frozen=True)
class Logprob:
    """One generated (or prompt) position's logprob and the top alternatives, as vLLM reports them."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) best first
    rank: int | None = None  # the tokens at least as likely as token_id, itself included (prompt logprobs)


@dataclass(eq=False)
class Request:
    request_id: str  # the user's id; the n samples of one request share it
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # uint32: the user's seed (seed32), or one the engine drew: each request samples from its own key
    max_tokens: int  # params.max_tokens resolved against max_model_len
    eos_token_ids: frozenset[int] = frozenset()
    sample_index: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(init=False)  # prompt + output, appended in place
    num_computed_tokens: int = 0  # tokens whose K/V are in this request's pages
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at first schedule
    pages: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # Sampled tokens not yet on the host: token index -> the row of the step that samples it. At most two (the
    # step being collected and the one just dispatched), always the last entries of token_ids.
    pending: dict[int, int] = field(default_factory=dict)
    stop_reason: int | str | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.sample_index)

    @property
    def known_output_token_ids(self) -> list[int]:
        return self.output_token_ids[: len(self.output_token_ids) - len(self.pending)]

    def append_token(self, token_id: int) -> None:
        index = self.add_placeholder(row=-1)
        self.resolve(index, token_id)

    def add_placeholder(self, row: int) -> int:
        """Reserves the next token for what row `row` of the step being dispatched samples; returns its index."""
        index = len(self.token_ids)
        self.token_ids.append(PLACEHOLDER)
        self.output_token_ids.append(PLACEHOLDER)
        self.pending[index] = row
        return index

    def resolve(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id
        self.output_token_ids[index - self.num_prompt_tokens] = token_id
        del self.pending[index]
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def truncate_after(self, index: int) -> None:
        """Drops tokens sampled past `index` (a step scheduled before the request was known to have ended)."""
        del self.token_ids[index + 1 :]
        del self.output_token_ids[index + 1 - self.num_prompt_tokens :]
        self.pending = {i: row for i, row in self.pending.items() if i <= index}

    def check_stop_token(self, index: int | None = None) -> None:
        """Finishes the request if its token at `index` (default: the last) ends it: EOS, a stop token id, or the
        length limit."""
        index = self.num_tokens - 1 if index is None else index
        last = self.token_ids[index]
        num_output = index + 1 - self.num_prompt_tokens
        if num_output >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return
            if last in self.params.stop_token_ids:  # type: ignore[operator]
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return
        if num_output >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
