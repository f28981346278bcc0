"""How one request wants its tokens chosen: vLLM's `SamplingParams`, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

_GREEDY_EPS = 1e-5  # temperatures below this decode greedily, as in vLLM
MAX_LOGPROBS = 20
_FLOAT32_MAX = 3.4028234663852886e38
# Integer fields (None allowed where the field's type says so; the checks below name the rest) and real ones.
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_REAL_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _as_int(value: Any) -> Any:
    """A numpy (or other `numbers.Integral`) integer as an int; bools and everything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    return value


def _integer(value: Any) -> bool:
    """An int, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple | type(None)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = [_as_int(t) for t in self.stop_token_ids or []]
        for field in _INT_FIELDS:  # numpy integers become ints; anything else is left for _validate to name
            setattr(self, field, _as_int(getattr(self, field)))
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_as_int(token): bias for token, bias in self.logit_bias.items()}
        if self.top_k == -1 and _integer(self.top_k):
            self.top_k = 0
        if self.seed == -1 and _integer(self.seed):  # as in vLLM: "no seed" (UIs send -1 for a random one)
            self.seed = None
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        for field in _INT_FIELDS:
            value = getattr(self, field)
            if value is not None and not _integer(value):
                raise bad(field, "must be an integer")
        for field in _REAL_FIELDS:  # finite, and finite in float32, where the sampler computes
            value = getattr(self, field)
            if not _real(value) or abs(value) > _FLOAT32_MAX:
                raise bad(field, "must be a finite number")
        if self.n is None or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if self.greedy and self.n > 1:  # n copies of one greedy output, each costing a sequence (vLLM refuses too)
            raise bad("n", f"must be 1 when sampling greedily (temperature {self.temperature!r} < {_GREEDY_EPS})")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k is None or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "must be an integer of 64 bits, signed or not")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens is None or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):  # type: ignore[union-attr]
            raise bad("stop", "must hold non-empty strings")
        if any(not _integer(t) or t < 0 for t in self.stop_token_ids):  # type: ignore[union-attr]
            raise bad("stop_token_ids", "must hold non-negative token ids")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise bad(field, f"must be an integer in [0, {MAX_LOGPROBS}]")
        for field in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "must be a bool")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token ids to biases")
            for token, bias in self.logit_bias.items():
                if not _integer(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
                if not _real(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
