"""The model runner: owns the model, its paged K/V cache, torch.compile and CUDA graphs, and runs one forward
over a batch of rows: a prompt chunk, or one new token for each of a batch of decodes.

Decode steps are where speed is won: a step is thousands of small ops around the weight reads.
- `compile`: the decode step goes through torch.compile, with the batch and key dimensions dynamic, so
  that one compilation (a minute or two for E2B on a CPU) serves every batch size and context length.
- CUDA graphs (on a GPU, by default where the model allows): one graph per decode batch-size bucket (1, 2, 4,
  8, ... up to the engine's max_seqs) and key-length bucket, captured on first use and replayed: a replay launches the
  step's ~2,000 kernels without Python in between. Padding rows sit in the cache's scratch block; their
  logits are dropped.
Prompt chunks (and steps with media) run eagerly.
"""
from __future__ import annotations

import contextlib

import torch

from ..model import Gemma4
from .kv import BatchIndex, PagedKVCache, cache_dtype


def forward_step(model: Gemma4, cache: PagedKVCache, ids: torch.Tensor, index: BatchIndex, media=None,
                 media_groups=None, logits: bool = True, return_kv: bool = False, every_token: bool = False):
    """ids [B, T] at index.positions through the model over `cache`: the last token's logits [B, vocab] (None
    unless `logits`; `every_token`: every token's, [B, T, vocab], as a draft's verification needs); with
    `return_kv`, (logits, final hidden [B, T', E], {kind: (K, V, mask)}: see TextModel)."""
    embeds, ple_ids = model.embed(ids, media)
    T = ids.shape[1]
    out = model.language_model(embeds, ple_ids, index.positions, cache=cache.bind(index, media_groups),
                               keep=slice(0 if every_token else T - 1, T), return_kv=return_kv)
    hidden, kv = out if return_kv else (out, None)
    last = None if not logits else model.language_model.logits(hidden) if every_token \
        else model.language_model.logits(hidden)[:, -1]
    return (last, hidden, kv) if return_kv else last


def score_rows(model: Gemma4, hidden: torch.Tensor, targets: list[int], k: int, rows: int = 32):
    """Each row of hidden [T, E] scored: the log-probability of its target token (the one after it) and the top
    k, as lists [(logprob, [(id, logprob)] * k)] * T. The logits are made `rows` rows at a time: a prompt
    chunk's at once would be 512 x vocab floats."""
    out = []
    for a in range(0, len(targets), rows):
        logp = torch.log_softmax(model.language_model.logits(hidden[a:a + rows]).float(), -1)  # [rows, vocab]
        chosen = logp.gather(-1, torch.tensor(targets[a:a + rows], device=logp.device)[:, None])[:, 0].tolist()
        top = logp.topk(k)  # (k = 0: empty rows)
        out += [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]
    return out


