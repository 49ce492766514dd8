"""Paged attention over the engine's KV cache, behind one interface.

A step's batch is one flat run of tokens: the decoding sequences first (one
token each), then the prefill chunks. Each layer writes its new keys/values
into the paged cache (`slot_mapping`) and attends over everything the cache
holds for the sequence (`block_tables`, `context_lens`).

Two backends compute the same thing:
- `flash_attn`: varlen kernel reading the paged cache directly (CUDA only).
- `torch`: scaled_dot_product_attention; runs everywhere, including CPU. On
  the CPU its decode rows go to cpu_decode_attention's kernel, which reads the
  paged cache in place (SDPA over gathered blocks where that cannot run).

A decode step replayed from a CUDA graph (engine/cuda_graphs.py) passes
metadata with `fixed_shape_decode` set: one token per row, every tensor of a
fixed shape, no host copies, so nothing may depend on host values. Its rows
attend over all `block_tables.shape[1]` blocks of their table, masked to
`context_lens`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashserve.layers import cpu_decode_attention, cpu_elementwise

logger = logging.getLogger(__name__)

_CAPTURABLE_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    num_decode_tokens: int  # the first rows of the batch, one token per sequence
    cu_seqlens_q: torch.Tensor  # int32 [S+1] prefix sums of new tokens per sequence
    context_lens: torch.Tensor  # int32 [S] tokens in cache after this step, per sequence
    slot_mapping: torch.Tensor  # int64 [T] cache slot of each new token
    block_tables: torch.Tensor  # int32 [S, max_blocks], padded with 0
    max_query_len: int
    max_context_len: int
    # Host copies, so the torch backend never syncs with the device to loop
    # (empty in a fixed-shape decode step).
    query_lens_host: list[int]
    context_lens_host: list[int]
    # Every row is one decoding token and every tensor has a fixed shape (a
    # CUDA graph's static inputs): attend over all columns of block_tables.
    fixed_shape_decode: bool = False
    # The torch backend's CPU rows for the paged kernel, built by the first layer of a step
    # (every layer reads the same ones).
    cpu_query_rows: Any = None
    # The decode path's (shape, mask): the same for every layer of a step, built once.
    decode_mask: Any = None


class AttentionBackend:
    name = "base"
    # Whether a fixed-shape decode's cost grows with the block table's width.
    decode_reads_whole_table = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        raise NotImplementedError


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store this step's keys/values. Cache layout: [blocks, block_size, kv_heads, head_dim]."""
    if cpu_elementwise.store_kv(k, v, k_cache, v_cache, slots):
        return
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


# CPU: prompt chunks of at most this many queries attend through the paged decode kernel,
# one row per query (speculative verification is k + 1 queries)...
SHORT_CHUNK = 16
# ... and so do longer chunks whose context's keys and values (one sequence, this rank's
# KV heads) take at most this many bytes: each query then reads them from the caches.
# A position's attention is then a decode's, bit for bit, however the prompt was chunked
# or recomputed (seeded requests keep their tokens under load and preemption). In bf16 it
# also outruns SDPA, whose bf16 products go through MKL's slow path on AMD CPUs. Beyond
# it every query would read the context from memory again: SDPA.
PER_QUERY_MAX_KV_BYTES = 4 << 20


