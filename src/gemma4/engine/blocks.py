"""Block manager: K/V memory in fixed-size blocks of `block_size` positions, one pool per kind of layer.

Gemma 4 has two kinds of layer that own K/V (KV-shared layers own none): global layers keep every
position, sliding layers only the last `window`. Each kind gets its own pool, because a block of one kind
holds a different number of bytes than a block of the other; a sequence has one block table per kind.
Sliding blocks that fall out of the window (and out of reach of a rollback) go back to their pool, so a
sliding layer holds about one window per sequence however long it runs. Block 0 of each pool is never handed
out: it is the scratch block of padding rows (engine/kv.py).

Prefix cache: a block whose positions are all written is named by its prefix (`Prefixes`): the name of the
prefix before it and its own token ids. A later sequence with the same tokens takes the block instead of
computing it again. Names are looked up in a dict, which compares the token ids themselves: a hash collision
never hands out another prompt's K/V. Freed blocks keep their name until they are handed out again (oldest
first), so a finished chat turn's blocks serve the next turn.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict


class OutOfBlocks(Exception):
    pass


class Prefixes:
    """Unique ids of block-aligned token prefixes: id(prefix + block) = ids[(id(prefix), block's tokens)], 0 for
    the empty prefix. An id lives while some pool holds a block under it."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.key_of: dict[int, tuple] = {}
        self.holders: dict[int, int] = {}  # id -> blocks registered under it, over all pools
        self.counter = itertools.count(1)

    def find(self, tokens: list[int], block_size: int, root: int = 0) -> list[int]:
        """Ids of the leading full blocks of `tokens` that are known, up to the first that is not. `root`: the
        empty prefix's id, 0 for the base model and -slot under a served LoRA adapter (its K/V differ)."""
        out, parent = [], root
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = self.ids.get((parent, *tokens[start:start + block_size]))
            if parent is None:
                break
            out.append(parent)
        return out

    def name(self, parent: int, block_tokens: list[int]) -> int:
        key = (parent, *block_tokens)
        pid = self.ids.get(key)
        if pid is None:
            pid = self.ids[key] = next(self.counter)
            self.key_of[pid], self.holders[pid] = key, 0
        return pid

    def hold(self, pid: int, delta: int) -> None:
        self.holders[pid] += delta
        if self.holders[pid] == 0:
            del self.ids[self.key_of.pop(pid)], self.holders[pid]


class BlockPool:
    def __init__(self, num_blocks: int, block_bytes: int, prefixes: Prefixes | None = None):
        self.num_blocks, self.block_bytes = num_blocks, block_bytes
        self.prefixes = prefixes or Prefixes()
        self.refs = [0] * num_blocks
        self.name_of: dict[int, int] = {}  # block -> prefix id of its (full) contents
        self.block_of: dict[int, int] = {}  # prefix id -> block
        # Free blocks, oldest released first; a cached one keeps its name until handed out again.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks
        block, _ = self.free.popitem(last=False)
        self.forget(block)
        self.refs[block] = 1
        return block

    def take_cached(self, pid: int) -> int | None:
        """The block holding the prefix `pid`, with a reference taken on it; None if there is none."""
        block = self.block_of.get(pid)
        if block is not None:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        return block

    def has(self, pid: int) -> bool:
        return pid in self.block_of

    def register(self, block: int, pid: int) -> None:
        """Record that `block` now holds the full contents of prefix `pid` (a duplicate keeps the first copy)."""
        if pid not in self.block_of and block not in self.name_of:
            self.block_of[pid], self.name_of[block] = block, pid
            self.prefixes.hold(pid, +1)

    def forget(self, block: int) -> None:
        """`block`'s contents are about to change (handed out again, or rewritten after a rollback)."""
        pid = self.name_of.pop(block, None)
        if pid is not None:
            del self.block_of[pid]
            self.prefixes.hold(pid, -1)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, "block released twice"
        if self.refs[block] == 0:
            self.free[block] = None
