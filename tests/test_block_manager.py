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
