"""The decode graphs' plan, checked on the CPU: buckets, static inputs, and the
fixed-shape forward pass (run eagerly here) against the engine's eager path.

Capture and replay themselves need CUDA: tests/test_gpu.py.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine import cuda_graphs
from flashserve.engine.cuda_graphs import (
    DecodeGraphs,
    batch_buckets,
    smallest_bucket,
    table_buckets,
)
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from flashserve.layers.attention import AttentionMetadata, TorchAttention
from tests.engine_harness import computed_but_last, run_greedy
from tests.tiny_models import save_tiny_llama

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


def make_engine(model_dir, graphs: int | None = None, **overrides) -> LLMEngine:
    """A CPU engine; graphs=N sets up the decode graphs' static inputs for batches up to N."""
    settings = dict(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=1024)
    settings.update(overrides)
    engine = LLMEngine(EngineConfig(**settings), model_dir)
    if graphs is not None:
        assert engine.runner.enable_decode_graphs(graphs, capture=False)
    return engine


def decoding(engine: LLMEngine, lengths: list[int], seed: int = 0) -> list[Sequence]:
    """Sequences whose prompts sit in the KV cache, each with one token left to compute."""
    rng = random.Random(seed)
    return [
        computed_but_last(
            engine,
            Sequence(f"s{i}", [rng.randrange(3, VOCAB) for _ in range(n)], SamplingParams()),
        )
        for i, n in enumerate(lengths)
    ]


# -- buckets -------------------------------------------------------------------


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    full = batch_buckets(256)
    assert full[:5] == [1, 2, 4, 8, 16] and full[-1] == 256 and len(full) == 3 + 32
    assert all(b % 8 == 0 for b in full[3:])
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_table_buckets():
    # torch backend: 256 tokens' worth of blocks, doubled, ending at the widest table.
    assert table_buckets(128, 16, True) == [16, 32, 64, 128]
    assert table_buckets(100, 16, True) == [16, 32, 64, 100]
    assert table_buckets(4, 16, True) == [4]
    assert table_buckets(8, 256, True) == [1, 2, 4, 8]
    # flash_attn reads cache_seqlens tokens only: one width.
    assert table_buckets(8, 256, False) == [8]


def test_smallest_bucket():
    buckets = batch_buckets(64)
    assert [smallest_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 17, 64)] == [
        1, 2, 4, 8, 8, 16, 24, 64,
    ]  # fmt: skip
    assert smallest_bucket(buckets, 65) is None


def test_cpu_engine_ignores_cuda_graphs(model_dir, caplog):
    with caplog.at_level("INFO", logger="flashserve.engine.startup"):
        engine = make_engine(model_dir, cuda_graphs=True)
    assert engine.runner.graphs is None
    assert "cuda_graphs: ignored on cpu" in caplog.text


def test_scratch_block_lies_outside_the_block_managers_blocks(model_dir):
    engine = make_engine(model_dir)
    num_blocks = engine.block_manager.num_blocks
    assert engine.runner.scratch_block == num_blocks
    assert all(k.shape[0] == v.shape[0] == num_blocks + 1 for k, v in engine.runner.kv_caches)
    assert engine.runner.max_blocks == 1024 // 16


def test_gather_limit_drops_wide_keys(model_dir, monkeypatch):
    # tiny model, fp32: a token's keys+values of one layer take 2 * 2 heads * 16 * 4 bytes.
    monkeypatch.setattr(cuda_graphs, "GATHER_BYTES_LIMIT", 8 * 32 * 16 * 256)
    graphs = make_engine(model_dir, graphs=16).runner.graphs
    assert graphs.table_widths == [16, 32, 64]
    assert (8, 32) in graphs.keys and (8, 64) not in graphs.keys and (16, 32) not in graphs.keys
    assert (16, 16) in graphs.keys


# -- static inputs ---------------------------------------------------------------


