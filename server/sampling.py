"""From a validated request to the engine's `SamplingParams`, and the context-length rule with vLLM's messages."""

from __future__ import annotations

from jpaged.sampling_params import SamplingParams
from jpaged.server.errors import APIError, bad_request
from jpaged.server.protocol import ChatCompletionRequest, CompletionRequest

CONTEXT_CODE = "context_length_exceeded"


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """The tokens to generate: `requested`, or the rest of the context when None. 400 if they do not fit."""
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            param=param,
            code=CONTEXT_CODE,
        )
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
            f"Please reduce the length of the messages or completion.",
            param=param,
            code=CONTEXT_CODE,
        )
    return requested


# vLLM request fields that constrain what is generated (structured output, allowed or banned tokens, beam search,
# prompt truncation) or how tokens are reported. jpaged implements none of them, and generating as if a field were
# absent would return output the client believes constrained: a 400 instead, as for chat's tools.
UNSUPPORTED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "allowed_token_ids",
    "bad_words",
    "use_beam_search",
    "truncate_prompt_tokens",
    "return_tokens_as_token_ids",
)


def reject_unsupported_fields(request: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for any of UNSUPPORTED_FIELDS set to something other than its off value (null, false, empty, or a text
    response_format)."""
    fields = {**(request.model_extra or {}), **request.model_dump(include={"response_format"})}  # chat declares it
    for name in UNSUPPORTED_FIELDS:
        value = fields.get(name)
        if name == "response_format" and isinstance(value, dict) and value.get("type", "text") == "text":
            continue
        if value not in (None, False, [], {}):
            raise bad_request(f"{name} is not supported", param=name)


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    """The engine's parameters for `request`; the engine's own validation errors become 400s naming the field."""
    reject_unsupported_fields(request)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options can only be set when stream is true", param="stream_options")
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request("best_of must equal n: jpaged returns every sample it generates", param="best_of")
    logit_bias = None
    if request.logit_bias is not None:
        try:
            logit_bias = {int(token): bias for token, bias in request.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
    values = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
    }
    try:
        return SamplingParams(
            n=request.n,
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logit_bias=logit_bias,
            **{k: v for k, v in values.items() if v is not None},
        )
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=field if field.isidentifier() else None) from None
