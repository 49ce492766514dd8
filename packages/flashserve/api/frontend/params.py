"""A request's generation options -> the engine's SamplingParams: the one place they are built.

Everything that decides a request's tokens is gathered before this is called (the
compiled grammar, the tokens tool_choice "none" bans), so the params are built once,
whole, and nothing patches them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashserve.api.frontend.bad_words import bad_word_sequences
from flashserve.api.frontend.disaggregated_params import parse_disaggregated
from flashserve.api.frontend.options import GenerationOptions
from flashserve.api.http.errors import RequestError
from flashserve.engine.disaggregation import CONTEXT_ONLY
from flashserve.engine.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 4096
DEFAULT_TOP_K = 50  # the schema's default
MAX_TOP_LOGPROBS = 20  # the API's limit on top_logprobs
# top_p_min turns on a decaying nucleus, top_p_t = max(top_p_min, top_p * 0.9**t):
# TensorRT-LLM's top_p_decay rule with the decay that "factual nucleus sampling"
# (Lee et al., 2022), which that rule implements, recommends. The API has no
# field for the decay itself, nor for reset tokens.
TOP_P_DECAY = 0.9


@dataclass
class ModelDefaults:
    """Sampling defaults from the checkpoint's generation_config.json."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_generation_config(cls, raw: dict[str, Any]) -> ModelDefaults:
        # A generation config that does not sample declares greedy decoding.
        greedy = raw.get("do_sample") is False
        return cls(
            temperature=0.0 if greedy else raw.get("temperature"),
            top_p=raw.get("top_p"),
            top_k=raw.get("top_k"),
            min_p=raw.get("min_p"),
            repetition_penalty=raw.get("repetition_penalty"),
        )


def to_sampling_params(
    request: GenerationOptions,
    defaults: ModelDefaults,
    *,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    tokenizer: Any = None,
    grammar: Any = None,
    banned_token_ids: frozenset[int] = frozenset(),
    prompt_param: str = "messages",
) -> SamplingParams:
    """Engine settings for one request; `tokenizer` turns `bad` phrases into token sequences.

    `grammar` is the compiled structured-output or forced-tool-call grammar (None:
    unconstrained); `banned_token_ids` are banned beyond the request's `bad_token_ids`
    (the markers that open a tool call under tool_choice "none"); `prompt_param` names
    the field that holds the prompt, for the error when it leaves no room for output.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise RequestError(
            f"The prompt is {prompt_len} tokens long; this model's context is {max_model_len} tokens, "
            f"which leaves no room for output. Shorten the {prompt_param} or set "
            "truncate_prompt_tokens.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    # max_tokens beyond the context left is clipped, as the schema documents.
    max_tokens = min(request.max_tokens or DEFAULT_MAX_TOKENS, room)
    temperature = request.temperature
    if temperature is None:
        temperature = defaults.temperature if defaults.temperature is not None else 1.0
    top_p = request.top_p if request.top_p is not None else (defaults.top_p or 1.0)
    top_k = request.top_k if request.top_k is not None else DEFAULT_TOP_K
    min_p = request.min_p if request.min_p is not None else (defaults.min_p or 0.0)
    for name in ("stop_token_ids", "bad_token_ids"):
        for i, token in enumerate(getattr(request, name) or []):
            if not 0 <= token < vocab_size:
                raise RequestError(
                    f"{name}[{i}] = {token} is not a token id of this model (0..{vocab_size - 1})",
                    param=name,
                )
    logit_bias: dict[int, float] = {}
    for key, bias in (request.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab_size:
            raise RequestError(
                f"logit_bias names token {key}, which is not a token id of this model (0..{vocab_size - 1})",
                param=f"logit_bias.{key}",
            )
        logit_bias[token] = float(bias)
    repetition_penalty = request.repetition_penalty
    if "repetition_penalty" not in request.model_fields_set:
        repetition_penalty = defaults.repetition_penalty or 1.0
    top_p_min = float(request.top_p_min or 0.0)
    bad = [request.bad] if isinstance(request.bad, str) else list(request.bad or ())
    if bad and tokenizer is None:
        raise ValueError("`bad` phrases need the tokenizer")
    # A form with a token the model cannot emit (added tokens beyond its
    # embedding) can never be completed, so it needs no ban.
    bad_sequences = (
        tuple(form for form in bad_word_sequences(tokenizer, bad) if max(form) < vocab_size)
        if bad
        else ()
    )
    logprobs, top_logprobs = request.logprobs, request.top_logprobs if request.logprobs else 0
    disaggregated = parse_disaggregated(request.disaggregated_params)
    if disaggregated is not None and disaggregated.request_type == CONTEXT_ONLY:
        # The first token's entry is kept for whichever generation_only request
        # resumes this context, and that one may ask for logprobs: keep them all.
        logprobs, top_logprobs = True, MAX_TOP_LOGPROBS
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        min_p=float(min_p),
        top_p_min=top_p_min,
        top_p_decay=TOP_P_DECAY if top_p_min else 1.0,
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        min_tokens=min(request.min_tokens, max_tokens),
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        repetition_penalty=float(repetition_penalty),
        logit_bias=logit_bias,
        bad_token_ids=tuple(sorted(set(request.bad_token_ids or ()) | banned_token_ids))
        if banned_token_ids
        else tuple(request.bad_token_ids or ()),
        bad_sequences=bad_sequences,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
        disaggregated=disaggregated,
    )
