"""K/V cache for a batch of sequences, holding only what Gemma 4 needs.

- sliding layers: a ring of `window` slots per sequence (slot = position % window);
- global layers: one slot per position, up to `max_len`;
- K=V global layers (26B-A4B, 31B): the values only; keys are rebuilt from them (model/text.py);
- KV-shared layers (last layers of E2B/E4B): nothing; they read their donor layer's K/V.

Positions come from the caller (`plan(positions)`), never from state kept here. A forward may cover a
slice of the batch's rows (prefill one prompt at a time into its row), or all of them (decode).
Shapes: B rows, T new tokens, K KV heads, D head dim.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from ..config import TextConfig


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros that take memory only where written, on a CPU: a private anonymous mapping, whose pages the OS
    zero-fills on first touch. torch.zeros writes every byte, so the serving engine's default 2 GiB pool was
    all resident from the start (`gemma4 generate` of int4 E2B peaked at 3.6 GB RSS)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or not nbytes or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                            dtype=dtype).view(shape)


def cache_dtype(model) -> torch.dtype:
    """What K/V are stored in: the model's dtype, but bf16 for quantized weights with fp32 activations (the
    CPU default), as llama.cpp keeps f16 K/V: half the memory (E2B at 128K tokens: 0.8 instead of 1.6 GB) and
    half the bytes a long-context decode step reads. Attention still computes in fp32."""
    quantized = getattr(model, "quantization", None)
    return torch.bfloat16 if quantized and model.dtype == torch.float32 else model.dtype


@dataclass
class Plan:
    rows: slice
    positions: torch.Tensor  # [B, T] of the new tokens
    mask: dict  # kind -> [B, 1, T, S] boolean, True = attend
    key_pos: dict  # kind -> [B, S] position of each key the layers of that kind see
    ring_slots: torch.Tensor  # [B, m] ring slots written by the last m new tokens
    full_len: int  # keys a global layer sees: slots [0, full_len)
    ring_used: bool | None  # False: the ring is empty, sliding layers attend over the new tokens only;
    # None: one token per row, written before attending (see _plan_one)


class KVCache:
    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.cfg, self.max_len = cfg, max_len
        self.window = min(cfg.sliding_window, max_len)  # a short generation needs no more slots than positions
        self.k: dict[int, torch.Tensor | None] = {}
        self.v: dict[int, torch.Tensor] = {}
        for s in cfg.layers:
            if s.kv_shared:
                continue
            shape = (batch_size, s.num_kv_heads, self.window if s.sliding else max_len, s.head_dim)
            self.k[s.index] = None if s.k_eq_v else zeros_on_touch(shape, dtype, device)
            self.v[s.index] = zeros_on_touch(shape, dtype, device)
        # Position held by each ring slot (-1: empty); the same for every sliding layer.
        self.ring_pos = torch.full((batch_size, self.window), -1, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()) if t is not None)

    def plan(self, positions: torch.Tensor, rows: slice = slice(None)) -> Plan:
        """Masks and write slots for new tokens at `positions` [B, T] (consecutive within a row)."""
        B, T = positions.shape
        if T == 1:
            return self._plan_one(positions, rows)
        if positions.max().item() >= self.max_len:
            raise ValueError(f"position {positions.max().item()} is past the cache's max_len {self.max_len}")
        q = positions[:, :, None]
        ring_pos = self.ring_pos[rows]
        # Sliding layers see the ring as it was before this step, then the new tokens. A first prefill chunk
        # skips the empty ring, so that it attends over exactly the keys (and in the order) the cache-free
        # forward does: same rounding in bf16, where a random-weight model amplifies every last-bit change.
        ring_used = bool((ring_pos >= 0).any())
        key_sliding = torch.cat([ring_pos, positions], dim=1) if ring_used else positions
        kp = key_sliding[:, None, :]
        mask_sliding = (kp >= 0) & (kp <= q) & (kp > q - self.cfg.sliding_window)
        full_len = positions.max().item() + 1
        key_full = torch.arange(full_len, device=positions.device).expand(B, full_len)
        mask_full = key_full[:, None, :] <= q
        m = min(T, self.window)
        slots = positions[:, T - m:] % self.window
        ring_pos.scatter_(1, slots, positions[:, T - m:])  # a view of self.ring_pos: updates it in place
        return Plan(rows, positions, {"sliding": mask_sliding[:, None], "full": mask_full[:, None]},
                    {"sliding": key_sliding, "full": key_full}, slots, full_len, ring_used)

    def _plan_one(self, positions: torch.Tensor, rows: slice) -> Plan:
        """One new token per row (decode): it is written first, then attends over the whole buffers. Its
        slot in the ring only held a position a window back, which it no longer sees. Shapes do not depend
        on the positions, and nothing is read back to Python: cheap, and traceable by torch.compile."""
        B = positions.shape[0]
        ring_pos = self.ring_pos[rows]
        slots = positions % self.window
        ring_pos.scatter_(1, slots, positions)
        q, kp = positions[:, :, None], ring_pos[:, None, :]
        mask_sliding = (kp >= 0) & (kp <= q) & (kp > q - self.cfg.sliding_window)
        key_full = torch.arange(self.max_len, device=positions.device).expand(B, self.max_len)
        mask_full = key_full[:, None, :] <= q
        return Plan(rows, positions, {"sliding": mask_sliding[:, None], "full": mask_full[:, None]},
                    {"sliding": ring_pos, "full": key_full}, slots, self.max_len, None)

    def update(self, layer: int, k_new: torch.Tensor | None, v_new: torch.Tensor, plan: Plan):
        """Store the new tokens' K/V [B, T, K, D] of `layer`; return the K, V [B, K, S, D] and mask its
        queries attend with. K is None on K=V layers (the caller rebuilds it from V)."""
        spec = self.cfg.layers[layer]
        k_buf = self.k[layer][plan.rows] if self.k[layer] is not None else None
        v_buf = self.v[layer][plan.rows]
        # Rounded to the cache's dtype before attending too: the same keys whether read back or not.
        k_new = k_new.transpose(1, 2).to(v_buf.dtype) if k_new is not None else None
        v_new = v_new.transpose(1, 2).to(v_buf.dtype)
        rows = torch.arange(v_buf.shape[0], device=v_buf.device)[:, None]
        kind = "sliding" if spec.sliding else "full"
        if spec.sliding and plan.ring_used is not None:  # several tokens: attend first, then write the ring
            k, v = k_new, v_new
            if plan.ring_used:
                k = torch.cat([k_buf, k_new], dim=2) if k_buf is not None else None
                v = torch.cat([v_buf, v_new], dim=2)
            m = plan.ring_slots.shape[1]
            for buf, new in ((k_buf, k_new), (v_buf, v_new)):
                if buf is not None:  # buf[b, :, slot[b, j]] = new[b, :, -m + j]
                    buf[rows, :, plan.ring_slots] = new[:, :, -m:].transpose(1, 2)
            return k, v, plan.mask["sliding"]
        slots = plan.ring_slots if spec.sliding else plan.positions
        for buf, new in ((k_buf, k_new), (v_buf, v_new)):
            if buf is not None:
                buf[rows, :, slots] = new.transpose(1, 2)
        if spec.sliding:  # one token, written first: the whole ring
            return k_buf, v_buf, plan.mask[kind]
        n = plan.full_len
        return (k_buf[:, :, :n] if k_buf is not None else None), v_buf[:, :, :n], plan.mask["full"]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop the rows not in `index` (sequences that finished), so later steps skip them."""
        self.k = {i: (t[index] if t is not None else None) for i, t in self.k.items()}
        self.v = {i: t[index] for i, t in self.v.items()}
        self.ring_pos = self.ring_pos[index]


