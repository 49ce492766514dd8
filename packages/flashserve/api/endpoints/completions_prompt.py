"""The prompts of a completions request -> token ids, as they are (no chat template).

Text is tokenized with special tokens recognized, like a rendered chat prompt: the
client writes the whole prompt, so markup it writes is meant. The tokenizer's BOS
convention applies: the special tokens its `encode` adds at the start (Llama and
Mistral: `<s>`; Qwen: none) open a text prompt unless `add_special_tokens` is false
or the text already starts with them (a rendered chat prompt does), and nothing is
added at the end: the model continues the text. Token-id prompts are used as they are.
With `suffix`, the prompt is the prefix of a fill-in-the-middle prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashserve.api.endpoints.completions_fim import FimFormat, assemble, find_fim_format
from flashserve.api.endpoints.completions_protocol import CompletionRequest
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.http.field_text import invalid_field

# Encoded in front of a suffix and cut off again, so a tokenizer that marks the start of
# a text with a space (SentencePiece's dummy prefix) sees the suffix as continuing text.
_CONTINUATION_SENTINEL = "\n"


@dataclass
class EncodedPrompt:
    """One prompt, ready for ModelFrontend.build."""

    ids: list[int]
    text: str  # the prompt's text (token-id prompts: decoded)
    param: str  # the field that holds it, for errors ("prompt" or "prompt[2]")


class PromptEncoder:
    """A served model's rules for completions prompts (one per endpoint)."""

    def __init__(self, frontend: ModelFrontend) -> None:
        self.frontend = frontend
        tokenizer = frontend.tokenizer
        self.tokenizer = tokenizer
        self.leading_ids = leading_special_ids(tokenizer)
        self.fim: tuple[FimFormat, dict[str, int]] | None = find_fim_format(tokenizer)
        self.dummy_prefix = _adds_dummy_prefix(tokenizer)

    def encode(self, request: CompletionRequest) -> list[EncodedPrompt]:
        prompts = request.prompts
        # A list of strings or of id lists names its items; one prompt is "prompt".
        raw = request.prompt
        several = isinstance(raw, list) and not all(isinstance(item, int) for item in raw)
        encoded = []
        for index, prompt in enumerate(prompts):
            param = f"prompt[{index}]" if several else "prompt"
            if isinstance(prompt, str):
                encoded.append(self._encode_text(prompt, request, param))
            else:
                encoded.append(self._encode_ids(prompt, request, param))
        return encoded

    def _encode_text(self, text: str, request: CompletionRequest, param: str) -> EncodedPrompt:
        ids = self.frontend.tokenize(text, request.options, param=param)
        if request.suffix is not None:
            ids = self._fill_in_the_middle(ids, request.suffix)
        lead = self.leading_ids
        if request.add_special_tokens and lead and ids[: len(lead)] != lead:
            ids = lead + ids
        if not ids:
            raise invalid_field(
                f"'{param}' is empty, and this tokenizer adds no BOS to start it: send at "
                "least one token of text",
                param,
            )
        return EncodedPrompt(ids, text, param)

    def _encode_ids(self, ids: list[int], request: CompletionRequest, param: str) -> EncodedPrompt:
        vocab_size = self.frontend.vocab_size
        for position, token in enumerate(ids):
            if token >= vocab_size:
                raise invalid_field(
                    f"'{param}[{position}]' = {token} is not a token id of this model "
                    f"(0..{vocab_size - 1})",
                    f"{param}[{position}]",
                )
        limit = request.options.truncate_prompt_tokens
        if limit and len(ids) > limit:
            ids = ids[-limit:]
        text = self.tokenizer.decode(ids, skip_special_tokens=request.options.skip_special_tokens)
        if request.suffix is not None:
            ids = self._fill_in_the_middle(ids, request.suffix)
        return EncodedPrompt(list(ids), text, param)

    def _fill_in_the_middle(self, prefix_ids: list[int], suffix: str) -> list[int]:
        if self.fim is None:
            raise invalid_field(
                "'suffix' needs fill-in-the-middle, and this model's tokenizer has no FIM "
                "tokens (such as <|fim_prefix|>/<|fim_suffix|>/<|fim_middle|>): drop "
                "'suffix' or serve a code model that has them",
                "suffix",
            )
        if len(suffix) > self.frontend.max_prompt_chars:
            raise invalid_field(
                f"'suffix' is {len(suffix)} characters long, more than this model's "
                f"{self.frontend.max_model_len}-token context can hold",
                "suffix",
            )
        fim, marker_ids = self.fim
        return assemble(fim, marker_ids, prefix_ids, self._continuation_ids(suffix))

    def _continuation_ids(self, text: str) -> list[int]:
        """`text` tokenized as the continuation of other text (no dummy-prefix space)."""
        encode = self.tokenizer.encode
        if not self.dummy_prefix or not text:
            return encode(text, add_special_tokens=False)
        head = encode(_CONTINUATION_SENTINEL, add_special_tokens=False)
        ids = encode(_CONTINUATION_SENTINEL + text, add_special_tokens=False)
        if ids[: len(head)] == head:
            return ids[len(head) :]
        return encode(text, add_special_tokens=False)  # the sentinel merged: as it is


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's encode puts before a text (its BOS convention)."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    marked = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return list(marked[:start])
    return []


def _adds_dummy_prefix(tokenizer: Any) -> bool:
    ids = tokenizer.encode("x", add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids[:1])
    return bool(tokens) and isinstance(tokens[0], str) and tokens[0].startswith("\u2581")
