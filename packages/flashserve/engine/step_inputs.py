"""What one model step needs, as rank 0 sends it to the other tensor-parallel ranks.

Rank 0 schedules and builds a step; ranks 1..N-1 only run the model on their
shards, so each step they receive the flat batch: token ids, positions, KV
slots, query and context lengths, block tables (the same on every rank: each
rank's cache holds its heads of the same blocks), the rows whose logits are
wanted, and whether the step replays a decode graph (and which). Packed as
two int64 tensors on the control group (gloo, CPU): a fixed header and one
payload, i.e. two broadcasts a step whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashserve.distributed.parallel_state import tensor_parallel

HEADER_LEN = 8
STEP, SHUTDOWN = 1, 2


@dataclass
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # rows of equal width
    logit_rows: list[int]  # rows of the hidden states whose logits rank 0 wants
    graph_key: tuple[int, int] | None = None  # (batch bucket, table width) of a decode graph

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = len(self.block_tables[0]) if self.block_tables else 0
        rows, table_width = self.graph_key or (0, 0)
        header = torch.tensor(
            [
                STEP,
                len(self.input_ids),
                len(self.query_lens),
                width,
                len(self.logit_rows),
                rows,
                table_width,
                0,
            ],
            dtype=torch.int64,
        )
        flat: list[int] = [
            *self.input_ids,
            *self.positions,
            *self.slots,
            *self.query_lens,
            *self.context_lens,
        ]
        for table in self.block_tables:
            flat.extend(table)
        flat.extend(self.logit_rows)
        return header, torch.tensor(flat, dtype=torch.int64)

    @staticmethod
    def payload_len(header: list[int]) -> int:
        _, tokens, seqs, width, logit_rows, _, _, _ = header
        return 3 * tokens + 2 * seqs + seqs * width + logit_rows

    @classmethod
    def unpack(cls, header: list[int], payload: torch.Tensor) -> StepInputs:
        _, tokens, seqs, width, _, rows, table_width, _ = header
        values = payload.tolist()
        cursor = 0

        def take(n: int) -> list[int]:
            nonlocal cursor
            part = values[cursor : cursor + n]
            cursor += n
            return part

        input_ids, positions, slots = take(tokens), take(tokens), take(tokens)
        query_lens, context_lens = take(seqs), take(seqs)
        tables = [take(width) for _ in range(seqs)]
        return cls(
            input_ids,
            positions,
            slots,
            query_lens,
            context_lens,
            tables,
            values[cursor:],
            (rows, table_width) if rows else None,
        )


def send_step(inputs: StepInputs) -> None:
    """Rank 0: broadcast a step's inputs to every other rank."""
    group = tensor_parallel().control_group
    header, payload = inputs.pack()
    dist.broadcast(header, src=0, group=group)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group)


def send_shutdown() -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = SHUTDOWN
    dist.broadcast(header, src=0, group=tensor_parallel().control_group)


def receive_step() -> StepInputs | None:
    """Ranks > 0: the next step's inputs, or None when rank 0 says to shut down."""
    group = tensor_parallel().control_group
    header_tensor = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header_tensor, src=0, group=group)
    header = header_tensor.tolist()
    if header[0] == SHUTDOWN:
        return None
    if header[0] != STEP:
        raise RuntimeError(f"unexpected tensor-parallel command {header[0]}")
    payload = torch.empty(StepInputs.payload_len(header), dtype=torch.int64)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group)
    return StepInputs.unpack(header, payload)
