"""Loading a checkpoint peaks below 1.3x its bf16 weight bytes in process memory.

The load runs in a fresh interpreter: after imports its peak-RSS mark is
reset (/proc/self/clear_refs), so the peak read afterwards (VmHWM) is the
load's own. The checkpoint is one bf16 safetensors file of a Qwen3-MoE
model, written by transformers' save_pretrained (per-expert tensors), the
case where a memory-mapped read would hold the whole file beside the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import gc, json, sys
import torch
from flashserve.layers.attention import select_backend
from flashserve.models.loader import load_model
from flashserve.models.model_config import ModelConfig

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

path = sys.argv[1]
device = torch.device("cpu")
cfg = ModelConfig.from_pretrained(path)
backend = select_backend("torch", device, torch.bfloat16, 16)
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark to the current RSS
model = load_model(path, cfg, backend, torch.bfloat16, device, 256)
peak = status("VmHWM")
weights = sum(p.numel() * 2 for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"before": before, "peak": peak, "weight_bytes": weights, "dtypes": dtypes}))
"""


@pytest.fixture(scope="module")
def bf16_moe_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bf16-qwen3-moe")
    config = transformers.Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) == 1
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_load_peaks_below_1_3x_bf16_weight_bytes(bf16_moe_checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(bf16_moe_checkpoint)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    weight_bytes = report["weight_bytes"]
    assert weight_bytes > 100e6  # large next to the interpreter's own noise
    assert report["dtypes"] == ["torch.bfloat16"]
    growth = report["peak"] - report["before"]
    assert growth <= 1.3 * weight_bytes, (
        f"load peaked {growth / 1e6:.0f} MB above its start for "
        f"{weight_bytes / 1e6:.0f} MB of bf16 weights ({growth / weight_bytes:.2f}x)"
    )
