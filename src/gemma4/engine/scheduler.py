"""Scheduler: which sequences run in the next step, and with which blocks.

Each step runs every admitted sequence that has exactly one token to feed (a decode, batched), plus chunks of
the prompts still being prefilled, up to `max_step_tokens` tokens in all, so that a long prompt never stalls
the decodes for longer than one chunk. A waiting request is admitted when a sequence slot and enough blocks
for its prompt are free; when a running sequence needs a block and none is free, the newest one is
preempted: its blocks go back and it waits to be recomputed (its sampler keeps its state, so its output
does not change). Cancelled sequences are dropped, and their blocks freed, at the start of the next step.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ..config import TextConfig
from .blocks import BlockPool, OutOfBlocks
from .kv import KINDS
from .sequence import Sequence, Status


@dataclass
class Work:
    seq: Sequence
    start: int  # first position fed
    count: int  # tokens fed


class Scheduler:
    def __init__(self, cfg: TextConfig, pools: dict[str, BlockPool], block_size: int, max_seqs: int,
                 max_step_tokens: int, media_ids: frozenset = frozenset(), max_rollback: int = 0):
        self.cfg, self.pools, self.bs, self.max_rollback = cfg, pools, block_size, max_rollback
        self.prefixes = next(iter(pools.values())).prefixes
        self.max_seqs, self.max_step_tokens, self.media_ids = max_seqs, max_step_tokens, media_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.arrivals = 0
        self.preemptions = 0  # counters, for tests and /metrics
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed

    # ---------------------------------------------------------------- blocks
    def _release(self, seq: Sequence) -> None:
        for kind, table in seq.blocks.items():
            for b in table:
                if b is not None:
                    self.pools[kind].release(b)
        seq.blocks = {k: [] for k in KINDS}
        seq.computed, seq.names = 0, []

    def _ensure_blocks(self, seq: Sequence, end: int) -> None:
        """Blocks for positions [0, end); sliding blocks wholly before the window of the next query dropped."""
        need = -(-end // self.bs)
        for kind, pool in self.pools.items():
            table = seq.blocks[kind]
            while len(table) < need:
                table.append(pool.allocate())
            if kind == "sliding":  # (kept as far back as a rollback may go)
                for i in range(self._window_first(seq.computed - self.max_rollback)):
                    if table[i] is not None:
                        pool.release(table[i])
                        table[i] = None

    def _window_first(self, position: int) -> int:
        """The first block a query at `position` reads on sliding layers."""
        return max(0, position - self.cfg.sliding_window + 1) // self.bs

    def rollback(self, seq: Sequence, copy_block) -> None:
        """After the sequence's last tokens were taken back: the K/V past the token now last are forgotten (the
        next step feeds that token again), and the blocks past it go back to their pools. A block to be
        rewritten that another sequence shares is first copied (copy_block(kind, src, dst)): that one still
        reads it. Back past the sliding blocks kept (`max_rollback`), it is recomputed, as after preemption."""
        seq.computed = min(seq.computed, len(seq) - 1)
        keep, end = seq.computed // self.bs, -(-len(seq) // self.bs)
        for kind, pool in self.pools.items():
            table = seq.blocks[kind]
            for b in table[end:]:
                if b is not None:
                    pool.release(b)
            del table[end:]
            for i in range(keep, len(table)):
                b = table[i]
                if b is not None and pool.refs[b] > 1:
                    table[i] = pool.allocate()  # (one was just released if any was needed)
                    copy_block(kind, b, table[i])
                    pool.release(b)
                elif b is not None:
                    pool.forget(b)
        del seq.names[keep:]
        sliding = seq.blocks.get("sliding", [])
        if any(b is None for b in sliding[self._window_first(seq.computed):]):
            self._requeue(seq)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks of the longest block-aligned prefix that can be resumed: every global block
        before it, and the sliding blocks that its window covers. The last token is always computed (its
        logits are needed), nothing from the first media token on (placeholders alone do not say
        which image), and no position whose prompt logprobs are still wanted."""
        end = min(len(seq) - 1, self._first_media(seq), len(seq.prompt_scores) if seq.scoring else len(seq))
        names = self.prefixes.find(seq.tokens[:end], self.bs, -seq.adapter)

        def cached(n: int) -> bool:  # can a sequence resume after n blocks?
            lo = {"full": 0, "sliding": self._window_first(n * self.bs)}
            return all(pool.has(pid) for kind, pool in self.pools.items() for pid in names[lo[kind]:n])

        n = next((i for i in range(len(names), 0, -1) if cached(i)), 0)
        if n == 0:
            return
        for kind, pool in self.pools.items():
            lo = self._window_first(n * self.bs) if kind == "sliding" else 0
            seq.blocks[kind] = [None] * lo + [pool.take_cached(pid) for pid in names[lo:n]]
        seq.computed, seq.names = n * self.bs, names[:n]

    def _first_media(self, seq: Sequence) -> int:
        return next((i for i, t in enumerate(seq.tokens) if t in self.media_ids), len(seq)) if self.media_ids \
            else len(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward: name the blocks it completed, so that later sequences can reuse them."""
        tokens = seq.tokens
        for i in range(len(seq.names), min(seq.computed, self._first_media(seq)) // self.bs):
            pid = self.prefixes.name(seq.names[-1] if seq.names else -seq.adapter,
                                     tokens[i * self.bs:(i + 1) * self.bs])
            seq.names.append(pid)
            for kind, pool in self.pools.items():
                if seq.blocks[kind][i] is not None:
                    pool.register(seq.blocks[kind][i], pid)

    # ---------------------------------------------------------------- scheduling
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _fits(self, seq: Sequence) -> bool:
        tokens = min(len(seq) + 1, len(seq) - seq.computed + self.max_step_tokens)
        need = {"full": -(-(len(seq) + 1) // self.bs) - len(seq.blocks["full"]),
                "sliding": -(-min(tokens, self.cfg.sliding_window + self.max_step_tokens) // self.bs) + 1}
        return all(need[k] <= len(p.free) for k, p in self.pools.items())

    def _preempt(self, protect: Sequence) -> Sequence | None:
        victims = [s for s in self.running if s is not protect]
        if not victims:
            return None
        victim = max(victims, key=lambda s: s.arrival)
        self.preemptions += 1
        self._requeue(victim)
        return victim

    def _requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue, its blocks released: recomputed when admitted again (its full blocks
        stay in the prefix cache until reused)."""
        self._release(seq)
        seq.status = Status.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _chunk_end(self, seq: Sequence, start: int, count: int) -> int:
        """Move a chunk's end back to the start of a media run it would cut (or past the run, if the chunk
        begins with it): an image's tokens attend to each other and are fed together."""
        tokens, end = seq.tokens, start + count
        if end >= len(seq) or tokens[end] not in self.media_ids or tokens[end - 1] not in self.media_ids:
            return end
        run_start = end
        while run_start > start and tokens[run_start - 1] in self.media_ids:
            run_start -= 1
        if run_start > start:
            return run_start
        while end < len(seq) and tokens[end] in self.media_ids:
            end += 1
        return end

    def schedule(self) -> list[Work]:
        for seq in [s for s in (*self.running, *self.waiting) if s.cancelled]:
            self.finish(seq, "cancelled")
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            if self.running and not self._fits(seq):
                self._release(seq)  # its cached prefix stays cached; taken again when it fits
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.arrivals += 1
            seq.arrival = self.arrivals
            self.cached_tokens += seq.computed
            self.running.append(seq)

        work, budget = [], self.max_step_tokens
        for seq in sorted(self.running, key=lambda s: s.uncomputed > 1):  # decodes first
            if seq.status is not Status.RUNNING or (seq.uncomputed > 1 and budget <= 0):
                continue  # (preempted while making room for an earlier one)
            count = 1 if seq.uncomputed == 1 else \
                self._chunk_end(seq, seq.computed, min(seq.uncomputed, budget)) - seq.computed
            while True:
                try:
                    self._ensure_blocks(seq, seq.computed + count)
                    break
                except OutOfBlocks:
                    victim = self._preempt(protect=seq)
                    if victim is None:  # alone and still out of memory: it cannot grow any further
                        self.finish(seq, "length")
                        break
                    budget += sum(w.count for w in work if w.seq is victim)
                    work = [w for w in work if w.seq is not victim]
            if seq.status is Status.RUNNING:
                work.append(Work(seq, seq.computed, count))
                budget -= count
        return work
