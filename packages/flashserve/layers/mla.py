"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) over a latent paged KV cache.

Each token's keys and values are compressed into one latent vector c (kv_lora_rank,
RMS-normed) plus one rotary key k_r (qk_rope_head_dim) shared by every head; the
cache keeps exactly [c | k_r] per token and layer (`LatentKVCacheSpec`). Per head h,
kv_b_proj expands c into the non-rotary key W_UK[h] c and the value W_UV[h] c.

- Prefill chunks decompress: the chunk's context latents go through kv_b_proj and
  standard causal attention runs over per-head keys [W_UK c | k_r] and values W_UV c
  (a chunk over a context too long to expand at once attends absorbed, as decode does).
- Decode rows absorb the projections instead: q_nope[h] . W_UK[h] c = (W_UK[h]^T
  q_nope[h]) . c, so each head's query becomes [W_UK[h]^T q_nope[h] | q_r[h]] and
  attends over the cached [c | k_r] directly, the latent doubling as the value; the
  output latent then goes through W_UV[h]. A decode step reads only the latent cache,
  as one key/value "head" shared by all query heads.

The decode works on fixed shapes when the metadata says so (a CUDA graph's static
inputs): it gathers every block of the table and masks past each context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashserve.layers.attention import AttentionBackend, AttentionMetadata

_CAPTURABLE_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Most bytes of per-head keys and values one prefill chunk may decompress (one layer).
DECOMPRESS_BYTES_LIMIT = 1 << 30


class LatentAttentionBackend(AttentionBackend):
    """What the engine needs to know of MLA's attention (it runs the same ops on any device).

    The decode gathers the whole block table in a fixed-shape step, so CUDA graphs
    are keyed by table width as with the torch backend (engine/cuda_graphs.py).
    """

    name = "mla-torch"
    decode_reads_whole_table = True


def write_latent(
    latent: torch.Tensor, rope_key: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store [c | k_r] of this step's tokens. Cache: [blocks, block_size, 1, latent + rope]."""
    entry = torch.cat([latent, rope_key], dim=-1).to(cache.dtype)
    cache.view(-1, cache.shape[-1]).index_copy_(0, slots, entry)


def gather_context(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """The first ctx cached [c | k_r] rows of one sequence: [ctx, latent + rope]."""
    block_size = cache.shape[1]
    blocks = table[: -(-ctx // block_size)]
    return cache.index_select(0, blocks).view(-1, cache.shape[-1])[:ctx]


def absorbed_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    latent_dim: int,
    scale: float,
) -> torch.Tensor:
    """One absorbed query per row ([n, heads, latent + rope]) over its cached latents.

    Returns the attention-weighted latents [n, heads, latent]. Shapes depend only
    on q and tables, so a CUDA graph can capture it.
    """
    n, heads, width = q.shape
    entries = cache.index_select(0, tables.reshape(-1)).view(n, 1, -1, width)
    mask = torch.arange(entries.shape[2], device=q.device)[None, :] < context_lens[:, None]
    # All query heads share the one latent "head": they are its query rows.
    out = F.scaled_dot_product_attention(
        q.view(n, 1, heads, width).to(entries.dtype),
        entries,
        entries[..., :latent_dim],
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return out.view(n, heads, latent_dim).to(q.dtype)


def absorbed_causal_attention(
    q: torch.Tensor, entries: torch.Tensor, latent_dim: int, scale: float
) -> torch.Tensor:
    """Absorbed queries [q_len, heads, latent + rope] of a chunk ending its context, over
    the context's cached rows [ctx, latent + rope]; returns latents [q_len, heads, latent].

    The heads are extra query rows of the one latent "head" (rows in (token, head)
    order), each token's rows sharing its causal mask.
    """
    q_len, heads, width = q.shape
    ctx = entries.shape[0]
    rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    mask = (torch.arange(ctx, device=q.device)[None, :] <= rows).repeat_interleave(heads, dim=0)
    out = F.scaled_dot_product_attention(
        q.reshape(1, 1, q_len * heads, width).to(entries.dtype),
        entries[None, None],
        entries[None, None, :, :latent_dim],
        attn_mask=mask,
        scale=scale,
    )
    return out.view(q_len, heads, latent_dim).to(q.dtype)


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """The last q_len positions of a context attending causally over all ctx keys.

    q [q_len, heads, dk], keys [ctx, heads, dk], values [ctx, heads, dv] -> [q_len, heads, dv].
    """
    q_len, ctx = q.shape[0], keys.shape[0]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q.to(keys.dtype), keys, values))
    if q_len == ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.squeeze(0).transpose(0, 1).to(q.dtype)


class LatentAttentionOps:
    """The cache-facing half of one MLA layer: store latents, attend for prefill and decode.

    The layer owns the projections and hands in callables that expand latents into
    per-head keys and values (`decompress`) and its absorbed weights.
    """

    def __init__(self, latent_dim: int, rope_dim: int, scale: float) -> None:
        self.latent_dim = latent_dim
        self.rope_dim = rope_dim
        self.scale = scale

    def decode(
        self, q_absorbed: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Latent outputs [n, heads, latent] of the decode rows (the first n of the batch)."""
        if meta.fixed_shape_decode:
            args = (q_absorbed, cache, meta.block_tables, meta.context_lens)
            if not q_absorbed.is_cuda:
                return absorbed_decode(*args, self.latent_dim, self.scale)
            with sdpa_kernel(_CAPTURABLE_SDPA):  # capture-safe kernels only
                return absorbed_decode(*args, self.latent_dim, self.scale)
        n = q_absorbed.shape[0]
        blocks_needed = -(-meta.max_context_len // cache.shape[1])
        tables = meta.block_tables[:n, :blocks_needed]
        return absorbed_decode(
            q_absorbed, cache, tables, meta.context_lens[:n], self.latent_dim, self.scale
        )

    def decompress_chunk(self, ctx: int, heads: int, per_head: int, itemsize: int) -> bool:
        """Whether a prefill chunk over ctx tokens should expand its context's keys and values.

        Decompressing costs ctx x heads x (qk + v) values at once; past
        DECOMPRESS_BYTES_LIMIT (long cached contexts) the chunk attends absorbed, over
        the latents, as decode does: more FLOPs, no per-head copy of the context.
        """
        return ctx * heads * per_head * itemsize <= DECOMPRESS_BYTES_LIMIT

    def prefill_context(
        self,
        cache: torch.Tensor,
        meta: AttentionMetadata,
        index: int,
        new_latent: torch.Tensor,
        new_rope_key: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [ctx, latent], rope keys [ctx, rope]) the index-th chunk attends over.

        A chunk with nothing cached before it uses its own fresh rows (no gather).
        """
        q_len, ctx = meta.query_lens_host[index], meta.context_lens_host[index]
        if q_len == ctx:
            return new_latent, new_rope_key
        entries = gather_context(cache, meta.block_tables[index], ctx)
        return entries[:, : self.latent_dim], entries[:, self.latent_dim :]
