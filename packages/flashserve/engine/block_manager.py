"""Fixed-size KV-cache blocks: allocation, reference counts and prefix reuse.

A full block is identified by the hash of its tokens chained with the hash of
the block before it, so equal prefixes map to equal hashes. Freed blocks keep
their hash and stay findable until they are handed out again (LRU order), so
a later request with the same prefix skips recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict

from flashserve.engine.sequence import Sequence


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # Blocks nobody holds, oldest release first; the front is reused first.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reuse_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks that hold the start of seq's tokens; return tokens covered.

        At least one token is always left to compute, because the step that
        computes it is the one that produces the next token's logits.
        """
        assert not seq.block_ids
        if not self.enable_prefix_caching:
            return 0
        reusable = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, reusable)
        self.prefix_queries += reusable
        for h in seq.block_hashes[:reusable]:
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_ids.append(block)
        self.prefix_hits += len(seq.block_ids)
        seq.num_computed_tokens = len(seq.block_ids) * self.block_size
        seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more computed tokens; False if blocks run out."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]  # evict: its contents are about to change
            self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_ids.append(block)
        return True

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks; shared or cached ones may live on."""
        # Tail blocks go to the front of the queue: they are the least likely
        # to be shared, so they are reused before the prompt's prefix blocks.
        for block in reversed(seq.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_ids.clear()
        seq.num_published_blocks = 0
        seq.num_computed_tokens = 0

    def trim(self, seq: Sequence) -> None:
        """Give back seq's blocks past those its known tokens need (a rejected draft's)."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_ids) > keep:
            block = seq.block_ids.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                # Never hashed (only full blocks of accepted tokens are): reused first.
                self.free[block] = None
                self.free.move_to_end(block, last=False)
        seq.num_published_blocks = min(seq.num_published_blocks, len(seq.block_ids))

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of blocks seq has completely computed, for reuse.

        Called for every scheduled sequence every step: it starts after the blocks it
        already published (a sequence's leading blocks change only when release clears
        them), so a step costs the new full blocks, not the whole context.
        """
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        self._extend_hashes(seq, full)
        for i in range(min(seq.num_published_blocks, full), full):
            block, h = seq.block_ids[i], seq.block_hashes[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = h
                self.cached.setdefault(h, block)
        seq.num_published_blocks = max(seq.num_published_blocks, full)

    def _extend_hashes(self, seq: Sequence, count: int) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < count:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else 0
            seq.block_hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1
