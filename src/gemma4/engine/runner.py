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


def _step_logits(model: Gemma4, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 rows: slice = slice(None)) -> torch.Tensor:
    embeds, ple_ids = model.embed(input_ids)
    T = input_ids.shape[1]
    hidden = model.language_model(embeds, ple_ids, positions, cache=cache, cache_rows=rows, keep=slice(T - 1, T))
    return model.language_model.logits(hidden)[:, -1]


def step_logits(model: Gemma4, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                rows: slice = slice(None)) -> torch.Tensor:
    """Feed new tokens [B, T] at `positions` through the model; logits [B, vocab] of the last one."""
    with torch.inference_mode():
        return _step_logits(model, input_ids, positions, cache, rows)


def compiled_decode(model: Gemma4):
    """`step_logits` for one token per row, compiled by torch.compile once per model (and batch size / cache
    length). A decode step is some 16,000 small tensor ops around the weight reads (~35 ms of overhead for
    E2B on 2 cores); fused, bf16 decode went from 81% to 88% of its memory-bandwidth limit in
    benchmarks/bench_generate.py. Compiling takes one to two minutes."""
    if getattr(model, "_compiled_decode", None) is None:
        # inference_mode outside the compiled function: traced inside, it breaks in-place cache writes
        compiled = torch.compile(_step_logits, dynamic=False)

        def decode(*args):
            with torch.inference_mode():
                return compiled(*args)
        model._compiled_decode = decode
    return model._compiled_decode


def generate(model: Gemma4, prompts: list[list[int]], params: list[SamplingParams], stop_ids: list[set],
             prefill_chunk: int = 1024, compile: bool = False, max_len: int | None = None) -> Iterator[TokenEvent]:
    """Yield tokens as they are made, for a batch of prompts of any lengths. `compile`: run decode steps
    through `compiled_decode` (finished rows then stay in the batch, so that shapes never change).
    `max_len`: the cache's length (default: the longest prompt + its max_new_tokens)."""
    device, cfg = model.device, model.config.text
    needed = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
    max_len = min(max(max_len or 0, needed), cfg.max_position_embeddings)
    if compile:  # fewer distinct cache shapes, fewer recompilations
        max_len = min(-(-max_len // 256) * 256, cfg.max_position_embeddings)
    decode = compiled_decode(model) if compile else step_logits
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
    done = [False] * len(prompts)
    counts = [0] * len(prompts)
    while not all(done):
        keep = []
        for row, b in enumerate(running):
            if done[b]:
                continue
            token = last[b]
            counts[b] += 1
            reason = "stop" if token in stop_ids[b] else \
                "length" if counts[b] >= params[b].max_new_tokens or lengths[b] >= max_len else None
            yield TokenEvent(b, token, reason)
            done[b] = reason is not None
            if not done[b]:
                keep.append(row)
        if all(done):
            break
        if len(keep) < len(running) and not compile:
            running = [running[r] for r in keep]
            cache.keep_rows(torch.tensor(keep, device=device))
        ids = torch.tensor([[last[b]] for b in running], device=device)
        # a finished row (kept for compile) re-feeds its last position: harmless, and never past the cache
        pos = torch.tensor([[min(lengths[b], max_len - 1)] for b in running], device=device)
        logits = decode(model, ids, pos, cache)
        for row, b in enumerate(running):
            if not done[b]:
                lengths[b] += 1
                last[b] = samplers[b](logits[row])
