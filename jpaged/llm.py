"""Offline generation, vLLM style: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine, Prompt
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(**kwargs) if model is None else EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order.

        A prompt the engine refuses raises, and none of this call's prompts stays queued.
        """
        # one prompt: a string, a dict, token ids (a list or tuple of integers) or an array that is not 2-D (the
        # engine refuses all but 1-D); else a sequence of prompts, such as a 2-D array's rows
        single = (
            isinstance(prompts, str | dict)
            or (isinstance(prompts, np.ndarray) and prompts.ndim != 2)
            or (
                isinstance(prompts, list | tuple)
                and len(prompts) > 0
                and isinstance(prompts[0], int | np.integer)
                and not isinstance(prompts[0], bool)
            )
        )
        prompt_list: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item,arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(prompt_list)} prompts but {len(params_list)} sampling params")
        ids: list[str] = []
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:  # a bad prompt (ValueError) or anything else: none of this call's requests stay queued
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        conversations: list[list[dict[str, str]]] = (
            messages if messages and isinstance(messages[0], list) else [messages]  # type: ignore[list-item]
        )
        prompts: list[Prompt] = []
        for conv in conversations:
            text, ids = render_chat(self.engine, conv, chat_template, add_generation_prompt, chat_template_kwargs)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with collector_paused(), tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the engine loop runs (reference counting still frees what the
    steps drop; the collector's state is restored after). Its full walks cover every object alive (the imported
    libraries, the model: ~200k), and at 256 running sequences the steps' allocations trigger them often enough to
    cost the host loop ~7 of ~15 ms a step on the CPU box, in bursts an overlapped device step cannot hide
    (benchmarks/profile_step.py, "postprocess" 9.3 -> 3.2 ms). `jpaged serve` freezes its start-up heap instead: a
    process of its own, where nothing outlives the server."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def render_chat(
    engine: LLMEngine,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """Applies the chat template (the request's, the engine's --chat-template, or the tokenizer's own)."""
    if not messages:
        raise ValueError("messages must not be empty")
    template = chat_template or _read_template(engine.config.chat_template)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, but the engine runs with skip_tokenizer_init")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; pass one with --chat-template (or chat_template=...)"
        )
    text: str = tokenizer.apply_chat_template(  # type: ignore[assignment]  # tokenize=False gives a string
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **(chat_template_kwargs or {}),
    )
    # The template writes any BOS itself, so tokenizing must not add another.
    return text, list(tokenizer(text, add_special_tokens=False).input_ids)


def _read_template(template: str | None) -> str | None:
    if template is None:
        return None
    path = Path(template)
    return path.read_text() if "{" not in template and path.is_file() else template
