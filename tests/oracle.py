"""An independent K/V cache for tests: every position of every layer that owns K/V in one contiguous
[B, K, max_len, D] tensor per layer, no paging, no block tables, no rebuilt keys. It implements the model's
cache protocol (model.text.KVCache), so tests can check the engine's paged cache against it and drive
their own sampling loops (constrained decoding's distribution tests)."""
import torch

from gemma4.engine.kv import cache_dtype
from gemma4.engine.sample import Sampler


class ContiguousCache:
    rebuilds_keys = False

    def __init__(self, cfg, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.cfg, self.positions = cfg, None
        self.k, self.v = {}, {}
        for s in cfg.layers:
            if not s.kv_shared:
                shape = (batch, s.num_kv_heads, max_len, s.head_dim)
                self.k[s.index] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[s.index] = torch.zeros(shape, dtype=dtype, device=device)

    def at(self, positions: torch.Tensor):
        """Bind the next forward's positions [B, T]."""
        self.positions = positions
        return self

    def update(self, spec, k_new, v_new):
        pos = self.positions
        rows = torch.arange(pos.shape[0])[:, None]
        k, v = self.k[spec.index], self.v[spec.index]
        k[rows, :, pos] = k_new.to(k.dtype)  # k_new [B, T, K, D]
        v[rows, :, pos] = v_new.to(v.dtype)
        end = int(pos.max()) + 1
        q, kp = pos[:, :, None], torch.arange(end)[None, None, :]
        mask = kp <= q
        if spec.sliding:
            mask &= kp > q - self.cfg.sliding_window
        return k[:, :, :end], v[:, :, :end], mask[:, None]

    def key_positions(self, kind):
        end = int(self.positions.max()) + 1
        return torch.arange(end).expand(self.positions.shape[0], end)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (sequences still running)."""
        self.k = {i: t[index] for i, t in self.k.items()}
        self.v = {i: t[index] for i, t in self.v.items()}


def step_logits(model, ids: torch.Tensor, positions: torch.Tensor, cache: ContiguousCache) -> torch.Tensor:
    """ids [B, T] at positions [B, T] -> the last token's logits [B, vocab]."""
    with torch.inference_mode():
        embeds, ple_ids = model.embed(ids)
        T = ids.shape[1]
        hidden = model.language_model(embeds, ple_ids, positions, cache=cache.at(positions), keep=slice(T - 1, T))
        return model.language_model.logits(hidden)[:, -1]


def generate_alone(model, prompt: list[int], params) -> list[int]:
    """One sequence, token by token through the contiguous cache, sampled by the engine's Sampler (no stop
    tokens: max_new_tokens of them)."""
    cache = ContiguousCache(model.config.text, 1, len(prompt) + params.max_new_tokens, cache_dtype(model))
    sampler = Sampler(params, seen=set(prompt))
    logits = step_logits(model, torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    out = []
    for _ in range(params.max_new_tokens):
        out.append(sampler(logits[0]))
        pos = len(prompt) + len(out) - 1
        logits = step_logits(model, torch.tensor([[out[-1]]]), torch.tensor([[pos]]), cache)
    return out