def can_graph(model: Gemma4) -> bool:
    """CUDA graphs need a step with no host sync: the MoE dispatch reads expert counts back to Python."""
    return model.device.type == "cuda" and not any(s.moe for s in model.config.text.layers)


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= n (and >= smallest)."""
    return max(smallest, 1 << (n - 1).bit_length())


class Graph:
    """One decode step captured as a CUDA graph for `rows` rows reading `keys[kind]` keys per kind. Inputs are
    copied into its static tensors; capture and warm-up run on scratch rows (block 0), so they can happen while
    the cache holds live sequences."""

    def __init__(self, step, model: Gemma4, cache: PagedKVCache, rows: int, keys: dict[str, int], width: int):
        device = model.device
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.index = cache.index([0] * rows, 1, {k: [[0]] * rows for k in keys}, rows, keys, width)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            for _ in range(2):
                step(model, cache, self.ids, self.index)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, cache, self.ids, self.index)

    def __call__(self, ids: torch.Tensor, index: BatchIndex) -> torch.Tensor:
        self.ids.copy_(ids)
        self.index.positions.copy_(index.positions)
        for kind, table in index.tables.items():  # (index.keys are the same aranges)
            self.index.tables[kind].copy_(table)
        self.graph.replay()
        return self.logits


class Worker:
    def __init__(self, model: Gemma4, num_blocks: dict[str, int], block_size: int, compile: bool = False,
                 cuda_graphs: bool | None = None, routing=None):
        """`routing`: the served LoRA adapters' (train.lora.serve_adapters), set to each row's adapter around a
        forward; with it, steps run eagerly (which rows take which adapter changes every step)."""
        if cuda_graphs and not can_graph(model):
            raise ValueError("CUDA graphs need a CUDA device and a model without experts (MoE syncs with the host)")
        if routing is not None and (compile or cuda_graphs):
            raise ValueError("LoRA adapters are served eagerly: not with compile or CUDA graphs")
        self.model, self.kinds, self.routing = model, tuple(num_blocks), routing
        self.cache = PagedKVCache(model.config.text, num_blocks, block_size, cache_dtype(model), model.device)
        self.graphed = (can_graph(model) and routing is None) if cuda_graphs is None else cuda_graphs
        self.graphs: dict[tuple, Graph] = {}
        self.decode_step = forward_step
        if compile:
            text = model.language_model
            if text.ple_rows is not None:  # file reads (weights.FileRows): run between the step's graphs
                text.ple_rows = torch.compiler.disable(text.ple_rows)
            self.decode_step = torch.compile(forward_step, dynamic=True)

    def adapters(self, slots: list[int] | None):
        """A context in which the forward's rows use these served adapters (slot per row, 0: none)."""
        return self._routed(slots) if self.routing is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _routed(self, slots):
        self.routing.set(slots, self.model.device)
        try:
            yield
        finally:
            self.routing.set(None, None)

    def copy_block(self, kind: str, src: int, dst: int) -> None:
        """Copy a K/V block (the scheduler's copy-on-write of a shared block)."""
        self.cache.copy_block(kind, src, dst)

    def forward_with_kv(self, ids: list[int], start: int, table: dict, media=None, every_token: bool = False,
                        adapter: int = 0):
        """One sequence's tokens at `start` (eagerly): (logits [T or 1, vocab], final hidden [1, T or 1, E],
        {kind: (K, V, mask)}), what its drafter starts from (and, `every_token`, what verifies its drafts)."""
        input_ids = torch.tensor([ids], device=self.model.device)
        index = self.cache.index([start], len(ids), {kind: [table[kind]] for kind in self.kinds})
        with torch.inference_mode(), self.adapters([adapter]):
            groups = self.model.media_groups(input_ids) if media is not None else None
            logits, hidden, kv = forward_step(self.model, self.cache, input_ids, index, media, groups,
                                              return_kv=True, every_token=every_token)
        return (logits[0] if every_token else logits), hidden, kv

    def forward(self, ids: list[list[int]], starts: list[int], tables: list[dict], media=None,
                logits: bool = True, adapters: list[int] | None = None, score: tuple | None = None):
        """Rows of equal length (one token each for decodes, or one prompt chunk), row b continuing its sequence
        at starts[b] with its blocks tables[b] (kind -> block ids). `media`: the soft-token rows of the chunk's
        media slots. Returns the last token's logits [B, vocab] if asked. `adapters`: each row's served LoRA
        adapter (slot, 0: none). `score` = (targets, k), for one prompt chunk: returns (logits, score_rows of
        its every token), its prompt logprobs."""
        B, T = len(ids), len(ids[0])
        per_kind = {kind: [t[kind] for t in tables] for kind in self.kinds}
        input_ids = torch.tensor(ids, device=self.model.device)
        with torch.inference_mode(), self.adapters(adapters):
            if score is not None:
                groups = self.model.media_groups(input_ids) if media is not None else None
                _, hidden, _ = forward_step(self.model, self.cache, input_ids, self.cache.index(starts, T, per_kind),
                                            media, groups, logits=False, return_kv=True, every_token=True)
                last = self.model.language_model.logits(hidden[:, -1]) if logits else None
                return last, score_rows(self.model, hidden[0], *score)
            if T > 1 or media is not None or not logits:
                groups = self.model.media_groups(input_ids) if media is not None else None
                return forward_step(self.model, self.cache, input_ids, self.cache.index(starts, T, per_kind), media,
                                    groups, logits)
            if not self.graphed:
                return self.decode_step(self.model, self.cache, input_ids, self.cache.index(starts, 1, per_kind))
            rows = bucket(B)
            keys = {kind: bucket(self.cache.keys_read(kind, starts, 1), 256) for kind in self.kinds}
            width = -(-bucket(max(starts) + 1, 256) // self.cache.block_size)  # blocks up to the last position
            shape = (rows, width, *keys.items())
            if shape not in self.graphs:
                self.graphs[shape] = Graph(self.decode_step, self.model, self.cache, rows, keys, width)
            graph, index = self.graphs[shape], self.cache.index(starts, 1, per_kind, rows, keys, width)
            return graph(torch.nn.functional.pad(input_ids, (0, 0, 0, rows - B)), index)[:B]
