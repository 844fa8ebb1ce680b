"""A request as the engine sees it: its tokens, how many of them are in the K/V cache, its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sample import Sampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks were taken back)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset
    sampler: Sampler
    media: list | None = None  # encoded media (one [N, E] tensor per placeholder run), in prompt order
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    computed: int = 0  # tokens whose K/V are in the cache (the rest is fed by the next forwards)
    blocks: dict = field(default_factory=lambda: {"full": [], "sliding": []})  # kind -> block ids (None: dropped)
    names: list = field(default_factory=list)  # prefix ids of its leading blocks in the prefix cache (blocks.py)
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: int = 0  # admission order: the newest running sequence is preempted first
    drafts: int = 0  # the last `drafts` tokens of output are a drafter's proposals, not verified yet
    draft_from: tuple | None = None  # (target hidden [1, 1, E], {kind: (K, V, mask)}, position): drafting's start
    acceptance: float = 1.0  # running estimate of the chance that a draft is kept (engine: how many to draft)
    plain_steps: int = 0  # steps decoded without drafts since the last drafting one
    adapter: int = 0  # the served LoRA adapter's slot (0: the base model)
    prompt_scores: list = field(default_factory=list)  # params.prompt_logprobs: (logprob, top) of prompt tokens 1..
    added_at: float = 0.0  # time.monotonic() when it reached the engine, and when first scheduled (metrics)
    scheduled_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_range(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a decode step wants one token)."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        return self.prompt[start:] + self.output[max(0, start - p):end - p] if start < p \
            else self.output[start - p:end - p]

    @property
    def scoring(self) -> bool:
        """Whether prompt tokens wait to be scored (prompt_logprobs): until then, each position they follow is
        computed here, not taken from the prefix cache."""
        return self.params.prompt_logprobs is not None and len(self.prompt_scores) < len(self.prompt) - 1

    @property
    def uncomputed(self) -> int:
        return len(self) - self.computed
