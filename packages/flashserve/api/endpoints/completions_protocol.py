"""The /v1/completions request as typed objects (after its JSON Schema has accepted it).

Legacy completions name two fields differently from chat: `logprobs` is the number of
alternatives to list (chat: `logprobs: true` + `top_logprobs`), and `max_tokens`
defaults to 16. `to_request` maps them onto the shared GenerationOptions; the fields
only completions has (the prompt(s), `suffix`, `echo`) stay on CompletionRequest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from flashserve.api.frontend.options import GenerationOptions

# OpenAI's default for legacy completions (chat's is the context left).
DEFAULT_MAX_TOKENS = 16
# Fields that are not GenerationOptions (or mean something else there).
COMPLETION_ONLY = ("prompt", "model", "suffix", "echo", "n", "best_of", "logprobs")

TokenIds = list[int]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    # One prompt or several, each text or token ids: normalized by `prompts`.
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None
    echo: bool = False
    # How many alternatives to list per token (None: no logprobs at all).
    logprobs: int | None = None
    # Text prompts get the tokenizer's leading special tokens (BOS); see completions_prompt.
    add_special_tokens: bool = True
    options: GenerationOptions

    @property
    def prompts(self) -> list[str | TokenIds]:
        """The prompts, one per choice: a string, or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def stream(self) -> bool:
        return self.options.stream


def to_request(body: dict[str, Any]) -> CompletionRequest:
    """A validated body -> CompletionRequest, its shared settings as GenerationOptions."""
    shared = {key: value for key, value in body.items() if key not in COMPLETION_ONLY}
    shared.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    # The BOS rule of completions is applied where the prompt is tokenized, not by encode.
    add_special_tokens = shared.pop("add_special_tokens", True)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        shared["logprobs"], shared["top_logprobs"] = True, logprobs
    return CompletionRequest(
        model=body["model"],
        prompt=body["prompt"],
        suffix=body.get("suffix"),
        echo=body.get("echo", False),
        logprobs=logprobs,
        add_special_tokens=add_special_tokens,
        options=GenerationOptions.model_validate(shared),
    )