class TorchAttention(AttentionBackend):
    """SDPA over keys gathered from the paged cache.

    Decodes are batched into one call (padded to the longest context, masked);
    each prefill chunk is its own call because its causal offset differs. On the
    CPU the paged kernel takes the decodes and, one row per query, every chunk of
    at most SHORT_CHUNK queries (speculative verifications, short prompt chunks) or
    whose context's keys and values fit PER_QUERY_MAX_KV_BYTES (a prompt of a few
    thousand tokens).
    A fixed-shape decode step (a CUDA graph) reads every block of its table.
    """

    name = "torch"
    # A fixed-shape decode reads every column of the block table, so the graphs
    # are also keyed by table width (engine/cuda_graphs.py).
    decode_reads_whole_table = True

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.fixed_shape_decode:
            args = (q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
            if not q.is_cuda:
                max_context = meta.block_tables.shape[1] * k_cache.shape[1]
                return _cpu_decode(*args, max_context)
            # This runs once, while a CUDA graph captures it: keep SDPA to kernels
            # that capture cleanly (torch may otherwise pick cuDNN for a masked call).
            with sdpa_kernel(_CAPTURABLE_SDPA):
                return _paged_decode(*args, meta)
        num_decode = meta.num_decode_tokens
        if num_decode == q.shape[0] and not q.is_cuda:  # decodes alone: one kernel call
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        starts = _prefix_sums(meta.query_lens_host)
        chunks = range(num_decode, len(meta.query_lens_host))
        if not q.is_cuda and _cpu_rows_per_query(q, k_cache, v_cache, meta, scale, starts, out):
            longest = _per_query_max_context(k_cache)
            chunks = [i for i in chunks if not _per_query(meta, i, longest)]
        elif num_decode:
            out[:num_decode] = self._decode(q[:num_decode], k_cache, v_cache, meta, scale)
        for i in chunks:
            start, q_len = starts[i], meta.query_lens_host[i]
            ctx = meta.context_lens_host[i]
            if q_len == ctx:  # nothing cached before this chunk: attend over it directly
                keys, values = k[start : start + q_len], v[start : start + q_len]
            else:
                keys, values = _gather(k_cache, v_cache, meta.block_tables[i], ctx)
            out[start : start + q_len] = _attend(q[start : start + q_len], keys, values, ctx, scale)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        n = q.shape[0]
        blocks_needed = -(-meta.max_context_len // k_cache.shape[1])
        tables = meta.block_tables[:n, :blocks_needed]
        args = (q, k_cache, v_cache, tables, meta.context_lens[:n], scale)
        if q.is_cuda:
            return _paged_decode(*args, meta)
        return _cpu_decode(*args, meta.max_context_len)


def _cpu_rows_per_query(q, k_cache, v_cache, meta, scale, starts, out) -> bool:
    """Decodes and every chunk _per_query takes in one paged-kernel call.

    The chunk's keys are already in the cache (write_kv), so each of its queries
    is a decode row over the context up to its own position: a speculative
    verification or a short prompt chunk then reads the cache in place, batched
    with the step's decodes, and each position's arithmetic is that of a decode
    at that position. False (nothing written) where the kernel does not run.
    """
    if meta.cpu_query_rows is None:  # the same rows for every layer: built once a step
        meta.cpu_query_rows = _query_rows(meta, starts, k_cache)
    plan = meta.cpu_query_rows
    if plan is False:
        return False
    index, tables, lens, max_context = plan
    rows = cpu_decode_attention.paged_decode(
        q.index_select(0, index), k_cache, v_cache, tables, lens, scale, max_context
    )
    if rows is None:
        return False
    out.index_copy_(0, index, rows)
    return True


def _per_query_max_context(k_cache: torch.Tensor) -> int:
    """The longest context a chunk of more than SHORT_CHUNK queries attends one row per
    query at (the cache is [blocks, block_size, kv_heads, head_dim])."""
    token_bytes = 2 * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    return PER_QUERY_MAX_KV_BYTES // token_bytes


def _per_query(meta, i: int, max_context: int) -> bool:
    """Whether prompt chunk i attends one row per query through the paged kernel."""
    return meta.query_lens_host[i] <= SHORT_CHUNK or meta.context_lens_host[i] <= max_context


def _query_rows(meta, starts, k_cache):
    """(token index, block tables, context lens, max context) of the decode rows and one row
    per query of each chunk _per_query takes; False when there are none."""
    block_size, longest = k_cache.shape[1], _per_query_max_context(k_cache)
    tokens, table_rows, lens = list(range(meta.num_decode_tokens)), [], []
    table_rows.extend(tokens)
    lens.extend(meta.context_lens_host[: meta.num_decode_tokens])
    for i in range(meta.num_decode_tokens, len(meta.query_lens_host)):
        q_len, ctx = meta.query_lens_host[i], meta.context_lens_host[i]
        if _per_query(meta, i, longest):
            tokens.extend(range(starts[i], starts[i] + q_len))
            table_rows.extend([i] * q_len)
            lens.extend(range(ctx - q_len + 1, ctx + 1))
    if not tokens:
        return False
    max_context = max(lens)
    tables = meta.block_tables[torch.tensor(table_rows), : -(-max_context // block_size)]
    return torch.tensor(tokens), tables, torch.tensor(lens, dtype=torch.int32), max_context


def _cpu_decode(q, k_cache, v_cache, tables, context_lens, scale, max_context):
    """The paged kernel reading the cache in place (cpu_decode_attention), else _paged_decode."""
    out = cpu_decode_attention.paged_decode(
        q, k_cache, v_cache, tables, context_lens, scale, max_context
    )
    return _paged_decode(q, k_cache, v_cache, tables, context_lens, scale) if out is None else out


def _paged_decode(q, k_cache, v_cache, tables, context_lens, scale, meta=None):
    """One query token per row over all blocks of its table row, masked to its context.

    Shapes depend only on q and tables, never on host values, so a CUDA graph
    can capture it. With the step's `meta`, the mask is built by the first layer only.
    """
    n, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q.is_cuda:
        # One vectorised gather kernel; index_select's kernel for few indices (a small
        # batch) is several times slower there (bench/gpu_decode_profile.py).
        keys, values = k_cache[tables], v_cache[tables]
    else:
        # index_select copies whole blocks; advanced indexing computes an offset per
        # element and is markedly slower on the CPU.
        blocks = tables.reshape(-1)
        keys, values = k_cache.index_select(0, blocks), v_cache.index_select(0, blocks)
    keys = keys.view(n, -1, kv_heads, head_dim).transpose(1, 2)
    values = values.view(n, -1, kv_heads, head_dim).transpose(1, 2)
    shape = (n, keys.shape[2])
    if meta is not None and meta.decode_mask is not None and meta.decode_mask[0] == shape:
        mask = meta.decode_mask[1]
    else:
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = positions[None, :] < context_lens[:, None]
        if meta is not None:
            meta.decode_mask = (shape, mask)
    # The query heads sharing a KV head act as that head's query rows, so
    # SDPA needs no enable_gqa: on the CPU its GQA path is several times
    # slower in bf16. Query head h reads KV head h // group, as in HF's repeat_kv.
    out = F.scaled_dot_product_attention(
        q.view(n, kv_heads, num_heads // kv_heads, head_dim).to(keys.dtype),
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return out.reshape(n, num_heads, head_dim).to(q.dtype)


def _prefix_sums(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


def _gather(k_cache, v_cache, table, ctx):
    block_size = k_cache.shape[1]
    blocks = table[: -(-ctx // block_size)]
    kv_heads, head_dim = k_cache.shape[-2:]
    keys = k_cache.index_select(0, blocks).view(-1, kv_heads, head_dim)[:ctx]
    values = v_cache.index_select(0, blocks).view(-1, kv_heads, head_dim)[:ctx]
    return keys, values


def _attend(q, keys, values, ctx, scale):
    """Causal attention of the last q_len positions over ctx keys."""
    q_len = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0).to(keys.dtype)  # [1, heads, q_len, d]
    kh = keys.transpose(0, 1).unsqueeze(0)
    vh = values.transpose(0, 1).unsqueeze(0)
    if q_len == ctx:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        # The chunk sits at the end of the context: query j sees keys up to ctx-q_len+j.
        rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out.squeeze(0).transpose(0, 1).to(q.dtype)


class FlashAttention(AttentionBackend):
    """flash-attn 2 varlen kernel reading keys/values straight from the paged cache.

    The cache must use a block size that is a multiple of 256 (flash-attn's
    paged-KV requirement); the engine picks 256 when this backend is active.
    """

    name = "flash_attn"
    # flash_attn_with_kvcache reads each row's cache_seqlens tokens only.
    decode_reads_whole_table = False

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.fixed_shape_decode or meta.max_query_len == 1:
            # Fixed shapes given fixed q and block_table: capturable in a CUDA graph.
            out = self._with_kvcache(
                q.unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=meta.context_lens,
                block_table=meta.block_tables,
                softmax_scale=scale,
                causal=True,
            )
            return out.squeeze(1)
        cu_seqlens_k = F.pad(meta.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=meta.cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_context_len,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables,
        )


# What flash-attn 2's paged kernels need (flash-attn 2.8.3): an Ampere or newer GPU,
# half-precision inputs, and a paged KV block size that is a multiple of 256.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_BLOCK_MULTIPLE = 256


def flash_attn_problems(
    device_type: str,
    dtype: torch.dtype,
    block_size: int | str,
    capability: tuple[int, int] | None,
    import_error: str | None,
) -> list[str]:
    """Why flash_attn cannot run with these settings (empty: it can).

    block_size "auto" becomes 256 with flash_attn, so it is never a problem.
    capability is the GPU's compute capability (None off CUDA).
    """
    problems = []
    if device_type != "cuda":
        problems.append(f"it needs a CUDA device, not {device_type}")
    elif capability is not None and tuple(capability) < FLASH_ATTN_MIN_CAPABILITY:
        problems.append(
            f"it needs compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
        )
    if dtype not in FLASH_ATTN_DTYPES:
        problems.append(
            f"it runs float16 or bfloat16 only, not {str(dtype).removeprefix('torch.')}"
        )
    if block_size != "auto" and int(block_size) % FLASH_ATTN_BLOCK_MULTIPLE:
        problems.append(
            f"its paged KV cache needs block_size a multiple of {FLASH_ATTN_BLOCK_MULTIPLE}, "
            f"not {block_size}"
        )
    if import_error is not None:
        problems.append(f"it does not import ({import_error})")
    return problems


def choose_backend(requested: str, problems: list[str]) -> str:
    """auto: flash_attn when nothing stands in its way, else torch; flash_attn: or fail."""
    if requested not in ("auto", "flash_attn", "torch"):
        raise ValueError(f"attention_backend must be auto, flash_attn or torch, not {requested!r}")
    if requested == "torch":
        return "torch"
    if not problems:
        return "flash_attn"
    if requested == "flash_attn":
        raise ValueError(
            "attention_backend: flash_attn cannot run here: "
            + "; ".join(problems)
            + ". Use attention_backend: auto or torch."
        )
    return "torch"


def select_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int | str = "auto",
) -> AttentionBackend:
    """The attention backend for these settings, with the reason logged at load.

    An explicit `flash_attn` that cannot run is a load error naming why.
    """
    problems: list[str] = []
    if requested != "torch":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        problems = flash_attn_problems(
            device.type, dtype, block_size, capability, _flash_attn_import_error()
        )
    choice = choose_backend(requested, problems)
    if choice == "flash_attn":
        logger.info("attention backend: flash_attn")
        return FlashAttention()
    if requested == "auto" and device.type == "cuda":
        logger.warning("attention backend: torch (SDPA), not flash_attn: %s", "; ".join(problems))
    else:
        logger.info("attention backend: torch (scaled_dot_product_attention) on %s", device.type)
    if device.type == "cpu":
        cpu_decode_attention.available()  # built now, at load, not in the first decode step
    return TorchAttention()


def _flash_attn_import_error() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
