"""Build data/CompletionRequest.schema.json (/v1/completions) from the chat request schema.

The fields the two APIs share (sampling, stop, stream_options, response_format, the
extra sampling fields) are copied from data/ChatCompletionRequest.schema.json with the
definitions they reference, so the two endpoints accept them alike; the fields only
legacy completions have (`prompt`, `suffix`, `echo`, an integer `logprobs`) and its
`max_tokens` default (16, as OpenAI's) are written here. Re-run it whenever the chat
schema changes (tests/test_completions_schema.py checks the file is up to date):

    python scripts/build_completion_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

DATA = Path(__file__).resolve().parents[1] / "data"
CHAT_SCHEMA = DATA / "ChatCompletionRequest.schema.json"
OUTPUT = DATA / "CompletionRequest.schema.json"
SCHEMA_ID = "urn:flashserve:CompletionRequest"
LOCAL_REF_PREFIX = "#/$defs/"

# Shared with chat, in the order they are listed.
SHARED_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "n",
    "best_of",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "response_format",
    "top_k",
    "top_p_min",
    "min_p",
    "repetition_penalty",
    "bad",
    "bad_token_ids",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
)
# The most prompts one request may carry (each is one engine request).
MAX_PROMPTS = 256
# The API's limit is 5; the engine keeps up to 20 alternatives (as chat's top_logprobs).
MAX_LOGPROBS = 20

TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}

COMPLETION_FIELDS: dict[str, Any] = {
    "prompt": {
        "title": "Prompt",
        "description": "The prompt(s) to complete: a string, an array of strings, an array "
        "of token IDs, or an array of token-ID arrays. Several prompts give one choice each, "
        "in order (`index`). Text is tokenized as it is, with no chat template; the "
        "tokenizer's BOS is added unless `add_special_tokens` is false or the text already "
        "starts with it. Token IDs are used as they are.",
        "anyOf": [
            {"type": "string"},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_PROMPTS,
                "items": {"type": "string"},
            },
            TOKEN_IDS,
            {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": TOKEN_IDS},
        ],
    },
    "suffix": {
        "title": "Suffix",
        "description": "Text that comes after the completion: fill-in-the-middle. Needs a "
        "tokenizer with fill-in-the-middle tokens (Qwen/StarCoder `<|fim_prefix|>`..., "
        "DeepSeek Coder, Mistral `[PREFIX]`/`[SUFFIX]`); other models answer 400.",
        "type": "string",
    },
    "max_tokens": {
        "default": 16,
        "maximum": 262144,
        "minimum": 1,
        "title": "Max Tokens",
        "type": "integer",
        "description": "Maximum number of tokens to generate per prompt (default 16). "
        "Clipped to the room the model's context leaves after the prompt.",
    },
    "logprobs": {
        "default": None,
        "title": "Logprobs",
        "description": "Return the log probability of each generated token and of the "
        f"`logprobs` most likely alternatives at each position (0 to {MAX_LOGPROBS}; the "
        "sampled token is always listed, so there may be logprobs+1).",
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_LOGPROBS,
    },
    "echo": {
        "default": False,
        "title": "Echo",
        "description": "If `true`, the prompt text opens each choice's text.",
        "type": "boolean",
    },
    "add_special_tokens": {
        "default": True,
        "title": "Add Special Tokens",
        "description": "If `true`, text prompts get the special tokens the tokenizer adds "
        "at the start (the BOS of Llama and Mistral tokenizers; Qwen's adds none), unless "
        "the text already starts with them.",
        "type": "boolean",
    },
}


def _referenced_defs(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(LOCAL_REF_PREFIX):
            found.add(ref.removeprefix(LOCAL_REF_PREFIX))
        for value in node.values():
            _referenced_defs(value, found)
    elif isinstance(node, list):
        for value in node:
            _referenced_defs(value, found)
    return found


def build(chat: dict[str, Any]) -> dict[str, Any]:
    """The completions request schema, its shared parts taken from `chat`."""
    properties: dict[str, Any] = {"prompt": COMPLETION_FIELDS["prompt"]}
    for name in SHARED_FIELDS:
        properties[name] = chat["properties"][name]
    properties.update({k: v for k, v in COMPLETION_FIELDS.items() if k != "prompt"})
    # Definitions referenced, also from inside other definitions.
    names: set[str] = _referenced_defs(properties, set())
    while True:
        more = _referenced_defs([chat["$defs"][name] for name in names], set(names))
        if more == names:
            break
        names = more
    schema = {
        "$schema": chat["$schema"],
        "$id": SCHEMA_ID,
        "title": "CompletionRequest",
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "prompt"],
        "properties": properties,
        "$defs": {name: chat["$defs"][name] for name in sorted(names)},
    }
    Draft202012Validator.check_schema(schema)
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    chat = json.loads(CHAT_SCHEMA.read_text(encoding="utf-8"))
    OUTPUT.write_text(render(build(chat)), encoding="utf-8")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
