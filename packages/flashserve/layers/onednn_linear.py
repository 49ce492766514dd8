"""bf16 linear products on the CPU through oneDNN, each weight packed once.

torch's F.linear hands oneDNN the plain [out, in] weight, and oneDNN repacks it
into its blocked layout on every call: for a decode step's few rows the copy
costs about as much as the product (lm_head moves its whole table twice a step).
Packed once (torch.ops.mkldnn._reorder_linear_weight) and kept on the weight's
Parameter, every product reads the packed copy and gives the same bits as
F.linear. The copy doubles the bf16 weights' host memory; it is made at the
weight's first product and made again when the weight changes in place.
"""

from __future__ import annotations

import os

import torch

from flashserve.layers.weight_copies import kept_copy

# Benchmarks and tests switch it off to compare with F.linear.
enabled = os.environ.get("FLASHSERVE_ONEDNN_PACKED", "1") != "0"
# The batch size oneDNN picks the packed layout for: a decode step's. Any other
# row count runs from the same packing (and gives the same bits).
PACKED_FOR_ROWS = 64
_ATTRIBUTE = "_onednn_packed"


def _supported() -> bool:
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


SUPPORTED = _supported()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x W^T (+ b) for bf16 CPU tensors through the packed weight; None: use F.linear."""
    if not (
        enabled
        and SUPPORTED
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and x.dim() >= 1
        and x.numel() > 0
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dtype == torch.bfloat16 and bias.shape == weight.shape[:1]))
        and not torch.is_grad_enabled()
    ):
        return None
    if x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed(weight), bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def packed(weight: torch.Tensor) -> torch.Tensor:
    """weight in oneDNN's layout, made once per weight (again after an in-place change)."""
    return kept_copy(weight, _ATTRIBUTE, _reorder)


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS)
