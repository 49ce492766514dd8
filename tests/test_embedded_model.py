"""data/embedded_model: reproducible from its script, loadable offline by transformers,
and its chat template renders Mistral-style conversations with tools."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "data" / "embedded_model"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call00001",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call00001", "content": "18C, sunny"},
    {"role": "assistant", "content": "18C and sunny."},
    {"role": "user", "content": [{"type": "text", "text": "And Rome?"}]},
]


def sha256_of(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


def test_script_reproduces_the_committed_files(tmp_path: Path) -> None:
    out = tmp_path / "embedded_model"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_embedded_model.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    expected = sha256_of(MODEL_DIR)
    assert set(expected) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    assert sha256_of(out) == expected, "rerun `make embedded-model` and commit the result"


def test_checkpoint_layout() -> None:
    from safetensors import safe_open

    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        norm = f.get_tensor("model.norm.weight")
    assert "lm_head.weight" not in names
    assert len(names) == 2 + 9 * config["num_hidden_layers"]
    assert {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= names
    assert str(embed.dtype) == "torch.bfloat16"
    assert tuple(embed.shape) == (config["vocab_size"], config["hidden_size"])
    assert 0.015 < embed.float().std().item() < 0.025
    assert bool((norm == 1).all())


def test_transformers_loads_it_offline(tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.temperature == 0.7
    assert model.generation_config.top_p == 0.9
    assert len(tokenizer) == model.config.vocab_size == 32768
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 32768)
    assert torch.isfinite(logits).all()


def test_chat_template_renders_tools_and_turns(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<s>[INST] You are terse.\n\nWeather in Paris?[/INST]")
    assert text.count("<s>") == 1
    assert (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
        '"id": "call00001"}]</s>'
    ) in text
    assert '[TOOL_RESULTS] {"content": "18C, sunny", "call_id": "call00001"}[/TOOL_RESULTS]' in text
    assert "[/TOOL_RESULTS] 18C and sunny.</s>" in text
    # Tools come just before the last user turn; the system prompt only once, up front.
    tools_at = text.index("[AVAILABLE_TOOLS] [")
    assert text.index("18C and sunny.</s>") < tools_at < text.index("[INST] And Rome?")
    assert (
        json.loads(text[tools_at + len("[AVAILABLE_TOOLS] ") : text.index("[/AVAILABLE_TOOLS]")])
        == TOOLS
    )
    assert text.count("You are terse.") == 1
    assert text.endswith("[INST] And Rome?[/INST]")
    # Every control marker is one special token.
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for marker in ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]"):
        assert tokenizer.convert_tokens_to_ids(marker) in ids, marker


def test_generation_prompt_is_a_prefix_of_the_answered_conversation(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    bare = tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=False
    )
    answered = tokenizer.apply_chat_template(
        [*CONVERSATION, {"role": "assistant", "content": "Cloudy."}], tools=TOOLS, tokenize=False
    )
    assert bare + "[/INST]" == prompt
    assert answered == prompt + " Cloudy.</s>"
    # After tool results the model answers directly: no generation prompt is needed.
    after_tool = CONVERSATION[:4]
    assert tokenizer.apply_chat_template(
        after_tool, tokenize=False, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(after_tool, tokenize=False, add_generation_prompt=False)


def test_chat_template_renders_documents(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Summarize."}],
        documents=[{"title": "Bees", "text": "Bees make honey."}, {"text": "Ants dig."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        text
        == "<s>[INST] Documents:\n[1] Bees\nBees make honey.\n[2] Ants dig.\n\nSummarize.[/INST]"
    )
