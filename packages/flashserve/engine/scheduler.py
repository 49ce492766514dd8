"""Decides, every step, which sequences run and how many tokens each computes.

One token budget per step is shared by everything: running sequences go
first (a decode costs one token, an unfinished prompt continues with the next
chunk), then waiting ones are admitted with whatever budget is left. A long
prompt is therefore computed in chunks across steps while the decodes of other
requests keep moving. When blocks run out, the newest running sequence is
preempted: its blocks are released and it goes back to the front of the queue
to be recomputed (prefix caching makes that cheap), never dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from flashserve.engine.block_manager import BlockManager
from flashserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        reclaim: Callable[[], bool] | None = None,
    ) -> None:
        self.blocks = block_manager
        # Frees blocks held outside the running and waiting sequences (parked
        # context_only KV); True if it freed any. Called only when nothing else can
        # make room, so a parked context never costs progress, nor progress a context.
        self.reclaim = reclaim or (lambda: False)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.total_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, keep_blocks: bool = False) -> None:
        """Take a sequence out of the engine wherever it is and free its blocks.

        keep_blocks: the caller takes over the blocks (a parked context_only request).
        """
        if seq.status is SequenceStatus.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, hold: Collection[Sequence] = ()) -> ScheduledBatch:
        """This step's batch. `hold`: running sequences to leave out of it (their pending
        token ends them: engine/async_scheduling.py)."""
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq in hold:
                i += 1
                continue
            # A speculative draft rides along with its sequence's decode, budget permitting.
            n = min(seq.num_uncomputed_tokens + len(seq.draft_token_ids), budget)
            while not self.blocks.allocate(seq, n):
                if seq.draft_token_ids:  # give up the draft before anyone's KV
                    seq.draft_token_ids.clear()
                    n = min(seq.num_uncomputed_tokens, budget)
                    continue
                if self.running[-1] is seq and self.reclaim():
                    continue  # nothing left to preempt but seq itself
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                del seq.draft_token_ids[max(0, n - seq.num_uncomputed_tokens) :]
                items.append((seq, n))
                budget -= n
                i += 1
        # Admitting new work while evicting running work would only thrash.
        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if not seq.block_ids:
                self.blocks.reuse_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.allocate(seq, n):
                if not self.running and not items and self.reclaim():
                    continue  # an idle engine that cannot admit anything: free parked KV
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, n))
            budget -= n
        self.total_preemptions += preempted
        return ScheduledBatch(items=items)

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_token_ids.clear()
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
