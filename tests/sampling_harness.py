"""A tiny random Llama engine (VOCAB ids) and the helpers the sampling tests share."""

from __future__ import annotations

import random

import torch

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence

VOCAB = 512
TINY_EOS = 2


def make_engine(model_dir) -> LLMEngine:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=512)
    return LLMEngine(config, model_dir)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            outputs[out.request_id].append(out)
    return tokens, outputs


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.choice([4, 9, 23]))] for _ in range(count)]


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    return Sequence("r", list(prompt), SamplingParams(**params), token_ids=prompt + output)


def contains_run(tokens: list[int], run: tuple[int, ...]) -> bool:
    k = len(run)
    return any(tuple(tokens[i : i + k]) == run for i in range(len(tokens) - k + 1))


def logit_shapes(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Logits of four kinds: peaked; flat (a nucleus of thousands of tokens: it does
    not fit in the best 1024); bfloat16-quantised (many tokens tie at any cut-off);
    constant (every token ties)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "peaked": torch.randn(vocab, generator=g) * 5,
        "flat": torch.randn(vocab, generator=g) * 0.5,
        "ties": (torch.randn(vocab, generator=g) * 2).bfloat16().float(),
        "constant": torch.zeros(vocab),
    }


def mixed_batch(vocab: int, seed: int, top_ps, min_ps, top_ks, shapes=None):
    """Every shape (or those named) under every setting, one row each, in one batch."""
    rows, settings = [], []
    for name, logits in logit_shapes(vocab, seed).items():
        if shapes is not None and name not in shapes:
            continue
        for tp in top_ps:
            for mp in min_ps:
                for k in top_ks:
                    rows.append(logits)
                    settings.append(SamplingParams(temperature=1.0, top_p=tp, min_p=mp, top_k=k))
    return torch.stack(rows), settings
