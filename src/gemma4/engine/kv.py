"""Paged K/V memory, holding only what Gemma 4 needs.

- global layers: every position; sliding layers: the blocks of the last `window` positions (engine/blocks.py);
- K=V global layers (26B-A4B, 31B): the values only; attention rebuilds the keys from them (model/text.py);
- KV-shared layers (last layers of E2B/E4B): nothing; they read their donor layer's K/V.

Per layer that owns K/V, a pool [blocks * block_size, K, D]. Block 0 of each pool is scratch: the padding rows
of a fixed-size (compiled or graphed) batch write and read there. A forward's rows each continue their
sequence at its own position: `BatchIndex` holds each row's positions and block tables, and `PagedBatch`
binds them to the pools as the model's cache (model.text.KVCache), working out on the device where each new
token's K/V go and which slots its queries read. Positions come from the caller.
Shapes: B rows, T new tokens, S keys read, K KV heads, D head dim.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from ..config import LayerSpec, TextConfig

KINDS = ("full", "sliding")


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros that take memory only where written, on a CPU: a private anonymous mapping, whose pages the OS
    zero-fills on first touch. torch.zeros writes every byte, so the engine's default 2 GiB pool was all
    resident from the start (`gemma4 generate` of int4 E2B peaked at 3.6 GB RSS)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or not nbytes or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                            dtype=dtype).view(shape)


def cache_dtype(model) -> torch.dtype:
    """What K/V are stored in: the model's dtype, but bf16 for quantized weights with fp32 activations (the
    CPU default), as llama.cpp keeps f16 K/V: half the memory and half the bytes a long-context decode step
    reads. Attention still computes in fp32."""
    quantized = getattr(model, "quantization", None)
    return torch.bfloat16 if quantized and model.dtype == torch.float32 else model.dtype


def kv_bytes(cfg: TextConfig, context: int, dtype_bytes: int = 2) -> int:
    """K/V bytes of one `context`-token sequence: global layers grow with it, sliding layers hold one window,
    KV-shared layers nothing, K=V layers one tensor."""
    return sum((min(context, cfg.sliding_window) if s.sliding else context) * s.num_kv_heads * s.head_dim
               * (1 if s.k_eq_v else 2) * dtype_bytes for s in cfg.layers if not s.kv_shared)


def kv_bytes_per_token(cfg: TextConfig, context: int, dtype_bytes: int = 2) -> int:
    """Average K/V bytes per token of a `context`-token sequence."""
    return kv_bytes(cfg, context, dtype_bytes) // max(context, 1)


def block_bytes(cfg: TextConfig, kind: str, block_size: int, dtype_bytes: int) -> int:
    """Bytes of one block of `kind`: `block_size` positions of every layer of that kind that owns K/V."""
    return sum(block_size * s.num_kv_heads * s.head_dim * (1 if s.k_eq_v else 2) * dtype_bytes
               for s in cfg.layers if not s.kv_shared and s.sliding == (kind == "sliding"))


@dataclass
class BatchIndex:
    """A batch's rows on the pools: small tensors, so that a compiled or graphed step takes them as inputs and
    works out every slot itself on the device (a host-side index of ~30 small ops cost 0.4 ms a step, a tenth
    of a CUDA-graph decode step)."""
    positions: torch.Tensor  # [B, T] of the new tokens
    tables: dict  # kind ("full" / "sliding") -> [B, W] block ids of each row (0: none, or dropped)
    keys: dict  # kind -> [S] 0..S-1: the keys each row reads, from its first one (S as a shape, not a number)


class PagedKVCache:
    def __init__(self, cfg: TextConfig, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.cfg, self.block_size, self.device = cfg, block_size, torch.device(device)
        self.k: dict[int, torch.Tensor | None] = {}
        self.v: dict[int, torch.Tensor] = {}
        for s in cfg.layers:
            if s.kv_shared:
                continue
            shape = (num_blocks["sliding" if s.sliding else "full"] * block_size, s.num_kv_heads, s.head_dim)
            self.k[s.index] = None if s.k_eq_v else zeros_on_touch(shape, dtype, device)
            self.v[s.index] = zeros_on_touch(shape, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()) if t is not None)

    def index(self, starts: list[int], T: int, tables: dict[str, list[list[int | None]]], rows: int = 0,
              keys: dict[str, int] | None = None, width: int = 0) -> BatchIndex:
        """T new tokens per row, row b continuing at position starts[b] with its blocks tables[kind][b] (None:
        a sliding block already dropped). `rows` / `keys` / `width`: pad to that many rows / keys read per kind
        / blocks per table (scratch rows sit at position 0 in block 0; padding keys are masked out)."""
        B, keys, dev = max(rows, len(starts)), keys or {}, self.device
        first = torch.tensor(starts + [0] * (B - len(starts)))
        out = BatchIndex((first[:, None] + torch.arange(T)).to(dev), {}, {})
        for kind, table in tables.items():
            W = max(width, *(len(t) for t in table))
            padded = [[b or 0 for b in t] + [0] * (W - len(t)) for t in table] + [[0] * W] * (B - len(table))
            out.tables[kind] = torch.tensor(padded).to(dev)
            out.keys[kind] = torch.arange(max(self.keys_read(kind, starts, T), keys.get(kind, 0)), device=dev)
        return out

    def first_key(self, kind: str, start):
        """The first position a row continuing at `start` (an int, or a tensor of them) reads: 0 on global
        layers; on sliding layers the start of the block holding the oldest position in the window."""
        if kind != "sliding":
            return start * 0
        lo = start - self.cfg.sliding_window + 1
        lo = lo.clamp(min=0) if isinstance(lo, torch.Tensor) else max(0, lo)
        return lo // self.block_size * self.block_size

    def keys_read(self, kind: str, starts: list[int], T: int) -> int:
        """Keys per row (S) that a batch continuing at `starts` with T tokens each reads on layers of `kind`."""
        return max(s + T - self.first_key(kind, s) for s in starts)

    def copy_block(self, kind: str, src: int, dst: int) -> None:
        """Copy block `src` to block `dst` in every layer of `kind` (copy-on-write of a shared block)."""
        a, b, bs = src * self.block_size, dst * self.block_size, self.block_size
        for i, v in self.v.items():
            if self.cfg.layers[i].sliding == (kind == "sliding"):
                for pool in (self.k[i], v):
                    if pool is not None:
                        pool[b:b + bs] = pool[a:a + bs]

    def bind(self, index: BatchIndex, media_groups: torch.Tensor | None = None) -> PagedBatch:
        return PagedBatch(self, index, media_groups)


class PagedBatch:
    """One batch's view of the pools: the `cache` a TextModel.forward reads and extends (model.text.KVCache)."""
    rebuilds_keys = True  # K=V layers: only V is stored, attention rebuilds K at the keys' positions

    def __init__(self, cache: PagedKVCache, index: BatchIndex, media_groups: torch.Tensor | None = None):
        self.cache, self.index = cache, index
        bs, window, positions = cache.block_size, cache.cfg.sliding_window, index.positions
        q, end = positions[:, :, None], positions[:, -1:] + 1
        self.mask, self.key_pos, self.read, self.write = {}, {}, {}, {}
        for kind, table in index.tables.items():
            key_pos = cache.first_key(kind, positions[:, :1]) + index.keys[kind]  # [B, S]
            key_pos = key_pos.masked_fill(key_pos >= end, -1)
            kpc = key_pos.clamp(min=0)
            self.read[kind] = table.gather(1, kpc // bs) * bs + kpc % bs  # [B, S] pool slot of each key
            self.write[kind] = table.gather(1, positions // bs) * bs + positions % bs  # [B, T] of each new token
            self.key_pos[kind] = key_pos
            kp = key_pos[:, None, :]
            mask = (kp >= 0) & (kp <= q)
            if kind == "sliding":
                mask &= kp > q - window
                if media_groups is not None:  # tokens of one image see each other (26B / 31B; one row)
                    g, T = media_groups, q.shape[1]  # [1, T]: an image is never split, its keys are the last T
                    same = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] > 0)
                    mask[:, :, -T:] |= same & (positions[:, None, :] > q - window)
            self.mask[kind] = mask[:, None]  # [B, 1, T, S]

    def key_positions(self, kind: str) -> torch.Tensor:
        return self.key_pos[kind]

    def update(self, spec: LayerSpec, k_new: torch.Tensor | None, v_new: torch.Tensor):
        """Write the new tokens' K/V [B, T, K, D] into their slots, then read every key the queries see:
        K, V [B, K, S, D] and the mask [B, 1, T, S]. K is None on K=V layers."""
        kind = "sliding" if spec.sliding else "full"
        out = []
        for pool, new in ((self.cache.k[spec.index], k_new), (self.cache.v[spec.index], v_new)):
            if pool is None:
                out.append(None)
                continue
            pool.index_copy_(0, self.write[kind].flatten(), new.reshape(-1, *new.shape[2:]).to(pool.dtype))
            read = self.read[kind]  # (index_select: 8x faster than pool[read] on a CPU, 15 vs 122 us for 545 keys)
            out.append(pool.index_select(0, read.flatten()).view(*read.shape, *pool.shape[1:]).transpose(1, 2))
        return out[0], out[1], self.mask[kind]
