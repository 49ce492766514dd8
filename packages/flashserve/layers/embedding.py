"""Token embedding table (an uninitialised parameter: the checkpoint fills it).

Not nn.Embedding: its constructor draws a random init, which on the meta
device imports torch's reference-op machinery (~140 MB of resident modules)
for values that are overwritten anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)