def kv_bytes_per_token(cfg: TextConfig, context: int, dtype_bytes: int = 2) -> int:
    """Average K/V bytes per token of a `context`-token sequence: global layers grow with the sequence,
    sliding layers hold one window, KV-shared layers nothing, K=V layers one tensor."""
    total = 0
    for s in cfg.layers:
        if s.kv_shared:
            continue
        slots = min(context, cfg.sliding_window) if s.sliding else context
        total += slots * s.num_kv_heads * s.head_dim * (1 if s.k_eq_v else 2) * dtype_bytes
    return total // max(context, 1)


def block_bytes(cfg: TextConfig, kind: str, block_size: int, dtype_bytes: int) -> int:
    """Bytes of one block of `kind` ("full" or "sliding"): `block_size` positions of every layer of that kind
    that owns K/V (one tensor where K=V)."""
    return sum(block_size * s.num_kv_heads * s.head_dim * (1 if s.k_eq_v else 2) * dtype_bytes
               for s in cfg.layers if not s.kv_shared and s.sliding == (kind == "sliding"))


@dataclass
class PagedPlan:
    """Where a batch's new K/V go and which slots its queries read, per kind of layer ("full" / "sliding")."""
    mask: dict  # kind -> [B, 1, T, S] boolean, True = attend
    key_pos: dict  # kind -> [B, S] position of each key read (-1: padding); K=V layers rope keys by it
    write: dict  # kind -> [B, T] pool slot of each new token
    read: dict  # kind -> [B, S] pool slot of each key


