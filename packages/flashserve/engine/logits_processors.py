"""Per-request edits of the next-token logits, applied batch-wide.

Each processor runs only on the rows of requests that ask for it, as one
tensor operation over those rows.
"""

from __future__ import annotations

import torch

from flashserve.engine.sequence import Sequence


def apply_logits_processors(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    _mask_stop_tokens_until_min(logits, seqs, eos_token_ids)
    return logits


def _mask_stop_tokens_until_min(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
) -> None:
    """EOS and stop tokens are impossible until min_tokens have been produced."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")
