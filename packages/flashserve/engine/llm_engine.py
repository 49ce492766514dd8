"""The synchronous engine: add requests, step, collect outputs.

`AsyncEngine` (engine/async_engine.py) runs this on its own thread; tests and
benchmarks can drive it directly. Loading and sizing are engine/startup.py; the
other tensor-parallel ranks, distributed/rank_zero.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flashserve.config import EngineConfig
from flashserve.distributed.rank_zero import RankZero
from flashserve.engine.async_scheduling import (
    PENDING_TOKEN,
    StepInFlight,
    ends_with_pending_token,
    needs_token_before_next_step,
    overlap_enabled,
)
from flashserve.engine.block_manager import BlockManager
from flashserve.engine.disaggregation import (
    CONTEXT_ONLY,
    GENERATION_ONLY,
    ContextHandle,
    ContextTable,
    resumed_sequence,
)
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.scheduler import Scheduler
from flashserve.engine.sequence import Sequence, SequenceOutput, SequenceStatus, TokenLogprob
from flashserve.engine.speculative.speculator import SpeculationStats, Speculator
from flashserve.engine.speculative.verify import Emission, verify_step
from flashserve.engine.startup import finish_startup, load_engine_model
from flashserve.engine.structured import accept_sampled_token, grammar_terminated, make_matcher

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_queries: int
    prefix_hits: int
    preemptions: int
    speculation: SpeculationStats | None = None


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        self.config = config
        self.tensor_parallel_size = config.tensor_parallel_size or 1
        loaded = load_engine_model(config, model_dir, eos_token_ids, self.tensor_parallel_size)
        self.device, self.cpu_threads, self.dtype = loaded.device, loaded.cpu_threads, loaded.dtype
        self.model_config, self.max_model_len = loaded.model_config, loaded.max_model_len
        self.attention_backend, self.block_size = loaded.attention_backend, loaded.block_size
        self.eos_token_ids, self.startup_seconds = loaded.eos_token_ids, loaded.startup_seconds
        self.ranks: RankZero | None = loaded.ranks
        self.model, self.runner = loaded.model, loaded.runner
        try:
            self._build_step_state(loaded.num_blocks)
            finish_startup(loaded, config)
        except BaseException:
            self.abandon()
            raise

    def _build_step_state(self, num_blocks: int) -> None:
        """The scheduler and what it schedules over: KV blocks, parked contexts, drafts."""
        config = self.config
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        # Parked context_only requests; the scheduler takes their blocks back when
        # nothing else can make room.
        self.contexts = ContextTable(release=self.block_manager.release)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            reclaim=self.contexts.evict_oldest,
        )
        self.sequences: dict[str, Sequence] = {}
        config.check_speculative()
        self.speculator = (
            Speculator(config, self.model_config.vocab_size, self.max_model_len)
            if config.speculative_method == "ngram"
            else None
        )
        # Outputs due before the next step's (a resumed generation_only request's first token).
        self._pending_outputs: list[SequenceOutput] = []
        # Async scheduling (engine/async_scheduling.py). Off with speculation (drafts need
        # the host's tokens) and under tensor parallel (the other ranks get a step's token
        # ids from rank 0's host, which a pending draw has not reached yet).
        self.async_scheduling = (
            overlap_enabled(config.async_scheduling, self.device)
            and self.speculator is None
            and self.tensor_parallel_size == 1
        )
        self._in_flight: StepInFlight | None = None
        self.overlapped_steps = 0  # launched while the previous step's draws were in flight
        self.steps = 0

    # -- tensor-parallel ranks (distributed/rank_zero.py) -------------------

    @property
    def failure(self) -> str | None:
        """Why the engine cannot step any more (a tensor-parallel rank died), or None."""
        return self.ranks.failure if self.ranks is not None else None

    def close(self) -> None:
        """Stop the worker ranks (after the engine's last step; nothing at size 1)."""
        ranks, self.ranks = self.ranks, None
        if ranks is not None:
            ranks.close()

    def abandon(self) -> None:
        """Kill the worker ranks without any collective (the engine failed)."""
        ranks, self.ranks = self.ranks, None
        if ranks is not None:  # None: size 1, or already closed
            ranks.abandon()

    # -- requests ---------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self.sequences:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens leaves no room in a {self.max_model_len}-token context"
            )
        self.contexts.expire()
        disaggregated = params.disaggregated
        if disaggregated is not None and disaggregated.request_type == GENERATION_ONLY:
            self._resume(request_id, prompt_token_ids, params)
            return
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        # The grammar was compiled off this thread; a matcher per sequence is cheap.
        seq.grammar_matcher = make_matcher(params.grammar)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def _resume(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Continue a parked context_only request; its first token is this request's first output."""
        assert params.disaggregated is not None and params.disaggregated.handle is not None
        entry = self.contexts.claim(params.disaggregated.handle, prompt_token_ids)
        seq = resumed_sequence(entry, request_id, params, self.device)
        first = seq.token_ids[-1]
        seq.grammar_matcher = make_matcher(params.grammar)
        error = accept_sampled_token(seq, first)
        finish, stop_reason = ("error", None) if error else self._check_stop(seq, first)
        logprob = entry.first_logprob if params.logprobs else None
        if logprob is not None:
            logprob = TokenLogprob(
                logprob.token_id, logprob.logprob, logprob.top[: params.top_logprobs]
            )
        self._pending_outputs.append(_token_output(seq, first, logprob, finish, stop_reason, error))
        if finish is not None:
            self.block_manager.release(seq)
            return
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        return True

    def has_work(self) -> bool:
        flight = self._in_flight
        # A launched step is work while it holds a draw that someone still waits for.
        return (
            self.scheduler.has_work()
            or bool(self._pending_outputs)
            or (
                flight is not None
                and any(s.status is not SequenceStatus.FINISHED for s in flight.launched.sampled)
            )
        )

    # -- one step ---------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        """Schedule and run one step; return the outputs that are ready.

        With async scheduling (engine/async_scheduling.py) the step launched here is
        finished by the next call, after that call has launched its own: outputs lag
        the model by one step, and a last call with nothing to schedule flushes them.
        """
        self.steps += 1
        if self.config.fault_after_steps is not None and self.steps > self.config.fault_after_steps:
            raise RuntimeError("injected engine fault (fault_after_steps)")
        self.contexts.expire()
        outputs, self._pending_outputs = self._pending_outputs, []
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and any(
            needs_token_before_next_step(seq) for seq in in_flight.launched.sampled
        ):
            outputs.extend(self._finish(in_flight))
            in_flight = None
        speculator = self.speculator
        if speculator is not None:
            speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule(hold=self._ending(in_flight))
        launched = None
        if not batch.empty:
            if speculator is not None and any(seq.draft_token_ids for seq, _ in batch.items):
                outputs.extend(self._verify(batch.items, speculator))
            else:
                launched = self._launch(batch.items)
        if in_flight is not None:
            self.overlapped_steps += launched is not None
            outputs.extend(self._finish(in_flight))
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs.extend(self._finish(launched))
        return outputs

    def _ending(self, in_flight: StepInFlight | None) -> set[Sequence]:
        """Sequences that their pending token surely ends: not scheduled again."""
        if in_flight is None:
            return set()
        return {
            seq
            for seq in in_flight.launched.sampled
            if ends_with_pending_token(seq, self.max_model_len, _context_only(seq))
        }

    def _launch(self, items: list[tuple[Sequence, int]]) -> StepInFlight:
        """Run (on a GPU: queue) the model and the sampler; each sampled sequence gets
        PENDING_TOKEN until _finish writes its draw."""
        started = time.perf_counter()
        decode_only = all(seq.num_uncomputed_tokens == 1 for seq, _ in items)
        launched = self.runner.launch(items)
        for seq, n in items:
            seq.num_computed_tokens += n
        pending_index = []
        for seq in launched.sampled:
            pending_index.append(len(seq.token_ids))
            seq.token_ids.append(PENDING_TOKEN)
        return StepInFlight(launched, pending_index, decode_only, items, started)

    def _finish(self, flight: StepInFlight) -> list[SequenceOutput]:
        """Bring a launched step's draws to the host and emit them."""
        launched = flight.launched
        result = launched.draws.resolve() if launched.draws is not None else None
        emissions: list[tuple[Emission, int]] = []
        if result is not None:
            for seq, index, token, logprob in zip(
                launched.sampled, flight.pending_index, result.token_ids, result.logprobs
            ):
                # A sequence aborted, or ended by an earlier draw, drops this one.
                if seq.status is not SequenceStatus.FINISHED:
                    seq.token_ids[index] = token
                    emissions.append((Emission(seq, [token], [logprob]), index))
        for seq, _ in flight.items:
            if seq.status is not SequenceStatus.FINISHED:
                self.block_manager.register_full_blocks(seq)
        speculator = self.speculator
        if speculator is not None:
            if flight.decode_only:
                speculator.observe_step(
                    len(flight.items),
                    sum(n for _, n in flight.items),
                    time.perf_counter() - flight.started,
                )
            speculator.record([emission for emission, _ in emissions])
        return [self._emit(emission, index) for emission, index in emissions]

    def _verify(
        self, items: list[tuple[Sequence, int]], speculator: Speculator
    ) -> list[SequenceOutput]:
        """A step with drafts: run, verify and emit at once (drafts need the host's tokens)."""
        started = time.perf_counter()
        emissions = verify_step(self.runner, items, speculator.masks)
        if all(seq.num_uncomputed_tokens == 1 for seq, _ in items):
            speculator.observe_step(
                len(items), sum(n for _, n in items), time.perf_counter() - started
            )
        speculator.record(emissions)
        for seq, n in items:
            if seq.draft_token_ids:
                continue  # its computed tokens are known once its draft is verified
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        return [self._emit(emission) for emission in emissions]

    def _emit(self, emission: Emission, pending_index: int | None = None) -> SequenceOutput:
        """Record a step's tokens for one sequence, up to the first that ends it.

        pending_index: where the sequence's one drawn token already stands (written by
        _finish over its PENDING_TOKEN); otherwise the tokens are appended.
        """
        seq = emission.seq
        drafted = bool(seq.draft_token_ids)
        seq.draft_token_ids.clear()
        if drafted:
            # The last token and the accepted draft tokens are in the KV cache; the
            # rejected ones' slots are overwritten later, their whole blocks given back.
            seq.num_computed_tokens += 1 + emission.accepted
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish: str | None = None
        stop_reason: int | None = None
        error: str | None = None
        length = len(seq.token_ids)
        for token, logprob in zip(emission.token_ids, emission.logprobs):
            if pending_index is None:
                seq.token_ids.append(token)
                length = len(seq.token_ids)
            else:
                length = pending_index + 1
            tokens.append(token)
            if logprob is not None:
                logprobs.append(logprob)
            # Only newly sampled tokens advance the grammar (never a recompute's replay).
            error = accept_sampled_token(seq, token)
            finish, stop_reason = ("error", None) if error else self._check_stop(seq, token, length)
            if finish is not None:
                break
        if drafted:
            self.block_manager.register_full_blocks(seq)
            self.block_manager.trim(seq)
        handle = None
        context_only = _context_only(seq)
        if context_only and not error:
            # The context phase ends with its first token; its blocks stay
            # parked for the generation_only request that continues it.
            handle = self.contexts.park(seq, logprobs[0] if logprobs else None, finish, stop_reason)
            finish = finish or "length"
        output = SequenceOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            finished=finish is not None,
            finish_reason=finish,
            stop_reason=stop_reason,
            logprobs=logprobs or None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
            context_handle=handle,
        )
        if finish is not None:
            del seq.token_ids[length:]  # a draw launched after its end (async scheduling)
            self.sequences.pop(seq.request_id, None)
            self.scheduler.remove(seq, keep_blocks=handle is not None)
            if self.speculator is not None:
                self.speculator.forget(seq)
        return output

    def _check_stop(
        self, seq: Sequence, token: int, length: int | None = None
    ) -> tuple[str | None, int | None]:
        """Whether `token`, the length-th of seq's tokens (default: its last), ends it."""
        p = seq.params
        length = seq.num_tokens if length is None else length
        num_output_tokens = length - seq.num_prompt_tokens
        if grammar_terminated(seq):
            # The grammar accepted EOS, which it allows only once the output is complete.
            return "stop", None
        if num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if num_output_tokens >= p.max_tokens or length >= self.max_model_len:
            return "length", None
        return None, None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            preemptions=self.scheduler.total_preemptions,
            speculation=(
                dataclasses.replace(self.speculator.stats) if self.speculator is not None else None
            ),
        )


def _token_output(
    seq: Sequence,
    token: int,
    logprob: TokenLogprob | None,
    finish: str | None,
    stop_reason: int | str | None,
    error: str | None,
    handle: ContextHandle | None = None,
) -> SequenceOutput:
    return SequenceOutput(
        request_id=seq.request_id,
        new_token_ids=[token],
        finished=finish is not None,
        finish_reason=finish,
        stop_reason=stop_reason,
        logprobs=[logprob] if logprob is not None else None,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        error=error,
        context_handle=handle,
    )


def _context_only(seq: Sequence) -> bool:
    disaggregated = seq.params.disaggregated
    return disaggregated is not None and disaggregated.request_type == CONTEXT_ONLY
