"""CUDA graphs for pure-decode steps.

A decode step of a large model at small batch is launch-bound: every layer
issues a few dozen small kernels from Python, and the GPU idles between them.
At engine start (after the KV cache exists) the decode forward pass is
captured once per bucket, and a step whose every item computes one token
replays the smallest bucket that fits it. Prefill and mixed steps run eagerly.

Buckets. Batch sizes 1, 2, 4, 8, 16, 24, ... up to `cuda_graph_max_batch`
(vLLM's list). The flash_attn decode kernel reads each row's `cache_seqlens`
tokens only, so one table width serves every length. The torch backend's
fixed-shape decode reads every block of the table, so its graphs are also
keyed by table width: 256 tokens' worth of blocks, doubled up to
ceil(max_model_len / block_size); a (batch, width) pair whose gathered keys
and values would pass GATHER_BYTES_LIMIT per layer is not captured and such
steps run eagerly.

Static inputs. Token ids, positions and KV slots (int64), context lengths and
block tables (int32, max_blocks columns) are views of two device buffers sized
for the largest bucket; a step writes them on the host (pinned on CUDA) and
copies them over, one transfer per buffer, before the replay.
Rows past the real batch are padding: token 0 at position 0, writing its KV
into the scratch block (the cache block after the last one the block manager
owns, which no sequence ever holds), attending to that one slot. Every kernel
in the forward pass treats rows independently, so padding never reaches a
real row. The model's final hidden states come back sliced to the real rows;
logits and sampling stay outside the graph (sampling is data-dependent).

`prepare` + `forward_static` run anywhere (the CPU tests run them eagerly);
`capture` and the replay in `run` need CUDA.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from dataclasses import dataclass

import torch

from flashserve.engine.async_scheduling import PENDING_TOKEN
from flashserve.engine.sequence import Sequence
from flashserve.engine.step_inputs import StepInputs
from flashserve.layers.attention import AttentionBackend, AttentionMetadata
from flashserve.models.base import CausalLM

logger = logging.getLogger(__name__)

# Smallest table width (in tokens) of the torch backend's graphs.
MIN_TABLE_TOKENS = 256
# Most key+value bytes one layer of one torch-backend graph may gather.
GATHER_BYTES_LIMIT = 1 << 30


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8, then max_batch itself if it is not one of them."""
    if max_batch < 1:
        raise ValueError(f"cuda_graph_max_batch must be at least 1, not {max_batch}")
    sizes = [b for b in (1, 2, 4) if b <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def table_buckets(max_blocks: int, block_size: int, reads_whole_table: bool) -> list[int]:
    """Block-table widths to capture: just max_blocks, or doublings up to it."""
    if not reads_whole_table:
        return [max_blocks]
    width = max(1, -(-MIN_TABLE_TOKENS // block_size))
    widths = []
    while width < max_blocks:
        widths.append(width)
        width *= 2
    widths.append(max_blocks)
    return widths


def smallest_bucket(buckets: list[int], n: int) -> int | None:
    """The smallest bucket >= n (buckets sorted), or None when n is past the last."""
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def memory_reserve(backend: AttentionBackend) -> int:
    """Device bytes to leave free for the graphs' shared pool (a generous estimate).

    The pool holds the largest graph's activations: a few MiB of hidden states,
    plus, for the torch backend, the keys and values one layer gathers.
    """
    return (512 << 20) + (2 * GATHER_BYTES_LIMIT if backend.decode_reads_whole_table else 0)


@dataclass
class DecodeBatch:
    """A decode step laid into the static inputs."""

    key: tuple[int, int]  # (batch bucket, table width)
    num_rows: int  # real rows; the rest of the bucket is padding
    sample_rows: list[int]
    sampled: list[Sequence]
    # (row, sequence) whose input token is the previous step's draw, still on the device
    pending: list[tuple[int, Sequence]]


class _HostInputs:
    """One set of host buffers for the static inputs (pinned on CUDA)."""

    def __init__(self, rows: int, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.rows = rows
        self.int64 = torch.zeros(3 * rows, dtype=torch.int64, pin_memory=pin)
        self.int32 = torch.zeros(rows * (1 + max_blocks), dtype=torch.int32, pin_memory=pin)
        self._copied: torch.cuda.Event | None = None
        self._cuda = pin

    def copied(self) -> None:
        """Its copies to the device are queued; mark where."""
        if self._cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def wait(self) -> None:
        """Before writing into it: its last copies have run."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_blocks: int,
        scratch_block: int,
        max_batch: int,
        reads_whole_table: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        k_cache = kv_caches[0][0]
        self.device = k_cache.device
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.batch_sizes = batch_buckets(max_batch)
        self.table_widths = table_buckets(max_blocks, block_size, reads_whole_table)
        token_bytes = model.kv_cache_spec.token_bytes(k_cache.dtype)
        self.keys = [
            (b, w)
            for b in self.batch_sizes
            for w in self.table_widths
            if not reads_whole_table or b * w * block_size * token_bytes <= GATHER_BYTES_LIMIT
        ]
        self._key_set = set(self.keys)
        rows = self.batch_sizes[-1]
        self.max_batch = rows
        # int64: token ids | positions | slots; int32: context lengths | block tables.
        # Two host sets, used in turn: a step's copies may still be queued behind the
        # previous step when the next one is prepared (engine/async_scheduling.py).
        self._host_sets = [_HostInputs(rows, max_blocks, self.device) for _ in range(2)]
        self._host_turn = 0
        self._select_host_set(0)
        self._dev64 = torch.zeros(3 * rows, dtype=torch.int64, device=self.device)
        self._dev32 = torch.zeros(rows * (1 + max_blocks), dtype=torch.int32, device=self.device)
        self.input_ids = self._dev64[:rows]
        self.positions = self._dev64[rows : 2 * rows]
        self.slot_mapping = self._dev64[2 * rows :]
        self.context_lens = self._dev32[:rows]
        self.block_tables = self._dev32[rows:].view(rows, max_blocks)
        self._cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.runs = 0  # steps through the static inputs
        self.replays = 0  # of which replayed from a graph
        self.capture_seconds = 0.0
        # Device memory the captured graphs keep reserved (their shared pool).
        self.capture_bytes = 0
        self._pad_rows(0, rows)
        self._upload()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    # -- static inputs ------------------------------------------------------

    def prepare(self, items: list[tuple[Sequence, int]]) -> DecodeBatch | None:
        """Write a pure-decode step into the static inputs; None if it needs the eager path."""
        n = len(items)
        if not n or n > self.max_batch:
            return None
        bs = self.block_size
        longest = 0
        for seq, num_tokens in items:
            if num_tokens != 1:
                return None
            longest = max(longest, seq.num_computed_tokens + 1)
        rows = smallest_bucket(self.batch_sizes, n)
        width = smallest_bucket(self.table_widths, -(-longest // bs))
        if rows is None or width is None or (rows, width) not in self._key_set:
            return None
        ids, pos, slots, ctx, tables = (
            self._h_ids,
            self._h_pos,
            self._h_slots,
            self._h_ctx,
            self._h_tables,
        )
        tables[:rows, :width] = self.scratch_block
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        pending: list[tuple[int, Sequence]] = []
        for i, (seq, _) in enumerate(items):
            p = seq.num_computed_tokens
            blocks = seq.block_ids
            token = seq.token_ids[p]
            if token == PENDING_TOKEN:  # the caller writes it on the device
                pending.append((i, seq))
                token = 0
            ids[i] = token
            pos[i] = p
            slots[i] = blocks[p // bs] * bs + p % bs
            ctx[i] = p + 1
            used = min(len(blocks), width)
            tables[i, :used] = blocks[:used]
            if p + 1 == seq.num_tokens:
                sample_rows.append(i)
                sampled.append(seq)
        self._pad_rows(n, rows)
        self._upload(rows)
        return DecodeBatch((rows, width), n, sample_rows, sampled, pending)

    def _select_host_set(self, turn: int) -> None:
        host = self._host_sets[turn]
        host.wait()
        self._host64, self._host32 = host.int64, host.int32
        h64, h32 = host.int64.numpy(), host.int32.numpy()
        rows = host.rows
        self._h_ids, self._h_pos, self._h_slots = h64[:rows], h64[rows : 2 * rows], h64[2 * rows :]
        self._h_ctx, self._h_tables = h32[:rows], h32[rows:].reshape(rows, -1)

    def step_inputs(self, batch: DecodeBatch) -> StepInputs:
        """A prepared step's real rows, for the other tensor-parallel ranks (`load`)."""
        n = batch.num_rows
        width = batch.key[1]
        return StepInputs(
            self._h_ids[:n].tolist(),
            self._h_pos[:n].tolist(),
            self._h_slots[:n].tolist(),
            [1] * n,
            self._h_ctx[:n].tolist(),
            self._h_tables[:n, :width].tolist(),
            batch.sample_rows,
            batch.key,
        )

    def load(self, inputs: StepInputs) -> DecodeBatch:
        """Ranks > 0: write rank 0's prepared step into this rank's static inputs."""
        assert inputs.graph_key is not None
        rows, width = inputs.graph_key
        n = len(inputs.input_ids)
        self._h_tables[:rows, :width] = self.scratch_block
        self._h_ids[:n] = inputs.input_ids
        self._h_pos[:n] = inputs.positions
        self._h_slots[:n] = inputs.slots
        self._h_ctx[:n] = inputs.context_lens
        if n:
            self._h_tables[:n, :width] = inputs.block_tables
        self._pad_rows(n, rows)
        self._upload(rows)
        return DecodeBatch(inputs.graph_key, n, list(inputs.logit_rows), [])

    def _pad_rows(self, start: int, stop: int) -> None:
        """Rows [start, stop): token 0 at position 0, KV into the scratch slot, context 1."""
        self._h_ids[start:stop] = 0
        self._h_pos[start:stop] = 0
        self._h_slots[start:stop] = self.scratch_slot
        self._h_ctx[start:stop] = 1
        self._h_tables[start:stop] = self.scratch_block

    def _upload(self, rows: int | None = None) -> None:
        """Copy the inputs of the first `rows` rows (all by default) to the device.

        Two copies queued without waiting (from pinned memory on CUDA); the next step
        writes the other host set, and this one again only once its copies have run.
        The int32 buffer is context lengths then table rows, so a prefix covers it.
        """
        rows = self.max_batch if rows is None else rows
        non_blocking = self.device.type == "cuda"
        self._dev64.copy_(self._host64, non_blocking=non_blocking)
        used = self.max_batch + rows * self.max_blocks
        self._dev32[:used].copy_(self._host32[:used], non_blocking=non_blocking)
        self._host_sets[self._host_turn].copied()
        self._host_turn = 1 - self._host_turn
        self._select_host_set(self._host_turn)

    def metadata(self, rows: int, width: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decode_tokens=rows,
            cu_seqlens_q=self._cu_seqlens[: rows + 1],
            context_lens=self.context_lens[:rows],
            slot_mapping=self.slot_mapping[:rows],
            block_tables=self.block_tables[:rows, :width],
            max_query_len=1,
            max_context_len=width * self.block_size,
            query_lens_host=[],
            context_lens_host=[],
            fixed_shape_decode=True,
        )

    def forward_static(self, rows: int, width: int) -> torch.Tensor:
        """The model over the first `rows` static inputs: what a graph captures."""
        return self.model(
            self.input_ids[:rows], self.positions[:rows], self.kv_caches, self.metadata(rows, width)
        )

    # -- graphs ---------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per key, largest first, sharing one memory pool (CUDA only)."""
        # Every row padding: warm-up runs write only into the scratch block.
        self._pad_rows(0, self.max_batch)
        self._upload()
        # What the graphs hold is their private pool (every graph's intermediates and
        # outputs), which the caching allocator counts as reserved. torch.cuda.graph()
        # empties the allocator's cache on entry, so free device memory measured around
        # the captures would credit that release back and read about zero; releasing the
        # cache ourselves on both sides leaves the pool's segments as the difference.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(self.device)
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for key in sorted(self.keys, reverse=True):
            # Eager warm-up: lazy initialisation (cuBLAS handles, kernel choice) stays
            # out of the capture.
            self.forward_static(*key)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward_static(*key)
            self._graphs[key] = graph
            self._outputs[key] = out
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        torch.cuda.empty_cache()  # the eager warm-ups' activations, cached outside the pool
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - reserved_before
        logger.info(
            "captured %d CUDA graphs for decode (batch %d..%d, table widths %s) in %.1f s, "
            "%.0f MiB of device memory",
            len(self._graphs),
            self.batch_sizes[0],
            self.max_batch,
            sorted({w for _, w in self.keys}),
            self.capture_seconds,
            self.capture_bytes / (1 << 20),
        )

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Hidden states [num_rows, hidden] of a prepared step: replayed, or eager if not captured."""
        self.runs += 1
        graph = self._graphs.get(batch.key)
        if graph is None:
            out = self.forward_static(*batch.key)
        else:
            graph.replay()
            self.replays += 1
            out = self._outputs[batch.key]
        return out[: batch.num_rows]
