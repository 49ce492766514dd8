"""A tiny random Llama engine (VOCAB ids) and the helpers the sampling tests share."""

from __future__ import annotations

import random

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
