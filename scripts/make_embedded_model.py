"""Write the embedded test model: a tiny random-weight Llama with a real tokenizer.

    python scripts/make_embedded_model.py [--out data/embedded_model]

The output (config.json, generation_config.json, model.safetensors in bf16 with the
standard HF Llama tensor names, and the Mistral v3 SentencePiece tokenizer with a
Mistral-style chat template) is what `make serve` and the end-to-end tests serve.
Everything is derived from a fixed seed and fixed inputs, so rerunning the script
gives byte-identical files; tests/test_embedded_model.py checks that against the
committed copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

from flashserve.testing.offline_tokenizers import make_sentencepiece_tokenizer_dir  # noqa: E402
from flashserve.testing.random_weights import random_llama_weights  # noqa: E402

SEED = 20261128
INIT_STD = 0.02

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32768,  # the Mistral v3 tokenizer's
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, 2 query heads per KV head
    "head_dim": 16,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
}

# Mistral instruct format with Mistral's tool syntax. Notes on the choices:
# - The system prompt goes in front of the FIRST user turn, so that a conversation's
#   rendering only ever grows at its end (prefix caching reuses the whole history).
# - Tools ([AVAILABLE_TOOLS]) and documents go with the LAST user turn, as Mistral does.
# - [/INST] opens the assistant's answer: it is the generation prompt after a user
#   turn, so render(messages, add_generation_prompt=True) is always a prefix of the
#   rendering of the same messages followed by the assistant's reply. After tool
#   results the model answers directly and the generation prompt is empty.
# - Assistant turns (text or [TOOL_CALLS] [json list]) end with EOS.
# - Content may be a string or a list of OpenAI content parts (text parts are kept).
CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
    {%- if content is string -%}{{ content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}{{ part }}
            {%- elif part.type == "text" -%}{{ part.text }}
            {%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}{{ content }}
    {%- endif -%}
{%- endmacro -%}
{%- macro json_of(value) -%}
    {%- if value is string -%}{{ value }}{%- else -%}{{ value | tojson }}{%- endif -%}
{%- endmacro -%}

{%- set ns = namespace(system="", first_user=-1, last_user=-1, previous="") -%}
{%- for message in messages -%}
    {%- if message.role == "system" -%}
        {%- set ns.system = ns.system ~ (("\n\n") if ns.system else "") ~ text_of(message.content) -%}
    {%- elif message.role == "user" -%}
        {%- if ns.first_user < 0 -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}

{{- bos_token -}}
{%- for message in messages -%}
    {%- if message.role == "user" -%}
        {%- if loop.index0 == ns.last_user and tools -%}
            {{- "[AVAILABLE_TOOLS] [" -}}
            {%- for tool in tools -%}
                {%- set fn = tool.function if tool.function is defined else tool -%}
                {{- '{"type": "function", "function": {"name": ' ~ (fn.name | tojson) -}}
                {%- if fn.description is defined and fn.description -%}
                    {{- ', "description": ' ~ (fn.description | tojson) -}}
                {%- endif -%}
                {{- ', "parameters": ' ~ ((fn.parameters if fn.parameters is defined else {}) | tojson) ~ '}}' -}}
                {{- ", " if not loop.last -}}
            {%- endfor -%}
            {{- "][/AVAILABLE_TOOLS]" -}}
        {%- endif -%}
        {{- "[INST] " -}}
        {%- if loop.index0 == ns.first_user and ns.system -%}
            {{- ns.system ~ "\n\n" -}}
        {%- endif -%}
        {%- if loop.index0 == ns.last_user and documents -%}
            {{- "Documents:\n" -}}
            {%- for doc in documents -%}
                {{- "[" ~ loop.index ~ "] " -}}
                {%- if doc.title is defined and doc.title -%}{{- doc.title ~ "\n" -}}{%- endif -%}
                {{- (doc.text if doc.text is defined else text_of(doc.content)) ~ "\n" -}}
            {%- endfor -%}
            {{- "\n" -}}
        {%- endif -%}
        {{- text_of(message.content) -}}
    {%- elif message.role == "assistant" -%}
        {%- if ns.previous == "user" -%}{{- "[/INST]" -}}{%- endif -%}
        {%- set content = text_of(message.content) -%}
        {%- if content -%}{{- " " ~ content -}}{%- endif -%}
        {%- if message.tool_calls -%}
            {{- "[TOOL_CALLS] [" -}}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {{- '{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' ~ json_of(fn.arguments if fn.arguments is defined else {}) -}}
                {%- if call.id is defined and call.id -%}{{- ', "id": ' ~ (call.id | tojson) -}}{%- endif -%}
                {{- "}" ~ (", " if not loop.last else "") -}}
            {%- endfor -%}
            {{- "]" -}}
        {%- endif -%}
        {{- eos_token -}}
    {%- elif message.role == "tool" -%}
        {%- if ns.previous == "user" -%}{{- "[/INST]" -}}{%- endif -%}
        {{- '[TOOL_RESULTS] {"content": ' ~ (text_of(message.content) | tojson) -}}
        {%- if message.tool_call_id is defined and message.tool_call_id -%}
            {{- ', "call_id": ' ~ (message.tool_call_id | tojson) -}}
        {%- endif -%}
        {{- "}[/TOOL_RESULTS]" -}}
    {%- endif -%}
    {%- if message.role != "system" -%}{%- set ns.previous = message.role -%}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.previous == "user" -%}
    {{- "[/INST]" -}}
{%- endif -%}
""".strip()


def make_weights(config: dict[str, Any], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random Llama weights under HF's tensor names; no lm_head (tied to the embeddings)."""
    return random_llama_weights(config, seed, INIT_STD)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_embedded_model(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", CONFIG)
    _write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    # save_file writes tensors in sorted-name order with a fixed header: deterministic.
    save_file(make_weights(CONFIG), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    make_sentencepiece_tokenizer_dir(out_dir, chat_template=CHAT_TEMPLATE)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "embedded_model")
    args = parser.parse_args(argv)
    out = make_embedded_model(args.out)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>10}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
