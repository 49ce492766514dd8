"""Routed experts stored stacked: gate|up [E, 2I, H] and down [E, H, I].

Compute. The token -> expert assignments are sorted by expert id, so each
expert's tokens are one contiguous run of rows; then either
- `grouped_mm`: one grouped matrix product per projection over all runs
  (torch's grouped GEMM; CUDA, bf16). Every shape depends only on the
  number of tokens, so decode steps can be captured as CUDA graphs; or
- `sorted`: the run lengths come to the host. On the CPU, runs of up to
  cpu_expert_kernel.MAX_RUN rows (decode) go to a compiled kernel that reads
  each active expert's weights once; otherwise one matrix product per expert
  that received tokens. Experts with no token cost nothing: their weights
  are not read.
Never every expert on every token. The path is chosen when the weights are
placed on their device (`init_buffers`) and logged once by the model.

Each token sums its top-k rows in fp32 in an order fixed by its own expert
ids (`combine_rows`), so a token's output does not depend on what else is in
the batch.

Tensor parallel inside the experts: every rank holds every expert, but only
its slice of the intermediate size (gate|up rows, down columns); the output
is a partial sum that the MoE block all-reduces (layers/moe/block.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.distributed.parallel_state import single_device, tensor_parallel
from flashserve.layers.linear import copy_into, split_evenly
from flashserve.layers.moe import cpu_expert_kernel

logger = logging.getLogger(__name__)

GROUPED_MM = "grouped_mm"
SORTED = "sorted"


def _grouped_mm_function():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def choose_expert_path(
    device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int
) -> tuple[str, str]:
    """(path, why) for experts of this shape on this device."""
    if device.type != "cuda":
        return SORTED, f"grouped GEMM is used on CUDA only (device {device.type})"
    grouped_mm = _grouped_mm_function()
    if grouped_mm is None:
        return SORTED, f"torch {torch.__version__} has no grouped_mm"
    if dtype != torch.bfloat16:
        return SORTED, f"torch's grouped_mm takes bfloat16, the model runs {dtype}"
    if hidden % 8 or intermediate % 8:
        return SORTED, "grouped_mm needs 16-byte aligned rows (hidden and expert sizes % 8)"
    # The kernel also depends on the GPU generation: run the forward pass once.
    problem = grouped_path_problem(device, dtype, hidden, intermediate)
    if problem is not None:
        return SORTED, problem
    return GROUPED_MM, "grouped GEMM over experts sorted by id"


def grouped_path_problem(
    device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int
) -> str | None:
    """Why the grouped-GEMM forward pass fails for experts of this shape here (None: it runs)."""
    try:
        with single_device():  # `intermediate` is already this rank's slice
            experts = StackedExperts(2, hidden, intermediate).to(device=device, dtype=dtype)
        experts.path = GROUPED_MM
        with torch.no_grad():
            experts.gate_up_proj.zero_()
            experts.down_proj.zero_()
            ids = torch.tensor([[1], [1], [1]], device=device)  # expert 0 gets no row
            weights = torch.ones(3, 1, device=device)
            experts(torch.ones(3, hidden, dtype=dtype, device=device), weights, ids)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        return f"grouped_mm failed on this device: {exc}"
    return None


def combine_rows(
    rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, top_k: int, by_slot: bool
) -> torch.Tensor:
    """fp32 [T, H]: each token's weighted sum of its top_k expert outputs.

    `rows[i]` is the output for assignment `order[i]` (token order[i] // top_k, slot
    order[i] % top_k). Either way a token's terms are added in an order fixed by its
    own experts, whatever else is in the batch: by_slot puts rows back per slot and
    sums slots in order (no atomics: the CUDA path); otherwise index_add_ adds rows in
    sorted order (~2x cheaper on the CPU, where it runs sequentially).
    """
    num_tokens = weights.shape[0]
    if by_slot:
        unsorted = torch.empty_like(rows)
        unsorted[order] = rows
        return (unsorted.view(num_tokens, top_k, -1).float() * weights.unsqueeze(-1)).sum(1)
    scaled = rows.float() * weights.reshape(-1)[order].unsqueeze(1)
    combined = torch.zeros(num_tokens, rows.shape[-1], device=rows.device)
    return combined.index_add_(0, order // top_k, scaled)


class StackedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        what: str = "moe_intermediate_size",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        # The checkpoint's expert size, and the slice of it this rank holds.
        self.full_intermediate_size = intermediate_size
        self.part_start, intermediate_size = split_evenly(intermediate_size, what)
        self.sliced = tensor_parallel().size > 1
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.down_proj.weight_loader = self.load_down
        self.path = SORTED
        self.path_reason = "not placed on a device yet"

    # -- loading: per-expert tensors of hub checkpoints, or already stacked ones --

    def load_gate_up(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> int:
        full, part = self.full_intermediate_size, self.intermediate_size
        if shard_id is None:  # stacked [E, 2I, H] (transformers' in-memory layout)
            if not self.sliced:
                return copy_into(param.data, loaded, "stacked experts gate|up")
            self._check_rows(loaded, 1, 2 * full, "stacked experts gate|up")
            written = 0
            for half, rows in enumerate((0, full)):
                target = param.data.narrow(1, half * part, part)
                piece = loaded.narrow(1, rows + self.part_start, part)
                written += copy_into(target, piece, "stacked experts gate|up")
            return written
        expert, which = self._expert(shard_id)
        rows = {"gate": 0, "up": part}[which]
        target = param.data[expert].narrow(0, rows, part)
        if self.sliced:
            self._check_rows(loaded, 0, full, f"expert {expert} {which}_proj")
            loaded = loaded.narrow(0, self.part_start, part)
        return copy_into(target, loaded, f"expert {expert} {which}_proj")

    def load_down(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> int:
        last = len(loaded.shape) - 1
        if self.sliced:
            what = "stacked experts down" if shard_id is None else "expert down_proj"
            self._check_rows(loaded, last, self.full_intermediate_size, what)
            loaded = loaded.narrow(last, self.part_start, self.intermediate_size)
        if shard_id is None:
            return copy_into(param.data, loaded, "stacked experts down")
        expert, _ = self._expert(shard_id)
        return copy_into(param.data[expert], loaded, f"expert {expert} down_proj")

    @staticmethod
    def _check_rows(loaded: Any, dim: int, expected: int, what: str) -> None:
        if len(loaded.shape) <= dim or loaded.shape[dim] != expected:
            raise ValueError(
                f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                f"{expected} along dimension {dim}"
            )

    def _expert(self, shard_id: Any) -> tuple[int, str]:
        expert, which = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (the model has {self.num_experts})")
        return expert, which

    def init_buffers(self, device: torch.device) -> None:
        hidden = self.gate_up_proj.shape[-1]
        self.path, self.path_reason = choose_expert_path(
            device, self.gate_up_proj.dtype, hidden, self.intermediate_size
        )
        if device.type == "cpu":
            problem = cpu_expert_kernel.problem(self.gate_up_proj, self.down_proj)
            self.path_reason += (
                f"; runs of <= {cpu_expert_kernel.MAX_RUN} rows: compiled kernel"
                if problem is None
                else f"; compiled kernel not used: {problem}"
            )

    # -- compute --

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H], weights float32 [T, k], expert_ids [T, k] -> [T, H] in x's dtype."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        # Stable, so within an expert rows keep token order.
        order = torch.argsort(flat, stable=True)
        rows = x[order // top_k]
        if self.path == GROUPED_MM:
            out = self._grouped(rows, flat)
        else:
            out = self._sorted(rows, flat)
        # On CUDA index_add_ adds with atomics in a varying order.
        by_slot = x.device.type != "cpu"
        return combine_rows(out, order, weights, top_k, by_slot).to(x.dtype)

    def _sorted(self, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = cpu_expert_kernel.expert_mlp(rows, counts, self.gate_up_proj, self.down_proj)
        return self._per_expert(rows, counts) if out is None else out

    def _per_expert(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            chunk = rows[start : start + count]
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, self.down_proj[expert])
            start += count
        return out

    def _grouped(self, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        grouped_mm = _grouped_mm_function()
        # Counts without a host sync (bincount reads the max on the host).
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)
        gate_up = grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
