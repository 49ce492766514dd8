"""Owns the model weights and the KV cache; turns a scheduled batch into tokens."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from flashserve.distributed.parallel_state import tensor_parallel
from flashserve.engine.async_scheduling import PENDING_TOKEN
from flashserve.engine.cuda_graphs import DecodeGraphs
from flashserve.engine.host_transfer import upload
from flashserve.engine.sampler import SampledBatch, Sampler, SamplerOutput
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from flashserve.engine.step_inputs import StepInputs, send_step
from flashserve.layers.attention import AttentionMetadata
from flashserve.models.base import CausalLM

logger = logging.getLogger(__name__)

# Warm-up shapes (ModelRunner.warm_up). The prefill step is several prompts of this
# length, not one max_num_batched_tokens-long prompt: real steps look like that, and
# one 8192-token prompt's causal attention alone would take seconds on a CPU.
WARMUP_PREFILL_LEN = 512
# Context of each decode row: typical of chat traffic, and the narrowest block-table
# width the torch backend's decode graphs have (cuda_graphs.MIN_TABLE_TOKENS).
WARMUP_DECODE_CONTEXT = 256


@dataclass
class LaunchedStep:
    """A step whose model and sampler have run (or are queued, on a GPU)."""

    sampled: list[Sequence]
    draws: SampledBatch | None  # None: no sequence reached its end


@dataclass
class WarmUpReport:
    prefill_seqs: int
    prefill_tokens: int
    decode_rows: int
    decode_context: int
    seconds: float


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        cache_dtype: torch.dtype,
        eos_token_ids: tuple[int, ...],
        max_model_len: int | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        # One block more than the block manager hands out: the scratch block that
        # a CUDA graph's padding rows write into (engine/cuda_graphs.py).
        self.scratch_block = num_blocks
        self.kv_caches = model.kv_cache_spec.allocate(
            num_blocks + 1, block_size, cache_dtype, device
        )
        # Widest block table a sequence can have (a graph's static table width).
        max_len = max_model_len or num_blocks * block_size
        self.max_model_len = max_len
        self.num_blocks = num_blocks
        self.max_blocks = min(-(-max_len // block_size), num_blocks)
        self.sampler = Sampler(device, cfg.vocab_size, eos_token_ids)
        self.graphs: DecodeGraphs | None = None
        self.use_graphs = True  # benchmarks turn replay off to compare with eager steps
        # The last launch's draws on the device, and each sampled sequence's row in them.
        self._last: tuple[torch.Tensor, dict[Sequence, int]] | None = None
        # Rank 0 of a tensor-parallel group sends every step's inputs to the other
        # ranks before running it (ranks > 0 run `follow`); never at size 1.
        tp = tensor_parallel()
        self.leads_ranks = tp.enabled and tp.rank == 0

    def enable_decode_graphs(self, max_batch: int, capture: bool = True) -> bool:
        """Set up static decode inputs for batches up to max_batch and capture their graphs.

        capture=False (tests on the CPU) runs the same static-input path eagerly.
        Returns False, with the engine left eager, if capturing fails.
        """
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.block_size,
            self.max_blocks,
            self.scratch_block,
            max_batch,
            self.model.attention_backend.decode_reads_whole_table,
        )
        if capture:
            try:
                graphs.capture()
            except Exception:  # serve eagerly rather than not at all
                logger.exception("capturing CUDA graphs failed; decode steps run eagerly")
                graphs = None
        if graphs is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return False
        self.graphs = graphs
        return True

    @torch.inference_mode()
    def warm_up(self, max_num_seqs: int, max_num_batched_tokens: int) -> WarmUpReport:
        """Run one full-size prefill step and one full-size decode step on throwaway sequences.

        On a GPU the first steps of a fresh process pay one-time costs (CUDA kernels
        loaded lazily, cuBLAS handles and workspaces, the caching allocator's growth);
        paying them here keeps them off the first real requests. (On the 2-core CPU
        the first W1 batch was measured no slower than later ones with fresh prompts.)
        Both steps go through `step`, so forward, logits and sampler all run. Every
        block-table entry is the scratch block, which no sequence ever owns: nothing a
        real request can read is written. Nothing touches the scheduler, the block
        manager or the prefix cache, and the global RNG is left as it was found.
        """
        bs = self.block_size
        # No real step can compute more tokens than the cache has slots, nor run
        # more sequences than there are blocks (each holds at least one).
        max_num_seqs = max(1, max_num_seqs)
        total = max(1, min(max_num_batched_tokens, self.num_blocks * bs))
        # Longer prompts only when max_num_seqs of them could not fill the step.
        prefill_len = max(min(WARMUP_PREFILL_LEN, total), -(-total // max_num_seqs))
        prefill_len = max(1, min(prefill_len, self.max_model_len - 1))
        lengths = [prefill_len] * (total // prefill_len)
        if total % prefill_len:
            lengths.append(total % prefill_len)
        lengths = lengths[:max_num_seqs]
        rows = min(max_num_seqs, self.num_blocks)
        context = max(
            1, min(WARMUP_DECODE_CONTEXT, self.max_model_len, (self.num_blocks // rows) * bs)
        )
        # Alternate rows take the top-k candidates' draw and the whole-vocabulary
        # one, so both run, and so does the split of a batch between them.
        params = (
            SamplingParams(temperature=1.0, top_p=0.9, top_k=50),
            SamplingParams(temperature=1.0, top_p=0.9),
        )
        vocab = self.model.config.vocab_size

        def throwaway(i: int, num_tokens: int, computed: int) -> Sequence:
            tokens = [(i * 7919 + j) % vocab for j in range(num_tokens)]
            seq = Sequence(f"warm-up-{i}", tokens, params[i % 2])
            seq.num_computed_tokens = computed
            seq.block_ids = [self.scratch_block] * -(-num_tokens // bs)
            return seq

        prefill = [(throwaway(i, n, 0), n) for i, n in enumerate(lengths)]
        decode = [(throwaway(i, context, context - 1), 1) for i in range(rows)]
        graphs = self.graphs
        counts = (graphs.runs, graphs.replays) if graphs is not None else None
        cuda = self.device.type == "cuda"
        index = self.device.index
        rng_devices = [index if index is not None else torch.cuda.current_device()] if cuda else []
        if cuda:  # time the warm-up alone, not work still queued (graph capture)
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=rng_devices):
            self.step(prefill)
            self.step(decode)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        if graphs is not None and counts is not None:
            graphs.runs, graphs.replays = counts  # they count real steps only
        return WarmUpReport(len(lengths), sum(lengths), rows, context, seconds)

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int, cache_dtype: torch.dtype) -> int:
        return model.kv_cache_spec.bytes_per_block(block_size, cache_dtype)

    @torch.inference_mode()
    def step(
        self, items: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], SamplerOutput | None]:
        """Compute the scheduled tokens; sample for sequences whose chunk reaches their end.

        Returns the sequences that were sampled, in order, with their tokens.
        """
        launched = self.launch(items)
        if launched.draws is None:
            return [], None
        return launched.sampled, launched.draws.resolve()

    @torch.inference_mode()
    def launch(self, items: list[tuple[Sequence, int]]) -> LaunchedStep:
        """`step` without waiting for its tokens: they stay on the device until resolved.

        A sequence's last token may still be the previous launch's pending draw
        (async_scheduling.PENDING_TOKEN); it is taken from that launch's tokens on the
        device. Those must have been drawn by the launch just before this one.
        """
        hidden, sample_rows, sampled = self.forward(items)
        if not sampled:
            self._last = None
            return LaunchedStep([], None)
        logits = self.logits(hidden, sample_rows, native=True)
        draws = self.sampler.sample(logits, sampled, private=True)
        self._last = (draws.tokens, {seq: row for row, seq in enumerate(sampled)})
        return LaunchedStep(sampled, draws)

    def logits(self, hidden: torch.Tensor, rows: list[int], native: bool = False) -> torch.Tensor:
        """fp32 logits of hidden-state `rows` (whole vocabulary on rank 0; native: in the
        model's dtype). Under tensor parallel every rank calls this with the rows the
        step's inputs named."""
        if len(rows) != hidden.shape[0]:  # else every row (a pure decode step)
            hidden = hidden.index_select(0, upload(rows, torch.long, self.device))
        return self.model.compute_logits(hidden, native)

    @torch.inference_mode()
    def forward(
        self, items: list[tuple[Sequence, int]], every_row_logits: bool = False
    ) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        """Run the model over the scheduled tokens (blocks already allocated).

        Returns the hidden states of every token, the rows that end a
        sequence's known tokens, and those sequences. A pure-decode step runs
        through the decode graphs when they are set up and it fits one.
        Under tensor parallel the caller then computes `logits` of exactly the
        returned rows when any sequence was sampled (of every row with
        `every_row_logits`), since the other ranks join that collective.
        """
        if self.graphs is not None and self.use_graphs and not every_row_logits:
            batch = self.graphs.prepare(items)
            if batch is not None:
                self._fill_pending(self.graphs.input_ids, batch.pending)
                if self.leads_ranks:
                    send_step(self.graphs.step_inputs(batch))
                return self.graphs.run(batch), batch.sample_rows, batch.sampled
        return self._forward_eager(items, every_row_logits)

    @torch.inference_mode()
    def follow(self, inputs: StepInputs) -> None:
        """Ranks > 0: run rank 0's step on this rank's shards, and join its logits."""
        if inputs.graph_key is not None:
            assert self.graphs is not None, "rank 0 replays decode graphs this rank lacks"
            hidden = self.graphs.run(self.graphs.load(inputs))
        else:
            hidden = self._run_eager(
                inputs.input_ids,
                inputs.positions,
                inputs.slots,
                inputs.query_lens,
                inputs.context_lens,
                inputs.block_tables,
            )
        if inputs.logit_rows:
            self.logits(hidden, inputs.logit_rows)

    def _fill_pending(
        self, input_ids: torch.Tensor, pending: list[tuple[int, Sequence]] | None
    ) -> None:
        """Write the previous launch's draws, on the device, where inputs hold PENDING_TOKEN."""
        if not pending:
            return
        if self._last is None:
            raise RuntimeError("an input token is pending but no launch drew it")
        tokens, rows = self._last
        index = upload([i for i, _ in pending], torch.long, self.device)
        source = upload([rows[seq] for _, seq in pending], torch.long, self.device)
        input_ids.index_copy_(0, index, tokens.index_select(0, source))

    def _forward_eager(
        self, items: list[tuple[Sequence, int]], every_row_logits: bool = False
    ) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        # Single-token entries (decodes) first: the torch backend batches them.
        items = sorted(items, key=lambda item: item[1] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        pending: list[tuple[int, Sequence]] = []  # (input row, sequence) of pending tokens
        bs = self.block_size
        for seq, n in items:
            start = seq.num_computed_tokens
            end = start + n
            if end >= seq.num_tokens and seq.token_ids[-1] == PENDING_TOKEN:
                pending.append((len(input_ids) + seq.num_tokens - 1 - start, seq))
            input_ids.extend(seq.token_ids[start:end])
            # A speculative draft follows the known tokens; every position from the
            # last known token on is sampled (once per row: `sampled` repeats seq).
            drafted = end - seq.num_tokens
            if drafted > 0:
                input_ids.extend(seq.draft_token_ids[:drafted])
            positions.extend(range(start, end))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            if end >= seq.num_tokens:
                for row in range(len(input_ids) - 1 - max(drafted, 0), len(input_ids)):
                    sample_rows.append(row)
                    sampled.append(seq)
        max_blocks = max(len(seq.block_ids) for seq, _ in items)
        tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq, _ in items]
        if self.leads_ranks:
            logit_rows = list(range(len(input_ids))) if every_row_logits else sample_rows
            send_step(
                StepInputs(
                    input_ids, positions, slots, query_lens, context_lens, tables, logit_rows
                )
            )
        hidden = self._run_eager(
            input_ids, positions, slots, query_lens, context_lens, tables, pending
        )
        return hidden, sample_rows, sampled

    def _run_eager(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        query_lens: list[int],
        context_lens: list[int],
        tables: list[list[int]],
        pending: list[tuple[int, Sequence]] | None = None,
    ) -> torch.Tensor:
        num_decode = 0
        while num_decode < len(query_lens) and query_lens[num_decode] == 1:
            num_decode += 1
        dev = self.device
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            num_decode_tokens=num_decode,
            cu_seqlens_q=upload(cu, torch.int32, dev),
            context_lens=upload(context_lens, torch.int32, dev),
            slot_mapping=upload(slots, torch.int64, dev),
            block_tables=upload(tables, torch.int32, dev),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
        )
        ids = upload(input_ids, torch.int64, dev)
        self._fill_pending(ids, pending)
        return self.model(ids, upload(positions, torch.int64, dev), self.kv_caches, meta)
