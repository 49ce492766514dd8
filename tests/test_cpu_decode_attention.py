"""The CPU paged decode kernel computes what gather + SDPA computes, reading the cache in place."""

from __future__ import annotations

import logging

import pytest
import torch

from flashserve.layers import cpu_decode_attention, native
from flashserve.layers.attention import (
    AttentionMetadata,
    TorchAttention,
    _cpu_decode,
    _paged_decode,
    _prefix_sums,
)
from tests.portable_builds import without_avx512

BLOCK = 16
NUM_BLOCKS = 64


def _case(dtype, q_heads, kv_heads, head_dim, contexts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    width = max(-(-c // BLOCK) for c in contexts)
    # Each row owns scattered blocks, as the block manager hands them out; the
    # columns past a row's context point at block 0, as padded tables do.
    order = torch.randperm(NUM_BLOCKS, generator=gen)
    tables = torch.zeros((len(contexts), width), dtype=torch.int32)
    used = 0
    for row, ctx in enumerate(contexts):
        need = -(-ctx // BLOCK)
        tables[row, :need] = order[used : used + need]
        used += need
    q = torch.randn((len(contexts), q_heads, head_dim), generator=gen).to(dtype)
    lens = torch.tensor(contexts, dtype=torch.int32)
    return q, k_cache, v_cache, tables, lens


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    if not cpu_decode_attention.available():
        pytest.fail("the kernel does not build here (a C compiler is part of the dev setup)")


# Head sizes: 16-float vectors where AVX-512 is (16, 32, 64, 128, 192, 256; 16 and 48 are
# a bf16 half piece), 8-float ones for 8 and 24; one KV head per query head, and groups
# of 2, 3 (an odd group: a head summed alone) and 8.
SHAPES = [
    (4, 4, 16),
    (8, 2, 64),
    (8, 1, 32),
    (4, 2, 128),
    (3, 1, 192),
    (2, 1, 256),
    (6, 2, 48),
    (4, 2, 24),
    (2, 2, 8),
]
# One token, a few, exactly one block, one past a block (and past a 16-token tile),
# several blocks, a tile and a bit.
CONTEXTS = [1, 3, 16, 17, 40, 200, 7]
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def _check_against_sdpa(dtype, tol, q_heads, kv_heads, head_dim):
    q, k_cache, v_cache, tables, lens = _case(dtype, q_heads, kv_heads, head_dim, CONTEXTS)
    scale = head_dim**-0.5
    got = cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, scale, max(CONTEXTS))
    assert got is not None and got.dtype == dtype and got.shape == q.shape
    want = _paged_decode(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", TOLERANCES)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", SHAPES)
def test_matches_gather_and_sdpa(dtype, tol, q_heads, kv_heads, head_dim):
    _check_against_sdpa(dtype, tol, q_heads, kv_heads, head_dim)


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
    """The kernel built as for a CPU without AVX-512 (8-float vectors only)."""
    return without_avx512(cpu_decode_attention.KERNELS, tmp_path_factory.mktemp("portable"))


@pytest.mark.parametrize("dtype, tol", TOLERANCES)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(8, 2, 64), (3, 1, 192), (4, 2, 24)])
def test_the_build_without_avx512_matches_gather_and_sdpa(
    dtype, tol, q_heads, kv_heads, head_dim, portable_build, monkeypatch
):
    monkeypatch.setattr(cpu_decode_attention, "KERNELS", portable_build)
    _check_against_sdpa(dtype, tol, q_heads, kv_heads, head_dim)


@pytest.mark.parametrize("head_dim", [64, 24])  # 16-float vectors where AVX-512 is; 8-float
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_has_the_same_bits_alone_in_any_batch_and_with_any_thread_count(dtype, head_dim):
    # Nine rows on two threads run a row per task; one row alone, a KV head per task.
    contexts = [33, 5, 130, 64, 1, 16, 17, 90, 48]
    q, k_cache, v_cache, tables, lens = _case(dtype, 8, 2, head_dim, contexts, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, 130)
        torch.set_num_threads(1)
        for row in range(len(contexts)):
            alone = cpu_decode_attention.paged_decode(
                q[row : row + 1], k_cache, v_cache, tables[row : row + 1], lens[row : row + 1],
                0.125, contexts[row],
            )  # fmt: skip
            assert torch.equal(alone[0], batch[row])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_with_no_context_gets_zeros_and_leaves_the_others_alone(dtype):
    q, k_cache, v_cache, tables, lens = _case(dtype, 8, 2, 64, [0, 20, 3])
    got = cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, 20)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    want = _paged_decode(q[1:], k_cache, v_cache, tables[1:], lens[1:], 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[1:].float(), want.float(), atol=tol, rtol=tol)


def test_reads_queries_from_a_strided_view():
    """q arrives as a view into the fused qkv projection's output."""
    q, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 2, 16, [20, 3])
    fused = torch.cat([q.reshape(2, -1), torch.randn(2, 2 * 2 * 16)], dim=1)
    view = fused[:, : 4 * 16].view(2, 4, 16)
    assert not view.is_contiguous()
    got = cpu_decode_attention.paged_decode(view, k_cache, v_cache, tables, lens, 0.25, 20)
    want = cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, 0.25, 20)
    assert torch.equal(got, want)


