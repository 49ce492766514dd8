"""A weight's copy in a kernel's layout, made at its first product and kept on the weight.

The CPU linear kernels read weights in a packed order (oneDNN's blocked layout,
packed_gemm's panels). Packing at every call costs a decode step about as much as
the product, so the copy is kept as an attribute of the weight tensor and made again
only when the weight is replaced or changed in place (its data pointer or version).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kept_copy(
    weight: torch.Tensor, attribute: str, make: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """make(weight), made once per weight and again after an in-place change."""
    stamp = (weight.data_ptr(), _version(weight))
    cached = getattr(weight, attribute, None)
    if cached is None or cached[0] != stamp:
        cached = (stamp, make(weight.detach()))
        setattr(weight, attribute, cached)
    return cached[1]


def _version(weight: torch.Tensor) -> int:
    try:
        return weight._version
    except RuntimeError:  # an inference tensor has no version counter: only a new one is seen
        return -1
