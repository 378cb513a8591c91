from pipeline.engine.block_manager import BlockManager
from pipeline.engine.sequence import Sequence


def seq_of(n: int) -> Sequence:
    return Sequence(list(range(n)), prompt_len=n)


def test_allocate_fork_copy_on_write_and_free_return_every_block():
    blocks = BlockManager(num_blocks=10, block_size=4)
    parent = seq_of(6)  # 2 blocks, the second half full
    blocks.allocate(parent)
    child = parent.child(1)
    blocks.fork(child)
    assert blocks.num_free == 8
    for s in (parent, child):
        s.token_ids.append(99)  # position 6: inside the shared partial block
    shared_block = parent.block_table[1]
    # positions 4, 5 of the shared block hold K/V: those are copied
    assert blocks.append_slot(parent) == (shared_block, parent.block_table[1], 2)
    assert blocks.append_slot(child) is None  # the last owner writes in place
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]
    blocks.free(parent)
    blocks.free(child)
    assert blocks.num_free == 10 and set(blocks.ref_counts) == {0}


def test_append_at_a_block_boundary_takes_a_new_block_without_copy():
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = seq_of(4)
    blocks.allocate(seq)
    seq.token_ids.append(7)
    assert blocks.blocks_needed_to_append(seq) == 1
    assert blocks.append_slot(seq) is None
    assert len(seq.block_table) == 2


def test_beams_moving_rows_keep_reference_counts_exact():
    """Beams forking, growing, moving into each other's rows (`share`) and ending, at random:
    every block's count is the number of tables holding it, and all come back at the end.
    One move hands over a table that is no prefix-sharing sibling (`share` then counts all)."""
    import random

    rng = random.Random(0)
    blocks = BlockManager(num_blocks=400, block_size=4)
    root = seq_of(9)
    blocks.allocate(root)
    beams = [root]
    for step in range(200):
        if len(beams) < 4:
            child = rng.choice(beams).child(len(beams))
            blocks.fork(child)
            beams.append(child)
        for seq in beams:
            seq.token_ids.append(step)
            blocks.append_slot(seq)
        for _ in range(rng.randrange(3)):
            row, parent = rng.sample(beams, 2)
            blocks.share(row, parent)
            row.token_ids = list(parent.token_ids)
        if step == 100:  # a table that shares nothing with the row's
            stranger = seq_of(13)
            blocks.allocate(stranger)
            blocks.share(beams[0], stranger)
            beams[0].token_ids = list(stranger.token_ids)
            blocks.free(stranger)
        held = [b for seq in beams for b in seq.block_table]
        assert blocks.ref_counts == [held.count(b) for b in range(400)]
    for seq in beams:
        blocks.free(seq)
    assert blocks.num_free == 400 and set(blocks.ref_counts) == {0}


def test_share_counts_whole_tables_that_agree_only_at_the_end():
    """Tables equal in their last block but not before (no shared prefix): every block
    changes owner, not just the differing tail."""
    blocks = BlockManager(num_blocks=8, block_size=4)
    row, source = seq_of(12), seq_of(12)
    row.block_table, source.block_table = [0, 1, 2], [3, 4, 2]
    blocks.ref_counts[:5] = [1, 1, 2, 1, 1]
    blocks.free_blocks = [7, 6, 5]
    blocks.share(row, source)
    assert row.block_table == [3, 4, 2]
    assert blocks.ref_counts[:5] == [0, 0, 2, 2, 2]
    assert sorted(blocks.free_blocks) == [0, 1, 5, 6, 7]


def test_a_moved_beam_takes_its_copy_of_a_partial_last_block_at_once():
    """Both beams write their next token into the source's partial last block: `share`
    gives the moved one its private copy there and then (the source keeps the block), so
    that the next `append_slots` passes both by; at a block boundary nothing is copied."""
    blocks = BlockManager(num_blocks=16, block_size=4)
    source = seq_of(6)  # positions 0-5: the second block holds 2
    blocks.allocate(source)
    row = source.child(1)
    blocks.fork(row)
    row.token_ids.append(1)  # a sibling that went its own way
    blocks.append_slot(row)
    src_block = source.block_table[1]
    copy = blocks.share(row, source)
    assert copy == (src_block, row.block_table[1], 2)
    assert row.block_table[0] == source.block_table[0] and row.block_table[1] != src_block
    assert blocks.ref_counts[src_block] == 1 and blocks.ref_counts[row.block_table[1]] == 1
    for seq in (source, row):
        seq.token_ids[:] = [*source.token_ids[:6], 9]
    assert blocks.append_slots([source, row]) == ([], [])

    at_boundary = seq_of(8)
    blocks.allocate(at_boundary)
    other = seq_of(8)
    blocks.allocate(other)
    assert blocks.share(other, at_boundary) is None
    assert other.block_table == at_boundary.block_table


def test_a_moved_copy_goes_with_its_rows_next_decode_unless_the_beam_is_gone():
    """`Scheduler.rebase`'s copies travel with the next decode batch that holds the moved
    row (with that row), and are dropped for a sequence released in between (its
    destination block may be someone else's by then)."""
    from pipeline.engine.scheduler import Scheduler
    from pipeline.engine.sequence import Request

    scheduler = Scheduler(BlockManager(num_blocks=32, block_size=4), 8, 64)
    requests = []
    for r in range(2):
        request = Request(f"r{r}", list(range(6)), params=None, seed=0, arrival=r)  # type: ignore[arg-type]
        parent = seq_of(6)
        scheduler.blocks.allocate(parent)
        request.seqs = [parent, scheduler.fork(parent, 1)]
        scheduler.running.append(request)
        requests.append(request)
    for request in requests:  # row 1 takes row 0's history
        scheduler.rebase(request.seqs[1], request.seqs[0])
    scheduler.release(requests[1].seqs.pop(1))  # the second request's moved beam ended
    for request in requests:
        for seq in request.seqs:
            seq.token_ids.append(7)
    batch = scheduler.schedule_decode()
    assert batch is not None
    moved = requests[0].seqs[1]
    assert batch.copy_rows == [1] and batch.copies == [
        (requests[0].seqs[0].block_table[1], moved.block_table[1], 2)
    ]
    assert batch.changed_rows == [1] and not scheduler._moved_copies
