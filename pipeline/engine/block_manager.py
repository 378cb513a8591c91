"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts.

Pure policy-free accounting: it never touches tensors. Copy-on-write copies it decides on
are returned as (src, dst, filled) triples - the block, its private copy, and how many of
its positions hold K/V - for the runner to perform before the forward.
"""

from __future__ import annotations

from pipeline.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of a (prefill) sequence's tokens."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self._take() for _ in range(self.blocks_for(len(seq)))]

    def take(self, count: int) -> list[int]:
        """`count` blocks owned by the caller alone (an encoder-decoder request's cross K/V)."""
        return [self._take() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        """Blocks from `take` lose their owner."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def fork(self, seq: Sequence) -> None:
        """`seq` was copied from a parent: its blocks now have one more owner."""
        for block in seq.block_table:
            self.ref_counts[block] += 1

    def share(self, seq: Sequence, source: Sequence) -> tuple[int, int, int] | None:
        """`seq` gives up its blocks and shares `source`'s (a beam moving into its row).
        Both will write the K/V of their next token at position len(source): inside the
        last block when it is partial. `seq` takes its private copy of that block now, and
        the copy on write (src, dst, filled) is returned for the runner to perform before
        the next forward; then the next `append_slots` passes both rows by."""
        old, new = seq.block_table, source.block_table
        # Beams of one request share their prompt's full blocks (unless a preemption had
        # them recomputed apart): those keep their owner count, only the rest change.
        same = seq.prompt_len // self.block_size
        if old[:same] != new[:same]:
            same = 0
        for block in new[same:]:  # first: blocks the two share never reach 0
            self.ref_counts[block] += 1
        self.release(old[same:])
        seq.block_table = list(new)
        filled = len(source.token_ids) % self.block_size
        if not filled or not new:
            return None
        last, copy = new[-1], self._take()
        self.ref_counts[last] -= 1  # still the source's
        seq.block_table[-1] = copy
        return last, copy, filled

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    def blocks_needed_to_append(self, seq: Sequence) -> int:
        """New blocks the next decode step needs for `seq` (0 or 1)."""
        position = len(seq) - 1  # the token whose K/V the step writes
        if position // self.block_size == len(seq.block_table):
            return 1
        return 1 if self.ref_counts[seq.block_table[-1]] > 1 else 0

    def append_slot(self, seq: Sequence) -> tuple[int, int, int] | None:
        """Make room for the K/V of `seq`'s last token; returns a copy-on-write (src, dst,
        filled): the positions before that token in its block are the ones to copy."""
        position = len(seq) - 1
        if position // self.block_size == len(seq.block_table):
            seq.block_table.append(self._take())
            return None
        last = seq.block_table[-1]
        if self.ref_counts[last] == 1:
            return None
        # The partial last block is shared with a sibling: write into a private copy.
        copy = self._take()
        self.ref_counts[last] -= 1
        seq.block_table[-1] = copy
        return last, copy, position % self.block_size

    def append_slots(self, seqs: list[Sequence]) -> tuple[list[tuple[int, int, int]], list[int]]:
        """`append_slot` for each of a decode batch's sequences, in order; returns the copies
        on write and their rows. Most rows need nothing (room in a last block of their own):
        one test skips them (at 1,024 beams, half the cost of calling `append_slot` on all)."""
        copies, rows = [], []
        size, owners = self.block_size, self.ref_counts
        for row, seq in enumerate(seqs):
            table = seq.block_table
            if (len(seq.token_ids) - 1) // size < len(table) and owners[table[-1]] == 1:
                continue
            copy = self.append_slot(seq)
            if copy is not None:
                copies.append(copy)
                rows.append(row)
        return copies, rows

    def _take(self) -> int:
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block
