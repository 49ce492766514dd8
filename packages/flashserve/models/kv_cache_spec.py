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

    def token_layout(self, dtype: torch.dtype) -> str:
        """One token's entry in one layer, in words (the start-up log)."""
        return (
            f"{self.token_bytes(dtype)} B: K and V, {self.num_kv_heads} heads x {self.head_dim} "
            f"{str(dtype).removeprefix('torch.')}"
        )

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


@dataclass(frozen=True)
class LatentKVCacheSpec(KVCacheSpec):
    """Multi-head latent attention: per token and layer one latent vector and one
    rotary key, shared by every head (layers/mla.py), stored once as [latent | rope].

    Built with `LatentKVCacheSpec.of(latent_dim, rope_dim, kv_layers)`: as a
    `KVCacheSpec` it is one KV "head" of latent + rope dims whose value is the
    key's latent part, not a second tensor.
    """

    rope_dim: int = 0

    @classmethod
    def of(cls, latent_dim: int, rope_dim: int, kv_layers: tuple[int, ...]) -> LatentKVCacheSpec:
        return cls(1, latent_dim + rope_dim, kv_layers, rope_dim)

    @property
    def latent_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def token_bytes(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.head_dim * itemsize

    def token_layout(self, dtype: torch.dtype) -> str:
        return (
            f"{self.token_bytes(dtype)} B: latent {self.latent_dim} + rope key {self.rope_dim} "
            f"{str(dtype).removeprefix('torch.')}, shared by all heads"
        )

    def allocate(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        """Per layer ([blocks, block_size, 1, latent + rope], its latent part as a view)."""
        caches = []
        for _ in self.kv_layers:
            entries = torch.zeros(
                (num_blocks, block_size, 1, self.head_dim), dtype=dtype, device=device
            )
            caches.append((entries, entries[..., : self.latent_dim]))
        return caches
