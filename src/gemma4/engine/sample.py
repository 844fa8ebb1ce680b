"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, min-p, repetition penalty)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Gemma 4's generation_config stops on <eos>, <turn|> and <|tool_response>.
DEFAULT_STOP_TOKEN_IDS = (1, 106, 50)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's generation_config
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's log-probability and the top k

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")


@dataclass
class Sampler:
    """Samples the tokens of one sequence; owns its random generator so a seed fixes its output alone."""
    params: SamplingParams
    seen: set = field(default_factory=set)  # tokens that the repetition penalty applies to
    constraint: object = None  # structured output (gemma4.chat.constrain): masks logits, follows the tokens
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the logits as they are: no penalty, mask or log-probabilities to compute."""
        p = self.params
        return (p.temperature == 0 and self.constraint is None and p.logprobs is None
                and p.repetition_penalty in (None, 1.0))

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] -> token id."""
        return self.sample(logits)[0]

    def sample(self, logits: torch.Tensor) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """logits [vocab] -> (token id, its log-probability, the top-k (id, log-probability)) where the
        params ask for logprobs (of the model's distribution, before penalties and masks, as vLLM reports)."""
        p = self.params
        logits = logits.float().cpu()
        logprob = top = None
        if p.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            if p.logprobs:
                values, ids = logp.topk(p.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        if self.constraint is not None:
            logits = self.constraint.mask_logits(logits)
        if p.repetition_penalty not in (None, 1.0) and self.seen:
            idx = torch.tensor(sorted(self.seen))
            picked = logits[idx]
            # As transformers: divide positive logits, multiply negative ones.
            logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / p.temperature
            if p.top_k:
                kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if p.top_p is not None and p.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                # Drop a token once the tokens before it already cover top_p (the first always stays).
                drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p
                probs[order[drop]] = 0
            if p.min_p:
                probs[probs < p.min_p * probs.max()] = 0
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.seen.add(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if p.logprobs is not None:
            logprob = float(logp[token])
        return token, logprob, top


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[tuple[int, float | None, list | None]]:
    """`samplers[r].sample(logits[r])` for each row of logits [B, vocab]. The plain greedy rows take one
    argmax on the logits' device, together: on a GPU, copying each row's 262,144 logits to the host and
    taking its argmax there cost more than the rest of a CUDA-graph decode step's host work."""
    out: list = [None] * len(samplers)
    greedy = [r for r, s in enumerate(samplers) if s.plain_greedy]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        for r, token in zip(greedy, rows.argmax(-1).tolist()):
            samplers[r].seen.add(token)
            out[r] = (token, None, None)
    for r, s in enumerate(samplers):
        if out[r] is None:
            out[r] = s.sample(logits[r])
    return out
