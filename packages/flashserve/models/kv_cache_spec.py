"""What a model needs the engine's KV cache to hold.

A model declares this (`CausalLM.kv_cache_spec`); the runner allocates the
cache from it and sizes the block budget by it, and never looks inside the
model's layers. Standard attention holds one key and one value tensor per
layer with KV. A model with another layout (a compressed latent per token,
say) declares a subclass with its own `allocate` and `token_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVCacheSpec:
    num_kv_heads: int
    head_dim: int
    # Indices of the decoder layers that keep keys and values, in the order
    # the model's forward takes their caches (all of them for standard models).
    kv_layers: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.kv_layers)

    def token_bytes(self, dtype: torch.dtype) -> int:
        """Bytes one token occupies in one layer's cache."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_kv_heads * self.head_dim * itemsize

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.num_layers * block_size * self.token_bytes(dtype)

    def allocate(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        """One (keys, values) pair per KV layer, each [num_blocks, block_size, heads, head_dim]."""
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in self.kv_layers
        ]
