"""FP8 block-quantized checkpoints (DeepSeek-V3's format) load, dequantized, as the model they encode.

The test quantizes a tiny random DeepSeek-V3 itself: every projection weight becomes
float8_e4m3fn with a float32 `weight_scale_inv` per block (blocks that do not divide
the shapes, so edge blocks are partial), as the official checkpoints store them;
router, norms, embeddings and lm_head stay unquantized, as there, and a quantized
multi-token-prediction layer follows the decoder's. The engine on the FP8 folder must
equal transformers and the engine on the same weights dequantized.
"""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import safetensors.torch
import torch
import transformers

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.models.quantization import UnsupportedQuantizationError
from tests.deepseek_models import VOCAB, save_random_deepseek
from tests.engine_harness import engine_logits

BLOCK = (16, 32)
QUANTIZED = re.compile(r"_proj(_with_mqa)?\.weight$")


def quantize_blocks(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv per block) with weight ~= fp8 * scale_inv."""
    rows, cols = weight.shape
    bo, bi = block
    scales = torch.empty(-(-rows // bo), -(-cols // bi))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale = tile.abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            scales[i, j] = scale
            quantized[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = (tile / scale).to(
                torch.float8_e4m3fn
            )
    return quantized, scales


def dequantize_blocks(quantized: torch.Tensor, scales: torch.Tensor, block) -> torch.Tensor:
    rows, cols = quantized.shape
    expanded = scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return quantized.float() * expanded


def write_fp8_pair(source, fp8_dir, dequantized_dir) -> None:
    """From a saved fp32 model: an FP8 checkpoint and the plain one it decodes to."""
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(path))
    # DeepSeek-V3's multi-token-prediction layer sits past num_hidden_layers (2 here),
    # quantized like the rest; the engine skips it, scales included.
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    mtp = {
        name.replace("model.layers.1.", f"model.layers.{layers}."): tensor.clone()
        for name, tensor in tensors.items()
        if name.startswith("model.layers.1.")
    }
    mtp[f"model.layers.{layers}.eh_proj.weight"] = torch.randn(64, 128)
    mtp[f"model.layers.{layers}.enorm.weight"] = torch.ones(64)
    fp8, plain = {}, {}
    for name, tensor in mtp.items():
        if QUANTIZED.search(name):
            fp8[name], fp8[name + "_scale_inv"] = quantize_blocks(tensor, BLOCK)
        else:
            fp8[name] = tensor
    for name, tensor in tensors.items():
        if QUANTIZED.search(name):
            q, s = quantize_blocks(tensor, BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            plain[name] = dequantize_blocks(q, s, BLOCK)
        else:
            fp8[name] = plain[name] = tensor
    # Two files in a shuffled order: some scales come before their weights, some
    # weights and scales sit in different files.
    names = list(fp8)
    random.Random(0).shuffle(names)
    half = len(names) // 2
    for out in (fp8_dir, dequantized_dir):
        out.mkdir()
        for extra in ("generation_config.json",):
            if (source / extra).exists():
                shutil.copy(source / extra, out / extra)
    for i, part in enumerate((names[:half], names[half:])):
        safetensors.torch.save_file(
            {n: fp8[n].contiguous() for n in part}, fp8_dir / f"model-{i}.safetensors"
        )
    safetensors.torch.save_file(plain, dequantized_dir / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (dequantized_dir / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))


def make_engine(path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            device="cpu", dtype="float32", kv_cache_memory_gb=0.01, max_model_len=256, cpu_threads=1
        ),
        path,
    )


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    save_random_deepseek(root / "source", seed=5, num_hidden_layers=2)
    write_fp8_pair(root / "source", root / "fp8", root / "dequantized")
    return root / "fp8", root / "dequantized"


def test_fp8_checkpoint_equals_its_dequantized_model(fp8_pair, caplog):
    fp8_dir, dequantized_dir = fp8_pair
    with caplog.at_level("INFO", logger="flashserve.models.loader"):
        fp8_engine = make_engine(fp8_dir)
    assert "FP8 block-quantized weights (16x32 blocks): dequantized to float32" in caplog.text
    plain_engine = make_engine(dequantized_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        dequantized_dir, dtype=torch.float32
    ).eval()
    token_ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0].float()
    for chunk in (60, 1):
        got = engine_logits(fp8_engine, token_ids, chunk)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=f"chunk {chunk}")
        assert torch.equal(got, engine_logits(plain_engine, token_ids, chunk))
    fp8_params = dict(fp8_engine.model.named_parameters())
    for name, param in plain_engine.model.named_parameters():
        assert torch.equal(fp8_params[name], param), name


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
        ({"weight_block_size": None}, "fp8 without weight_block_size"),
        ({"activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
    ],
)
def test_unsupported_quantization_is_a_load_error(fp8_pair, tmp_path, changes, message):
    folder = _with_config(fp8_pair[0], tmp_path / "model", **changes)
    with pytest.raises(UnsupportedQuantizationError, match=message):
        make_engine(folder)


def test_scale_shape_and_missing_scale_are_load_errors(fp8_pair, tmp_path):
    folder = _with_config(fp8_pair[0], tmp_path / "wrong_block", weight_block_size=[32, 32])
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape .* in 32x32 blocks needs"):
        make_engine(folder)
    folder = tmp_path / "no_scale"
    shutil.copytree(fp8_pair[0], folder)
    for path in folder.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(path)
        name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
        if name in tensors:
            del tensors[name]
            safetensors.torch.save_file(tensors, path)
            break
    with pytest.raises(ValueError, match=r"FP8 weights without a _scale_inv tensor: \[.*o_proj"):
        make_engine(folder)
