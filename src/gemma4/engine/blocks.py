"""Block manager: K/V memory in fixed-size blocks of `block_size` positions, one pool per kind of layer.

Gemma 4 has two kinds of layer that own K/V (KV-shared layers own none): global layers keep every
position, sliding layers only the last `window`. Each kind gets its own pool, because a block of one kind
holds a different number of bytes than a block of the other; a sequence has one block table per kind.
Sliding blocks that fall out of the window go back to their pool at once, so a sliding layer holds about
one window per sequence however long it runs.

Prefix cache: a block whose positions are all written gets a hash of every token up to its end (a chain:
the hash of the previous block and its own tokens). A later sequence with the same tokens takes the block
instead of computing it again. Freed blocks keep their hash until they are handed out again (oldest
first), so a finished chat turn's blocks serve the next turn. Resuming at position P needs the global
blocks before P and the sliding blocks of the window before P (see `Scheduler._reuse_prefix`).
"""
from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(Exception):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_bytes: int):
        self.num_blocks, self.block_bytes = num_blocks, block_bytes
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> hash of its (full) contents
        self.block_of: dict[int, int] = {}  # hash -> block
        # Free blocks, oldest released first; a cached one keeps its hash until handed out again.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None:
            del self.block_of[old]
        self.refs[block] = 1
        return block

    def take_cached(self, h: int) -> int | None:
        """The block holding the contents with hash `h`, with a reference taken on it; None if there is none."""
        block = self.block_of.get(h)
        if block is not None:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        return block

    def has(self, h: int) -> bool:
        return h in self.block_of

    def register(self, block: int, h: int) -> None:
        """Record that `block` now holds the full contents hashed `h` (a duplicate keeps the first copy)."""
        if h not in self.block_of and block not in self.hash_of:
            self.block_of[h], self.hash_of[block] = block, h

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, "block released twice"
        if self.refs[block] == 0:
            self.free[block] = None


def block_hashes(tokens: list[int], block_size: int, salt: int = 0) -> list[int]:
    """Chain hash of each full block of `tokens`."""
    out, h = [], salt
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, *tokens[start:start + block_size]))
        out.append(h)
    return out
