"""Request bodies for the schema tests: the smallest valid request, and one that sets
every one of the 43 published fields (with each kind of response_format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "data" / "ChatCompletionRequest.schema.json"

# The 43 properties of Baseten's published ChatCompletionRequest, in its order.
PUBLISHED_PROPERTIES = [
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "best_of",
    "top_k",
    "top_p_min",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "early_stopping",
    "bad",
    "bad_token_ids",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "echo",
    "add_generation_prompt",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_args",
    "disaggregated_params",
]

RESPONSE_FORMATS = {
    "text": {"type": "text"},
    "json_object": {"type": "json_object"},
    "json_schema": {
        "type": "json_schema",
        "json_schema": {
            "name": "weather",
            "description": "A weather report",
            "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    },
    "grammar": {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
    "structural_tag": {
        "type": "structural_tag",
        "structural_tag": '{"structures": [], "triggers": []}',
    },
}


def minimal() -> dict[str, Any]:
    return {"model": "flashserve", "messages": [{"role": "user", "content": "Hello"}]}


def rich(response_format: dict[str, Any]) -> dict[str, Any]:
    """A request that sets every one of the 43 fields to something valid."""
    return {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "name": "ana",
                "content": [
                    {"type": "text", "text": "What is the weather"},
                    {"type": "text", "text": " in Paris?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "index": 0,
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ],
        "model": "flashserve",
        "frequency_penalty": 0.5,
        "logit_bias": {"42": -100, "7": 2.5},
        "logprobs": True,
        "top_logprobs": 5,
        "max_tokens": 512,
        "n": 1,
        "presence_penalty": -0.5,
        "response_format": response_format,
        "seed": 1234,
        "stop": ["\n\n", "END"],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": False},
        "temperature": 0.7,
        "top_p": 0.9,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                },
            },
            {"function": {"name": "no_args"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "user-123",
        "best_of": 1,
        "top_k": 40,
        "top_p_min": 0.1,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "length_penalty": 1.0,
        "early_stopping": False,
        "bad": ["darn"],
        "bad_token_ids": [13, 0],
        "stop_token_ids": [2],
        "include_stop_str_in_output": True,
        "ignore_eos": False,
        "min_tokens": 4,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "truncate_prompt_tokens": 4096,
        "echo": False,
        "add_generation_prompt": True,
        "add_special_tokens": False,
        "documents": [{"title": "Paris", "text": "Capital of France."}],
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "chat_template_args": {"enable_thinking": False, "nested": {"ok": [1, 2]}},
        "disaggregated_params": {
            "request_type": "generation_only",
            "first_gen_tokens": [17],
            "ctx_request_id": 99,
            "opaque_state": "b64state",
            "draft_tokens": [1, 2, 3],
            "multimodal_embedding_handles": [{"handle": 1}],
            "multimodal_hashes": [[1, 2], [3]],
        },
    }
