"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, min-p, repetition penalty)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace

import torch

# Gemma 4's generation_config stops on <eos>, <turn|> and <|tool_response>.
DEFAULT_STOP_TOKEN_IDS = (1, 106, 50)

# Bounds inside which the sampler computes exactly (float32 logits). A positive temperature divides logits from
# which their maximum was subtracted, so the best token is exactly 0 and the rest <= 0: any temperature that is a
# normal float32 gives finite or -inf values, never NaN. A repetition penalty p divides positive logits and
# multiplies negative ones: within [1/2, 2] (2: vLLM's bound) any logit under half the float32 maximum stays
# finite, a masked -inf stays -inf and a 0 stays 0 (a penalty of 1e300 became inf in float32, and 0 x inf is NaN;
# one of 5e-324 became 0, and -inf x 0 is NaN).
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny  # 1.2e-38; smaller positive values are not float32 numbers
MAX_REPETITION_PENALTY = 2.0
MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None  # OpenAI's: logit -= count in the output x this (-2 to 2)
    presence_penalty: float | None = None  # OpenAI's: logit -= this, once a token is in the output (-2 to 2)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's generation_config
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (the prefill scores them)
    speculative: bool = True  # draft with the engine's drafter, where it has one (False: token by token)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")

        def number(name):  # a real, finite number (bools and NaN/inf are not)
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
            return v

        def integer(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an integer, got {v!r}")
            return v

        if integer("max_new_tokens") <= 0:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        t = number("temperature")
        if t < 0:
            bad(f"temperature must be >= 0, got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            bad(f"temperature {t!r} is too small to compute (use 0 for greedy, or at least {MIN_TEMPERATURE:.3g})")
        if self.top_k is not None and integer("top_k") < 0:
            bad(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < number("top_p") <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= number("min_p") <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and \
                not MIN_REPETITION_PENALTY <= number("repetition_penalty") <= MAX_REPETITION_PENALTY:
            bad(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                f"got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) is not None and not -2 <= number(name) <= 2:
                bad(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)!r}")
        if self.seed is not None and not SEED_RANGE[0] <= integer("seed") <= SEED_RANGE[1]:
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.speculative, bool):
            bad(f"speculative must be true or false, got {self.speculative!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= integer(name) <= 20:
                bad(f"{name} must be an integer in [0, 20], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """A checkpoint's generation_config.json, read once (LLM): its stop tokens and the sampling defaults that
    the API, the CLI and the server all use where a request leaves a value out (as vLLM does). Gemma 4 ships
    temperature 1.0, top_k 64, top_p 0.95; a checkpoint without the file samples at temperature 1 alone."""
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_TOKEN_IDS
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike | None) -> GenerationConfig:
        file = os.path.join(directory, "generation_config.json") if directory else None
        if not file or not os.path.isfile(file):
            return cls()
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
            eos = raw.get("eos_token_id")
            stops = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else DEFAULT_STOP_TOKEN_IDS
            greedy = raw.get("do_sample") is False
            values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw and f.name != "stop_token_ids"}
            out = cls(stops, **values)
            if greedy:
                out = replace(out, temperature=0.0)
            out.sampling(1)  # the same checks as a request's
            return out
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{file}: not a usable generation config: {e}") from None

    def sampling(self, max_new_tokens: int = 256, **given) -> SamplingParams:
        """SamplingParams for a request: each value given (not None) over these defaults. The one place that
        builds them; it validates them too."""
        defaults = {f.name: getattr(self, f.name) for f in fields(self)}
        return SamplingParams(max_new_tokens, **{**defaults, **{k: v for k, v in given.items() if v is not None}})


@dataclass
class Sampler:
    """Samples the tokens of one sequence; owns its random generator so a seed fixes its output alone."""
    params: SamplingParams
    seen: set = field(default_factory=set)  # tokens that the repetition penalty applies to
    constraint: object = None  # structured output (gemma4.chat.constrain): masks logits, follows the tokens
    generator: torch.Generator | None = None
    output: list = field(default_factory=list)  # the tokens sampled so far (frequency and presence penalties)

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
                and p.repetition_penalty in (None, 1.0) and not p.frequency_penalty and not p.presence_penalty)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] -> token id."""
        return self.sample(logits)[0]

    def rollback(self, tokens: list[int], k: int) -> None:
        """The sequence's last k sampled tokens were taken back; `tokens`: what it holds now. (The random
        generator is not rewound: a drafting loop that samples owns its own draws.)"""
        self.seen = set(tokens)
        del self.output[len(self.output) - k:]
        if self.constraint is not None:
            self.constraint.rollback(k)

    def sample(self, logits: torch.Tensor, draft: int | None = None) -> tuple[int, float | None,
                                                                               list[tuple[int, float]] | None]:
        """logits [vocab] -> (token id, its log-probability, the top-k (id, log-probability)) where the
        params ask for logprobs (of the model's distribution, before penalties and masks, as vLLM reports).
        `draft`: a token a drafter proposed here (its argmax: q = one-hot), verified by exact rejection
        sampling: kept with probability p(draft), else a token drawn from p without it. The token comes out
        with probability p, as without a draft (greedy: the argmax, whatever the draft)."""
        p = self.params
        logits = logits.float().cpu()  # may be the caller's own tensor (an inference tensor): never written
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
            penalized = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
            logits = logits.index_put((idx,), penalized)
        if (p.frequency_penalty or p.presence_penalty) and self.output:
            counts = torch.bincount(torch.tensor(self.output), minlength=logits.numel()).float()
            logits = logits - (p.frequency_penalty or 0.0) * counts - (p.presence_penalty or 0.0) * (counts > 0)
        best = logits.max()
        if best == float("-inf"):  # a grammar that allows no token
            raise ValueError("no token can be sampled: every token's logit is -inf")
        if not torch.isfinite(best):
            raise RuntimeError(f"the model's logits are not finite ({best.item()})")
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            logits = (logits - best) / p.temperature  # <= 0, the best exactly 0: finite for any temperature
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
            if draft is not None and float(torch.rand((), generator=self.generator)) < float(probs[draft]):
                token = draft
            else:
                if draft is not None:
                    probs[draft] = 0  # rejected: p(x) - q(x) < 0 there, p(y) - 0 elsewhere
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.seen.add(token)
        self.output.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if p.logprobs is not None:
            logprob = float(logp[token])
        return token, logprob, top


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[tuple | Exception]:
    """`samplers[r].sample(logits[r])` for each row of logits [B, vocab]; a row whose sampler fails gets its
    exception instead, and the other rows are sampled as usual. The plain greedy rows take one argmax on the
    logits' device, together: on a GPU, copying each row's 262,144 logits to the host and taking its argmax
    there cost more than the rest of a CUDA-graph decode step's host work."""
    out: list = [None] * len(samplers)
    greedy = [r for r, s in enumerate(samplers) if s.plain_greedy]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        for r, token in zip(greedy, rows.argmax(-1).tolist()):
            samplers[r].seen.add(token)
            samplers[r].output.append(token)
            out[r] = (token, None, None)
    for r, s in enumerate(samplers):
        if out[r] is None:
            try:
                out[r] = s.sample(logits[r])
            except Exception as e:  # this row's sampler or grammar; the caller ends that sequence alone
                out[r] = e
    return out