def test_prepare_pads_rows_to_the_bucket(model_dir):
    engine = make_engine(model_dir, graphs=8)
    graphs = engine.runner.graphs
    seqs = decoding(engine, [5, 40, 300])
    batch = graphs.prepare([(s, 1) for s in seqs])
    assert batch is not None
    assert batch.key == (4, 32)  # 3 rows -> bucket 4; 300 tokens = 19 blocks -> width 32
    assert batch.num_rows == 3 and batch.sample_rows == [0, 1, 2] and batch.sampled == seqs
    scratch = engine.runner.scratch_block
    ids, pos = graphs.input_ids[:4].tolist(), graphs.positions[:4].tolist()
    assert ids == [s.token_ids[-1] for s in seqs] + [0]
    assert pos == [4, 39, 299, 0]
    slots = graphs.slot_mapping[:4].tolist()
    for seq, slot in zip(seqs, slots):
        p = seq.num_computed_tokens
        assert slot == seq.block_ids[p // 16] * 16 + p % 16
    assert slots[3] == scratch * 16
    assert graphs.context_lens[:4].tolist() == [5, 40, 300, 1]
    tables = graphs.block_tables[:4, :32].tolist()
    for seq, row in zip(seqs, tables):
        n = len(seq.block_ids)
        assert row[:n] == seq.block_ids and row[n:] == [scratch] * (32 - n)
    assert tables[3] == [scratch] * 32
    assert scratch not in [b for s in seqs for b in s.block_ids]


def test_prepare_leaves_mixed_and_oversized_steps_to_the_eager_path(model_dir):
    engine = make_engine(model_dir, graphs=4)
    graphs = engine.runner.graphs
    seqs = decoding(engine, [7, 9, 11, 13, 15])
    assert graphs.prepare([]) is None
    assert graphs.prepare([(seqs[0], 1), (seqs[1], 2)]) is None  # not pure decode
    assert graphs.prepare([(s, 1) for s in seqs]) is None  # 5 rows > 4
    assert graphs.prepare([(s, 1) for s in seqs[:4]]).key == (4, 16)
    # A context longer than the widest table (cannot happen through the scheduler).
    graphs.table_widths = [16]
    long = decoding(engine, [300])[0]
    assert graphs.prepare([(long, 1)]) is None


def test_prepare_marks_rows_that_do_not_end_their_sequence(model_dir):
    engine = make_engine(model_dir, graphs=4)
    seq = Sequence("p", list(range(3, 30)), SamplingParams())
    assert engine.block_manager.allocate(seq, 10)
    engine.runner.forward([(seq, 9)])
    seq.num_computed_tokens = 9  # a one-token prompt chunk, not the last token
    batch = engine.runner.graphs.prepare([(seq, 1)])
    assert batch.key == (1, 16) and batch.sample_rows == [] and batch.sampled == []


# -- fixed-shape attention and forward -------------------------------------------


def test_fixed_shape_torch_decode_matches_the_eager_decode():
    gen = torch.Generator().manual_seed(0)
    num_blocks, bs, kv_heads, heads, dim = 40, 16, 2, 6, 32
    scratch = num_blocks
    k_cache = torch.randn(num_blocks + 1, bs, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks + 1, bs, kv_heads, dim, generator=gen)
    lens = [1, 17, 64, 100, 33]
    owned = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for n in lens:
        blocks = [owned.pop() for _ in range(-(-n // bs))]
        tables.append(blocks)
        slots.append(blocks[(n - 1) // bs] * bs + (n - 1) % bs)
    rows = len(lens)
    q = torch.randn(rows, heads, dim, generator=gen)
    k = torch.randn(rows, kv_heads, dim, generator=gen)
    v = torch.randn(rows, kv_heads, dim, generator=gen)
    width = max(len(t) for t in tables)
    eager_meta = AttentionMetadata(
        num_decode_tokens=rows,
        cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=1,
        max_context_len=max(lens),
        query_lens_host=[1] * rows,
        context_lens_host=lens,
    )
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = TorchAttention().forward(q, k, v, eager_k, eager_v, eager_meta, dim**-0.5)

    # The same rows padded to a bucket of 8 and a table of 16 blocks, padding on scratch.
    bucket, wide = 8, 16
    pad = bucket - rows
    fixed_meta = AttentionMetadata(
        num_decode_tokens=bucket,
        cu_seqlens_q=torch.arange(bucket + 1, dtype=torch.int32),
        context_lens=torch.tensor(lens + [1] * pad, dtype=torch.int32),
        slot_mapping=torch.tensor(slots + [scratch * bs] * pad),
        block_tables=torch.tensor(
            [t + [scratch] * (wide - len(t)) for t in tables] + [[scratch] * wide] * pad,
            dtype=torch.int32,
        ),
        max_query_len=1,
        max_context_len=wide * bs,
        query_lens_host=[],
        context_lens_host=[],
        fixed_shape_decode=True,
    )

    def padded(x):
        return torch.cat([x, torch.randn(pad, *x.shape[1:], generator=gen)])

    fixed_k, fixed_v = k_cache.clone(), v_cache.clone()
    got = TorchAttention().forward(
        padded(q), padded(k), padded(v), fixed_k, fixed_v, fixed_meta, dim**-0.5
    )
    assert got.shape == (bucket, heads, dim)
    torch.testing.assert_close(got[:rows], expected, rtol=1e-5, atol=1e-5)
    # Real rows wrote the same cache slots; padding rows wrote only the scratch block.
    torch.testing.assert_close(fixed_k[:num_blocks], eager_k[:num_blocks], rtol=0, atol=0)
    torch.testing.assert_close(fixed_v[:num_blocks], eager_v[:num_blocks], rtol=0, atol=0)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("whole_table", [True, False])
def test_static_forward_gives_the_eager_logits(model_dir, whole_table):
    engine = make_engine(model_dir)
    runner = engine.runner
    # whole_table=False lays out the inputs as for flash_attn (one full-width table).
    runner.model.layers[0].self_attn.backend.decode_reads_whole_table = whole_table
    try:
        assert runner.enable_decode_graphs(16, capture=False)
    finally:
        del runner.model.layers[0].self_attn.backend.decode_reads_whole_table
    graphs = runner.graphs
    assert graphs.table_widths == ([16, 32, 64] if whole_table else [64])
    seqs = decoding(engine, [1, 3, 16, 17, 33, 120, 250, 511, 2, 64, 65])  # 11 rows -> 16
    items = [(s, 1) for s in seqs]
    hidden, rows, sampled = runner.forward(items)
    assert graphs.runs == 1 and hidden.shape[0] == len(seqs)
    runner.use_graphs = False
    eager_hidden, eager_rows, eager_sampled = runner.forward(items)
    assert graphs.runs == 1
    assert rows == eager_rows == list(range(len(seqs))) and sampled == eager_sampled == seqs
    logits = runner.model.compute_logits(hidden)
    eager_logits = runner.model.compute_logits(eager_hidden)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_batch", [8, 4])
def test_generation_through_static_inputs_equals_eager(model_dir, max_batch):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 64, 130, 301, 9, 40)]
    max_tokens = [4, 14, 6, 12, 8, 10, 16]
    eager = run_greedy(make_engine(model_dir, cuda_graphs=False), prompts, max_tokens)
    # 15 decode steps of 7, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1 rows. max_batch 8:
    # all through the static inputs (7 -> 8, 3 -> 4 ...); max_batch 4: the first 7 eagerly.
    engine = make_engine(model_dir, graphs=max_batch)
    assert run_greedy(engine, prompts, max_tokens) == eager
    assert engine.runner.graphs.runs == (15 if max_batch == 8 else 8)
    assert engine.block_manager.num_used_blocks == 0


def test_generation_with_a_gather_limit_equals_eager(model_dir, monkeypatch):
    # (batch, width) pairs with batch * width > 64 are not captured: 3 rows with a
    # 500-token context (table width 32) run eagerly, then 2 and 1 rows use the graphs.
    monkeypatch.setattr(cuda_graphs, "GATHER_BYTES_LIMIT", 64 * 16 * 256)
    rng = random.Random(6)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (20, 500, 250)]
    max_tokens = [4, 12, 8]
    eager = run_greedy(make_engine(model_dir, cuda_graphs=False), prompts, max_tokens)
    engine = make_engine(model_dir, graphs=4)
    assert (4, 32) not in engine.runner.graphs.keys and (2, 32) in engine.runner.graphs.keys
    assert run_greedy(engine, prompts, max_tokens) == eager
    assert engine.runner.graphs.runs == 12 - 4


# -- capture and replay, with a stand-in for torch.cuda's graphs ---------------------


class FakeGraph:
    """Replays what was captured by running it again into the captured output tensor."""

    capturing: FakeGraph | None = None

    def __init__(self) -> None:
        self.run = None
        self.out = None

    def replay(self) -> None:
        self.out.copy_(self.run())


@contextlib.contextmanager
def fake_capture(graph, pool=None):
    FakeGraph.capturing = graph
    try:
        yield
    finally:
        FakeGraph.capturing = None


def test_capture_and_replay_with_a_fake_graph(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (0, 0))
    captured = []
    forward_static = DecodeGraphs.forward_static

    def recording(self, rows, width):
        out = forward_static(self, rows, width)
        graph = FakeGraph.capturing
        if graph is not None:
            captured.append((rows, width))
            graph.run, graph.out = (lambda: forward_static(self, rows, width)), out
        return out

    monkeypatch.setattr(DecodeGraphs, "forward_static", recording)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 260, 33)]
    max_tokens = [3, 9, 6]
    eager = run_greedy(make_engine(model_dir, cuda_graphs=False), prompts, max_tokens)

    engine = make_engine(model_dir)
    caches = [(k.clone(), v.clone()) for k, v in engine.runner.kv_caches]
    assert engine.runner.enable_decode_graphs(4)
    graphs = engine.runner.graphs
    assert graphs.captured and captured == sorted(graphs.keys, reverse=True)
    scratch = engine.runner.scratch_block
    for (k, v), (k0, v0) in zip(engine.runner.kv_caches, caches):
        # Capturing (and its warm-up runs) wrote into the scratch block only.
        assert torch.equal(k[:scratch], k0[:scratch]) and torch.equal(v[:scratch], v0[:scratch])
        assert not torch.equal(k[scratch], k0[scratch])
    assert run_greedy(engine, prompts, max_tokens) == eager
    assert graphs.replays == graphs.runs == 8
