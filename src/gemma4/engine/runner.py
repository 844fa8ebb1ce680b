"""Runs the model for generation: chunked prefill of each prompt into its row of a shared K/V cache, then
batched decode steps over the rows still running. Positions are each sequence's own token count."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..model import Gemma4
from .kv import KVCache
from .sample import Sampler, SamplingParams


@dataclass
class TokenEvent:
    index: int  # which prompt
    token_id: int
    finish_reason: str | None  # "stop" (a stop token), "length" (max_new_tokens or the context), None


@torch.inference_mode()
def step_logits(model: Gemma4, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                rows: slice = slice(None)) -> torch.Tensor:
    """Feed new tokens [B, T] at `positions` through the model; logits [B, vocab] of the last one."""
    embeds, ple_ids = model.embed(input_ids)
    T = input_ids.shape[1]
    hidden = model.language_model(embeds, ple_ids, positions, cache=cache, cache_rows=rows, keep=slice(T - 1, T))
    return model.language_model.logits(hidden)[:, -1]


def generate(model: Gemma4, prompts: list[list[int]], params: list[SamplingParams], stop_ids: list[set],
             prefill_chunk: int = 1024) -> Iterator[TokenEvent]:
    """Yield tokens as they are made, for a batch of prompts of any lengths."""
    device, cfg = model.device, model.config.text
    max_len = min(max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params)), cfg.max_position_embeddings)
    cache = KVCache(cfg, len(prompts), max_len, model.dtype, device)
    samplers = [Sampler(sp, seen=set(p)) for p, sp in zip(prompts, params)]
    lengths, last = [len(p) for p in prompts], []
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        for start in range(0, len(prompt), prefill_chunk):
            chunk = ids[:, start:start + prefill_chunk]
            pos = torch.arange(start, start + chunk.shape[1], device=device)[None]
            logits = step_logits(model, chunk, pos, cache, rows=slice(b, b + 1))
        last.append(samplers[b](logits[0]))

    running = list(range(len(prompts)))  # prompt index of each cache row
    counts = [0] * len(prompts)
    while running:
        keep = []
        for row, b in enumerate(running):
            token = last[b]
            counts[b] += 1
            reason = "stop" if token in stop_ids[b] else \
                "length" if counts[b] >= params[b].max_new_tokens or lengths[b] >= max_len else None
            yield TokenEvent(b, token, reason)
            if reason is None:
                keep.append(row)
        if len(keep) < len(running):
            running = [running[r] for r in keep]
            if not running:
                break
            cache.keep_rows(torch.tensor(keep, device=device))
        ids = torch.tensor([[last[b]] for b in running], device=device)
        pos = torch.tensor([[lengths[b]] for b in running], device=device)
        logits = step_logits(model, ids, pos, cache)
        for row, b in enumerate(running):
            lengths[b] += 1
            last[b] = samplers[b](logits[row])