def test_shapes_it_cannot_take_fall_back_to_the_torch_path():
    q, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 2, 12, [20, 9])
    assert cpu_decode_attention.unsupported(q, k_cache) == "head_dim 12 is not a multiple of 8"
    assert cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, 0.3, 20) is None
    got = _cpu_decode(q, k_cache, v_cache, tables, lens, 0.3, 20)
    torch.testing.assert_close(got, _paged_decode(q, k_cache, v_cache, tables, lens, 0.3))
    half = q.to(torch.float16)
    assert "dtype" in cpu_decode_attention.unsupported(half, k_cache.to(torch.float16))


def test_without_a_compiler_the_torch_path_serves_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_decode_attention, "KERNELS", cpu_decode_attention.KERNELS.fresh())
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("FLASHSERVE_KERNEL_CACHE", str(tmp_path))
    q, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 2, 16, [20, 9])
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert (
            cpu_decode_attention.paged_decode(q, k_cache, v_cache, tables, lens, 0.25, 20) is None
        )
    assert "no C compiler" in caplog.text
    got = _cpu_decode(q, k_cache, v_cache, tables, lens, 0.25, 20)
    torch.testing.assert_close(got, _paged_decode(q, k_cache, v_cache, tables, lens, 0.25))


def test_a_fresh_cache_directory_gets_its_own_build(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_decode_attention, "KERNELS", cpu_decode_attention.KERNELS.fresh())
    monkeypatch.setenv("FLASHSERVE_KERNEL_CACHE", str(tmp_path))
    assert cpu_decode_attention.available()
    # One library, and no partial file left beside it.
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("paged_decode-") and built.suffix == ".so"


@pytest.mark.parametrize(
    "dtype, kv_bytes_limit, kernel_takes",
    [
        (torch.float32, 0, [2 + 5 + 3]),
        (torch.float32, None, [2 + 5 + 3 + 20]),
        (torch.bfloat16, 0, [2 + 5 + 3]),
        (torch.bfloat16, None, [2 + 5 + 3 + 20]),
    ],
)
def test_chunks_join_the_decodes_one_row_per_query(
    monkeypatch, dtype, kv_bytes_limit, kernel_takes
):
    """A step of 2 decodes, a 5-query chunk after 30 cached tokens (a verification), a fresh
    3-token prompt and a 20-query chunk: the kernel's rows equal SDPA per chunk. Short
    chunks always take the kernel; a longer one where its context's KV is small enough."""
    from flashserve.layers import attention

    if kv_bytes_limit is not None:
        monkeypatch.setattr(attention, "PER_QUERY_MAX_KV_BYTES", kv_bytes_limit)
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim = 8, 2, 32
    query_lens, contexts = [1, 1, 5, 3, 20], [40, 9, 35, 3, 50]
    tables = torch.zeros((5, 4), dtype=torch.int32)
    for row, block in enumerate(torch.randperm(NUM_BLOCKS, generator=gen)[:20].tolist()):
        tables[row // 4, row % 4] = block
    cache_shape = (NUM_BLOCKS, BLOCK, kv_heads, head_dim)
    k_cache, v_cache = (
        torch.randn(cache_shape, generator=gen).to(dtype),
        torch.randn(cache_shape, generator=gen).to(dtype),
    )
    slots = []
    for row, (q_len, ctx) in enumerate(zip(query_lens, contexts)):
        for pos in range(ctx - q_len, ctx):
            slots.append(int(tables[row, pos // BLOCK]) * BLOCK + pos % BLOCK)
    tokens = sum(query_lens)
    q = torch.randn((tokens, heads, head_dim), generator=gen).to(dtype)
    k = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(dtype)
    v = torch.randn((tokens, kv_heads, head_dim), generator=gen).to(dtype)
    meta = AttentionMetadata(
        num_decode_tokens=2,
        cu_seqlens_q=torch.tensor([0, *_prefix_sums(query_lens)[1:], tokens], dtype=torch.int32),
        context_lens=torch.tensor(contexts, dtype=torch.int32),
        slot_mapping=torch.tensor(slots),
        block_tables=tables,
        max_query_len=max(query_lens),
        max_context_len=max(contexts),
        query_lens_host=query_lens,
        context_lens_host=contexts,
    )
    backend = TorchAttention()
    kernel_rows = []
    kernel = cpu_decode_attention.paged_decode

    def counted(q, *args):
        kernel_rows.append(q.shape[0])
        return kernel(q, *args)

    monkeypatch.setattr(cpu_decode_attention, "paged_decode", counted)
    got = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, head_dim**-0.5)
    assert kernel_rows == kernel_takes  # one call; what it leaves goes to SDPA
    monkeypatch.setattr(cpu_decode_attention, "enabled", False)
    want = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
