"""Runs the model for generation: chunked prefill of each prompt into its row of a shared K/V cache, then
batched decode steps over the rows still running. Positions are each sequence's own token count."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..model import Gemma4
from .kv import KVCache, cache_dtype
from .sample import Sampler, SamplingParams, sample_rows


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


def compiled_step(model: Gemma4):
    """`_step_logits` compiled by torch.compile once per model (and batch size / cache length); call it
    under inference_mode (traced inside, inference_mode breaks in-place cache writes). A decode step is
    some 5,700 small tensor ops around the weight reads (~25 ms of overhead for E2B on 2 cores); fused,
    bf16 decode went from 81% to 88% of its memory-bandwidth limit in benchmarks/bench_generate.py; on a
    GPU it cuts the kernels a CUDA-graph step launches. Compiling takes one to two minutes."""
    if getattr(model, "_compiled_step", None) is None:
        text = model.language_model
        if text.ple_rows is not None:  # file reads (weights.FileRows): run between the step's two graphs
            text.ple_rows = torch.compiler.disable(text.ple_rows)
        model._compiled_step = torch.compile(_step_logits, dynamic=False)
    return model._compiled_step


def compiled_decode(model: Gemma4):
    """`step_logits` for one token per row, through `compiled_step`."""
    step = compiled_step(model)

    def decode(*args):
        with torch.inference_mode():
            return step(*args)
    return decode


class GraphedDecode:
    """`step_logits` for one token per row, captured once as a CUDA graph over a fixed cache: a replay
    launches the step's ~2,000 kernels without Python in between (eager decode on a GPU is bound by
    launching them, not by the GPU). Inputs are copied into static tensors; the logits come back in one.
    Capture runs the step on scratch inputs, so it is done before the cache holds anything."""

    def __init__(self, model: Gemma4, cache: KVCache, batch: int, step=_step_logits):
        device = model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode():
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                for _ in range(2):
                    step(model, self.ids, self.pos, cache)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(model, self.ids, self.pos, cache)
        cache.ring_pos.fill_(-1)  # forget the scratch steps' writes (their K/V are masked out from now on)

    def __call__(self, model, ids, pos, cache):
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


def can_graph(model: Gemma4) -> bool:
    """CUDA graphs need a step with no host sync: the MoE dispatch reads expert counts back to Python."""
    return model.device.type == "cuda" and not any(s.moe for s in model.config.text.layers)


def generate(model: Gemma4, prompts: list[list[int]], params: list[SamplingParams], stop_ids: list[set],
             prefill_chunk: int = 1024, compile: bool = False, max_len: int | None = None,
             cuda_graph: bool | None = None) -> Iterator[TokenEvent]:
    """Yield tokens as they are made, for a batch of prompts of any lengths. `compile`: run decode steps
    through `compiled_decode`; `cuda_graph` (default: on a GPU, where possible) through `GraphedDecode`
    (of the compiled step, with `compile`).
    Both keep finished rows in the batch, so that shapes never change. `max_len`: the cache's length
    (default: the longest prompt + its max_new_tokens)."""
    device, cfg = model.device, model.config.text
    needed = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
    max_len = min(max(max_len or 0, needed), cfg.max_position_embeddings)
    if compile:  # fewer distinct cache shapes, fewer recompilations
        max_len = min(-(-max_len // 256) * 256, cfg.max_position_embeddings)
    cache = KVCache(cfg, len(prompts), max_len, cache_dtype(model), device)
    graph = can_graph(model) if cuda_graph is None else cuda_graph
    if graph:
        decode = GraphedDecode(model, cache, len(prompts), compiled_step(model) if compile else _step_logits)
    else:
        decode = compiled_decode(model) if compile else step_logits
    static = compile or graph
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
        if len(keep) < len(running) and not static:
            running = [running[r] for r in keep]
            cache.keep_rows(torch.tensor(keep, device=device))
        ids = torch.tensor([[last[b]] for b in running], device=device)
        # a finished row (kept for compile) re-feeds its last position: harmless, and never past the cache
        pos = torch.tensor([[min(lengths[b], max_len - 1)] for b in running], device=device)
        logits = decode(model, ids, pos, cache)
        rows = [row for row, b in enumerate(running) if not done[b]]
        picked = sample_rows([samplers[running[r]] for r in rows],
                             logits if len(rows) == len(running) else logits[rows])
        for row, sampled in zip(rows, picked):
            if isinstance(sampled, Exception):  # one caller's batch: its failure is the caller's
                raise sampled
            token = sampled[0]
            lengths[running[row]] += 1
            last[running[row]] = token


def forward_paged(model: Gemma4, cache, ids: list[list[int]], starts: list[int], tables: list[dict],
                  media: torch.Tensor | None = None, logits: bool = True) -> torch.Tensor | None:
    """The serving engine's forward: rows of equal length (a batch of decodes, or one prompt chunk), each
    continuing its sequence at `starts[b]` with its blocks `tables[b]` (kind -> block ids). `media`: the
    soft-token rows for the chunk's media slots. Returns the last token's logits [B, vocab] if asked."""
    device = model.device
    input_ids = torch.tensor(ids, device=device)
    T = input_ids.shape[1]
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
    batch = cache.batch(positions, {kind: [t[kind] for t in tables] for kind in tables[0]},
                        model.media_groups(input_ids) if media is not None else None)
    with torch.inference_mode():
        embeds, ple_ids = model.embed(input_ids, media)
        keep = slice(T - 1, T)
        hidden = model.language_model(embeds, ple_ids, positions, cache=batch, keep=keep)
        return model.language_model.logits(hidden)[:, -1] if logits else None
