"""Unread safetensors tensors (`iter_slices`): a rank's slice is read alone, exactly.

Row slices (one contiguous read), column slices of 2-D and 3-D tensors (one
read per row, or whole rows read in bounded groups and cut when the slice's
runs are small), slices of slices, and the loaders' tensor-parallel shards.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import flashserve.models.safetensors_stream as stream
from flashserve.models.safetensors_stream import iter_slices

TENSORS = {
    "a": torch.randn(6, 10),
    "b": torch.randn(3, 4, 8).to(torch.bfloat16),
    "c": torch.randn(5),
}


@pytest.mark.parametrize("small_run_bytes", [1, 1 << 30], ids=["direct", "grouped"])
def test_slices_read_exactly_their_values(tmp_path, monkeypatch, small_run_bytes) -> None:
    monkeypatch.setattr(stream, "_SMALL_RUN_BYTES", small_run_bytes)
    save_file(TENSORS, tmp_path / "x.safetensors")
    lazy = dict(iter_slices(tmp_path / "x.safetensors"))
    a, b, c = TENSORS["a"], TENSORS["b"], TENSORS["c"]
    assert torch.equal(lazy["a"].read(), a)
    assert lazy["a"].narrow(1, 3, 4).shape == (6, 4)
    assert torch.equal(lazy["a"].narrow(0, 2, 3).read(), a[2:5])
    assert torch.equal(lazy["a"].narrow(1, 3, 4).read(), a[:, 3:7])
    assert torch.equal(lazy["a"].narrow(1, 3, 4).narrow(1, 1, 2).read(), a[:, 4:6])
    assert torch.equal(lazy["b"].narrow(1, 1, 2).read(), b[:, 1:3])
    assert torch.equal(lazy["b"].narrow(2, 4, 4).read(), b[:, :, 4:])
    assert torch.equal(lazy["c"].narrow(0, 1, 2).read(), c[1:3])


def test_bad_slices_are_refused(tmp_path) -> None:
    save_file(TENSORS, tmp_path / "x.safetensors")
    lazy = dict(iter_slices(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="past the end"):
        lazy["a"].narrow(0, 4, 3)
    with pytest.raises(ValueError, match="two dimensions"):
        lazy["a"].narrow(0, 0, 2).narrow(1, 0, 2)


def test_a_rank_reads_exactly_its_shard_bytes(tmp_path, monkeypatch) -> None:
    """Rank 1 of 2 (the layout only: loading joins no collective) reads from the files
    exactly the bytes of its own parameters, never a whole sharded tensor."""
    from flashserve.distributed.parallel_state import TensorParallel, set_tensor_parallel
    from flashserve.layers.attention import select_backend
    from flashserve.models.loader import load_model
    from flashserve.models.model_config import ModelConfig
    from tests.tiny_models import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "model", tie_word_embeddings=False)
    monkeypatch.setattr(stream, "_SMALL_RUN_BYTES", 1)  # no whole-row group reads
    read = []
    real_preadv = stream.os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(stream.os, "preadv", counting_preadv)
    cfg = ModelConfig.from_pretrained(folder)
    device = torch.device("cpu")
    backend = select_backend("torch", device, torch.float32, 16)
    previous = set_tensor_parallel(TensorParallel(rank=1, size=2))
    try:
        model = load_model(folder, cfg, backend, torch.float32, device, 64)
    finally:
        set_tensor_parallel(previous)
    own = sum(p.numel() * p.element_size() for p in model.parameters())  # fp32 = checkpoint's
    assert sum(read) == own
    assert model.embed_tokens.weight.shape[0] == cfg.vocab_size // 2
