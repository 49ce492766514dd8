"""Build a model and fill it from (sharded) safetensors files.

Memory: the model is built on the meta device with its parameters already in
the serving dtype, then each one is allocated once on the target device
(no fp32 copy, no cast). Checkpoint tensors are read one at a time
(models/safetensors_stream.py) and copied, with any cast, into their
parameters by the parameters' own `weight_loader`s; so the peak is the
model plus the largest checkpoint tensor.

Tensor parallel (size > 1): the tensors come as unread slices
(`iter_slices`); each parameter's loader narrows its to the rank's shard and
reads only those bytes. Quantized checkpoints are dequantized whole first.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from flashserve.distributed.parallel_state import tensor_parallel
from flashserve.layers.attention import AttentionBackend
from flashserve.layers.linear import weight_loader_of
from flashserve.models.base import CausalLM
from flashserve.models.model_config import ModelConfig
from flashserve.models.quantization import NamedTensors, checkpoint_quantization
from flashserve.models.registry import model_class
from flashserve.models.safetensors_stream import iter_slices, iter_tensors

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_model_builds(
    cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, max_positions: int
) -> None:
    """Construct the model on the meta device (no memory, no weights) so that a shape the
    current tensor-parallel layout cannot split fails here, before any process starts."""
    cls = model_class(cfg.architecture)
    with torch.device("meta"), _default_dtype(dtype):
        cls(cfg, backend, max_positions)


def build_model(
    cfg: ModelConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> CausalLM:
    """The checkpoint's model class with uninitialised parameters allocated on `device`.

    Parameters a model creates with an explicit dtype (fp32 router weights) keep it.
    """
    cls = model_class(cfg.architecture)
    with torch.device("meta"), _default_dtype(dtype):
        model = cls(cfg, backend, max_positions)
    _allocate(model, device)
    model.init_buffers(device)
    return model.eval()


def _allocate(model: CausalLM, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device`.

    Not `Module.to_empty`: on the CPU it left ~30% of the weight bytes resident
    before a single weight was read, and its new Parameters drop attributes
    (`weight_loader`), which are carried over here.
    """
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            fresh = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False
            )
            fresh.__dict__.update(param.__dict__)  # weight_loader and the like
            module._parameters[name] = fresh
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> CausalLM:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    # Before building: an unsupported quantization method fails the load at once.
    quantization = checkpoint_quantization(cfg.raw)
    model = build_model(cfg, backend, dtype, device, max_positions)
    if quantization is not None:
        logger.info("weights: %s", quantization.describe(dtype, device))
    load_weights(model, files)
    return model


def _checkpoint_tensors(model: CausalLM, files: list[Path]) -> NamedTensors:
    """(file, name, tensor) of every checkpoint tensor, quantized weights dequantized."""
    quantization = checkpoint_quantization(model.config.raw)
    if quantization is None and tensor_parallel().size > 1:
        return ((path, name, lazy) for path in files for name, lazy in iter_slices(path))
    stream = ((path, name, tensor) for path in files for name, tensor in iter_tensors(path))
    if quantization is None:
        return stream
    device = next(model.parameters()).device
    return quantization.dequantized(
        stream, lambda name: model.checkpoint_target(name) is not None, device
    )


@torch.no_grad()
def load_weights(model: CausalLM, files: list[Path]) -> None:
    params = dict(model.named_parameters())
    written: dict[str, int] = defaultdict(int)
    # A tensor with no parameter to fill is a term of the checkpoint's model that this
    # one lacks (a bias the config did not announce): served without it, the logits
    # would be silently wrong.
    unplaced: list[str] = []
    for path, name, tensor in _checkpoint_tensors(model, files):
        target = model.checkpoint_target(name)
        if target is None:
            continue
        param_name, shard = target
        param = params.get(param_name)
        if param is None:
            # An empty tensor adds nothing: transformers saves a shared expert of
            # intermediate size 0 as empty projections where this model has none.
            if tensor.numel() != 0:
                unplaced.append(name)
            continue
        try:
            written[param_name] += weight_loader_of(param)(param, tensor, shard)
        except ValueError as exc:
            raise ValueError(f"{path.name}: tensor {name}: {exc}") from None
    folder = files[0].parent
    if unplaced:
        raise ValueError(
            f"checkpoint in {folder} has tensors {model.config.architecture} as configured "
            f"has no place for: {unplaced[:8]}{' ...' if len(unplaced) > 8 else ''} "
            "(does config.json say what they are, e.g. a bias switch?)"
        )
    missing = sorted(name for name, p in params.items() if written[name] < p.numel())
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks tensors for: {missing[:8]}")
