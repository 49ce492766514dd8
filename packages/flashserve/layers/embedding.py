"""Token embedding table and output head, split over the vocabulary under tensor parallel.

Not nn.Embedding: its constructor draws a random init, which on the meta
device imports torch's reference-op machinery (~140 MB of resident modules)
for values that are overwritten anyway.

Tensor parallel: rank r holds rows [r V/N, (r+1) V/N) of the table (and of an
untied lm_head). The embedding looks up the ids in its range, zeros the
others and sums over the ranks; the head computes its vocabulary slice of the
logits and rank 0 gathers the slices (only rank 0 samples).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.distributed.parallel_state import all_reduce, gather_last_dim, tensor_parallel
from flashserve.layers import cpu_linear
from flashserve.layers.linear import copy_into, split_evenly


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = tensor_parallel()
        self.tp_size = self.tp.size
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_part = split_evenly(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.empty(self.vocab_part, hidden_size))
        if self.tp_size > 1:
            self.weight.weight_loader = self.load_rows

    def load_rows(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> int:
        if shard_id is not None:
            raise ValueError(f"vocabulary table has no shard {shard_id!r}")
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(
                f"checkpoint tensor has {loaded.shape[0]} vocabulary rows, "
                f"the model expects {self.vocab_size}"
            )
        return copy_into(
            param.data, loaded.narrow(0, self.vocab_start, self.vocab_part), "vocabulary rows"
        )

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_part)
        out = F.embedding(local.masked_fill(~inside, 0), self.weight)
        out.masked_fill_(~inside.unsqueeze(-1), 0)
        return all_reduce(out, self.tp)


class LMHead(VocabEmbedding):
    """An untied output projection: split over the vocabulary as the embedding is
    (its logits come from `vocab_logits`)."""


def vocab_logits(hidden: torch.Tensor, table: VocabEmbedding, native: bool = False) -> torch.Tensor:
    """fp32 logits over the whole vocabulary on rank 0 (this rank's slice elsewhere); native:
    in the weights' dtype. The ranks gather in that dtype whichever each asks for."""
    logits = gather_last_dim(cpu_linear.linear(hidden, table.weight), table.tp)
    return logits if native else logits.float()
