"""Quantized checkpoints: what `quantization_config` says, and weights made servable at load.

Supported: FP8 block quantization as DeepSeek-V3/R1/V3.1, Kimi K2 and many `-FP8`
releases ship it (`quant_method: fp8`, `weight_block_size: [128, 128]`, dynamic
activation scales): every quantized linear weight is float8 [out, in] with a
float32 `<name>_scale_inv` [ceil(out/bo), ceil(in/bi)], and the real weight is
weight * scale_inv per block. They are dequantized to the serving dtype as they
stream in, on the device the model lives on; the engine then runs ordinary
matrix products (no scaled-FP8 kernel path). Any other method is a load error
naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashserve.models.registry import UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED_METHODS = ("fp8 (block-wise, weight_scale_inv)",)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIX = "_scale_inv"

NamedTensors = Iterator[tuple[Path, str, torch.Tensor]]


class UnsupportedQuantizationError(UnsupportedModelError):
    """The checkpoint's quantization_config names a method this engine cannot load."""


@dataclass(frozen=True)
class Fp8BlockDequantizer:
    block: tuple[int, int]

    def describe(self, dtype: torch.dtype, device: torch.device) -> str:
        return (
            f"FP8 block-quantized weights ({self.block[0]}x{self.block[1]} blocks): "
            f"dequantized to {str(dtype).removeprefix('torch.')} at load on {device.type} "
            "(no scaled-FP8 matmul path)"
        )

    def dequantized(
        self, tensors: NamedTensors, wanted: Callable[[str], bool], device: torch.device
    ) -> NamedTensors:
        """The stream with each FP8 weight replaced by its float32 dequantized value.

        A weight and its scale may come in either order and from different files; the
        one seen first waits for the other. Tensors `wanted` rejects are dropped
        unread (a checkpoint's multi-token-prediction layer).
        """
        weights: dict[str, tuple[Path, torch.Tensor]] = {}
        scales: dict[str, torch.Tensor] = {}
        for path, name, tensor in tensors:
            if name.endswith(_SCALE_SUFFIX):
                weight_name = name.removesuffix(_SCALE_SUFFIX)
                if not wanted(weight_name):
                    continue
                if weight_name in weights:
                    weight_path, weight = weights.pop(weight_name)
                    yield (
                        weight_path,
                        weight_name,
                        self._dequantize(weight_name, weight, tensor, device),
                    )
                else:
                    scales[weight_name] = tensor
            elif tensor.dtype in _FP8_DTYPES:
                if not wanted(name):
                    continue
                if name in scales:
                    yield path, name, self._dequantize(name, tensor, scales.pop(name), device)
                else:
                    weights[name] = (path, tensor)
            else:
                yield path, name, tensor
        if weights:
            raise ValueError(f"FP8 weights without a {_SCALE_SUFFIX} tensor: {sorted(weights)[:8]}")
        if scales:
            raise ValueError(f"{_SCALE_SUFFIX} tensors without their weight: {sorted(scales)[:8]}")

    def _dequantize(
        self, name: str, weight: torch.Tensor, scale_inv: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        if weight.dim() != 2:
            raise ValueError(
                f"{name}: FP8 block quantization expects a 2-D weight, not {tuple(weight.shape)}"
            )
        rows, cols = weight.shape
        bo, bi = self.block
        expected = (-(-rows // bo), -(-cols // bi))
        if tuple(scale_inv.shape) != expected:
            raise ValueError(
                f"{name}{_SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}; a {rows}x{cols} "
                f"weight in {bo}x{bi} blocks needs {expected}"
            )
        scale = scale_inv.to(device=device, dtype=torch.float32)
        scale = scale.repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
        return weight.to(device).to(torch.float32) * scale


def checkpoint_quantization(raw_config: dict[str, Any]) -> Fp8BlockDequantizer | None:
    """How to read the checkpoint's weights (None: as they are); a clear error if we cannot."""
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method {method!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_METHODS)}, or an unquantized checkpoint"
        )
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise UnsupportedQuantizationError(
            "quantization_config: fp8 without weight_block_size (per-tensor or per-channel "
            "scales) is not supported; block-wise FP8 (weight_block_size [128, 128]) is"
        )
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise UnsupportedQuantizationError(
            f"quantization_config.activation_scheme {scheme!r} is not supported (dynamic is)"
        )
    fmt = quant.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise UnsupportedQuantizationError(f"quantization_config.fmt {fmt!r} is not supported")
    return Fp8BlockDequantizer((int(block[0]), int(block[1])))