class PagedKVCache:
    """The serving engine's K/V memory: per layer that owns K/V, a pool of blocks [blocks * block_size, K, D]
    (V only where K=V); which blocks a sequence uses is the block manager's business (engine/blocks.py).
    `batch(...)` binds a batch's block tables and positions into the object a forward reads and extends."""

    def __init__(self, cfg: TextConfig, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.cfg, self.block_size = cfg, block_size
        self.k: dict[int, torch.Tensor | None] = {}
        self.v: dict[int, torch.Tensor] = {}
        for s in cfg.layers:
            if s.kv_shared:
                continue
            shape = (num_blocks["sliding" if s.sliding else "full"] * block_size, s.num_kv_heads, s.head_dim)
            self.k[s.index] = None if s.k_eq_v else zeros_on_touch(shape, dtype, device)
            self.v[s.index] = zeros_on_touch(shape, dtype, device)

    def batch(self, positions: torch.Tensor, tables: dict[str, list[list[int | None]]],
              media_groups: torch.Tensor | None = None) -> PagedBatch:
        """positions [B, T] of the new tokens (consecutive per row; keys before them are in the cache);
        tables: kind -> each row's block list (None for sliding blocks already dropped)."""
        B, T = positions.shape
        bs, device = self.block_size, positions.device
        first, end = positions[:, 0], positions[:, -1] + 1
        plan = PagedPlan({}, {}, {}, {})
        for kind, table in tables.items():
            width = max(len(t) for t in table)
            table_t = torch.tensor([[b if b is not None else 0 for b in t] + [0] * (width - len(t)) for t in table],
                                   dtype=torch.long, device=device)
            if kind == "sliding":  # keys from the start of the block holding the oldest position in the window
                lo = (first - self.cfg.sliding_window + 1).clamp(min=0) // bs * bs
            else:
                lo = torch.zeros_like(first)
            S = int((end - lo).max())
            key_pos = lo[:, None] + torch.arange(S, device=device)
            key_pos = key_pos.masked_fill(key_pos >= end[:, None], -1)
            q, kp = positions[:, :, None], key_pos[:, None, :]
            mask = (kp >= 0) & (kp <= q)
            if kind == "sliding":
                mask &= kp > q - self.cfg.sliding_window
                if media_groups is not None:  # tokens of one image see each other (26B / 31B; one row)
                    g = media_groups  # [1, T]; an image is never split across chunks, its keys are the last T
                    same = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] > 0)
                    mask[:, :, -T:] |= same & (positions[:, None, :] > q - self.cfg.sliding_window)
            kpc = key_pos.clamp(min=0)
            plan.read[kind] = table_t.gather(1, kpc // bs) * bs + kpc % bs
            plan.write[kind] = table_t.gather(1, positions // bs) * bs + positions % bs
            plan.mask[kind] = mask[:, None]
            plan.key_pos[kind] = key_pos
        return PagedBatch(self, plan)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()) if t is not None)


class PagedBatch:
    """A batch bound to its blocks: the `cache` argument of TextModel.forward (plan / update)."""

    def __init__(self, cache: PagedKVCache, plan: PagedPlan):
        self.cache, self._plan = cache, plan

    def plan(self, positions, rows=None) -> PagedPlan:
        return self._plan

    def update(self, layer: int, k_new: torch.Tensor | None, v_new: torch.Tensor, plan: PagedPlan):
        """Write the new tokens' K/V [B, T, K, D] into their slots, then read every key the queries see:
        K, V [B, K, S, D] and the mask [B, 1, T, S]. K is None on K=V layers."""
        kind = "sliding" if self.cache.cfg.layers[layer].sliding else "full"
        out = []
        for pool, new in ((self.cache.k[layer], k_new), (self.cache.v[layer], v_new)):
            if pool is None:
                out.append(None)
                continue
            pool.index_copy_(0, plan.write[kind].flatten(), new.reshape(-1, *new.shape[2:]).to(pool.dtype))
            out.append(pool[plan.read[kind]].transpose(1, 2))
        return out[0], out[1], plan.mask[kind]
