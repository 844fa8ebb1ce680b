"""The Gemma 4 text decoder (all four sizes), written to give the reference's numbers.

Module names follow the published checkpoint keys (minus the `model.language_model.` prefix), so that
loading is a straight name match. Positions always come from the caller; the K/V cache, when given, is any
`KVCache` (the engine's is engine.kv.PagedBatch). Which kernel runs each product, norm and attention is
gemma4.ops' business.

Shapes: B batch, T new tokens, S keys, H query heads, K KV heads, D head dim, E hidden size.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops
from ..config import LayerSpec, TextConfig
from ..memory import return_prompt_buffers


class Linear(nn.Linear):
    """A bias-free projection; gemma4.quant swaps these for int8 / int4 ones."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in (at least) fp32. Gemma 4 scales by `weight`, not `1 + weight`."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, fraction: float) -> torch.Tensor:
    """Inverse frequencies, one per rotated pair; "proportional" RoPE rotates only the first `fraction`
    of the pairs (exponents still over the full head_dim) and leaves the rest at frequency 0."""
    rotated = int(fraction * head_dim // 2)
    inv = 1.0 / theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float, device="cpu") / head_dim)
    return torch.cat([inv, torch.zeros(head_dim // 2 - rotated, device="cpu")])


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, 1, D] in the model dtype (as the reference casts them)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; rotate pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads, self.head_dim = cfg.num_heads, spec.head_dim
        E, D, K = cfg.hidden_size, spec.head_dim, spec.num_kv_heads
        self.q_proj = Linear(E, cfg.num_heads * D)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        if not spec.kv_shared:  # KV-shared layers have no K/V weights at all
            self.k_proj = Linear(E, K * D)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(D, cfg.rms_norm_eps, with_scale=False)
            self.v_proj = None if spec.k_eq_v else Linear(E, K * D)
        self.o_proj = Linear(cfg.num_heads * D, E)

    def kv(self, x: torch.Tensor, cos, sin, cache: KVCache, key_rope):
        """K, V [B, K, S, D] and mask [B, 1, T, S] this layer attends with: the new tokens' K/V of x [B, T, E]
        (K normed and rotated, V normed without scale) stored into `cache`, then all it holds for the queries.
        With K=V, V is the normalised raw key projection; a cache that keeps V only gets no K, and K is rebuilt
        from V at the keys' positions (`key_rope(kind)`: their cos, sin)."""
        B, T, _ = x.shape
        raw_k = self.k_proj(x).view(B, T, -1, self.head_dim)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(B, T, -1, self.head_dim)
        k_new = None if self.v_proj is None and cache.rebuilds_keys else apply_rope(self.k_norm(raw_k), cos, sin)
        k, v, mask = cache.update(self.spec, k_new, self.v_norm(raw_v))
        if k is None:
            c, s = key_rope("sliding" if self.spec.sliding else "full")
            k = apply_rope(v.transpose(1, 2) * self.k_norm.weight.to(c.dtype), c, s).transpose(1, 2)
            k = k.to(v.dtype)  # as a stored K would be (a bf16 cache under fp32 activations)
        return k, v, mask

    def forward(self, x, cos, sin, k, v, mask):
        """x [B, T, E]; k, v [B, K, S, D]; mask [B, 1, T, S] (True = attend)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), cos, sin).transpose(1, 2)
        out = ops.attention(q, k, v, mask)  # no 1/sqrt(D) scale: q_norm / k_norm fix the logit scale
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x):
        return self.down_proj(ops.gelu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Picks top-k of the experts from the raw residual stream (not the MLP's pre-norm output: Google's
    JAX code routes on the pre-normed input, and ports that copied it disagree with the published weights)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x):  # x [N, E] -> weights [N, k], expert ids [N, k]
        h = self.norm(x) * self.scale * x.shape[-1] ** -0.5
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


def expert_matmul(x: torch.Tensor, bank, e: int, tokens: torch.Tensor, total: int) -> torch.Tensor:
    """x @ W[e].T for a bank of expert weights: a float tensor [n, out, in], or a bank module (quantized, LoRA).
    `tokens`: which of the layer's `total` tokens x holds (adapters served per batch row need them)."""
    if not isinstance(bank, nn.Module):
        return ops.linear(x, bank[e])
    return bank.matmul(x, e, tokens, total) if hasattr(bank, "routing") else bank.matmul(x, e)


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj [n, 2I, E], down_proj [n, E, I]; only chosen experts run. With expert
    parallelism (gemma4.parallel) this rank holds experts [first, first + n) and runs just the tokens routed there."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n, E, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.first, self.total = n, 0, n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * I, E))
        self.down_proj = nn.Parameter(torch.empty(n, E, I))

    def forward(self, x, weights, ids):  # x [N, E], weights / ids [N, k]
        out = torch.zeros_like(x)
        flat = ids.flatten()
        if self.num_experts != self.total:  # experts held elsewhere go to one bin past ours, which does not run
            flat = flat - self.first
            flat = torch.where((flat >= 0) & (flat < self.num_experts), flat, self.num_experts)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.num_experts)[:self.num_experts].tolist()
        token = order // ids.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            tok = token[start:start + n]
            start += n
            gate, up = expert_matmul(x[tok], self.gate_up_proj, e, tok, len(x)).chunk(2, dim=-1)
            y = expert_matmul(ops.gelu_mul(gate, up), self.down_proj, e, tok, len(x))
            out.index_add_(0, tok, (y * weights.flatten()[sel, None]).to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        E, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(E, spec.intermediate_size)
        self.input_layernorm = RMSNorm(E, eps)
        self.post_attention_layernorm = RMSNorm(E, eps)
        self.pre_feedforward_layernorm = RMSNorm(E, eps)
        self.post_feedforward_layernorm = RMSNorm(E, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        if cfg.ple_dim:
            self.per_layer_input_gate = Linear(E, cfg.ple_dim)
            self.per_layer_projection = Linear(cfg.ple_dim, E)
            self.post_per_layer_input_norm = RMSNorm(E, eps)
        if spec.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(E, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(E, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(E, eps)

    def forward(self, x, x_normed, ple, cos, sin, k, v, mask):
        """x [B, T, E] and its input_layernorm (the caller needed it for this layer's K/V)."""
        h = self.self_attn(x_normed, cos, sin, k, v, mask)
        x = x + self.post_attention_layernorm(h)

        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.spec.moe:  # dense MLP and routed experts in parallel, each with its own norms
            flat = x.reshape(-1, x.shape[-1])
            weights, ids = self.router(flat)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids).view_as(x)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(h)

        if ple is not None:  # Per-Layer Embedding: a gated per-token signal added after the MLP
            h = ops.gelu_mul(self.per_layer_input_gate(x), ple)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar


class KVCache(Protocol):
    """What TextModel.forward reads and extends: the K/V of a batch's earlier tokens (engine.kv.PagedBatch),
    or none (`SelfOnly`). Bound to one forward's positions, which the caller gave."""
    rebuilds_keys: bool  # K=V layers store V only: the layer gives no K, and rebuilds it from V

    def update(self, spec: LayerSpec, k_new: torch.Tensor | None, v_new: torch.Tensor):
        """Store this layer's new K/V [B, T, K, D]; return the K, V [B, K, S, D] and mask [B, 1, T, S] its queries
        attend with (K None where the cache keeps V only)."""

    def key_positions(self, kind: str) -> torch.Tensor:
        """[B, S] position of each key that layers of `kind` ("full" / "sliding") read (-1: padding)."""


class SelfOnly:
    """No cache: the T new tokens attend among themselves. key_valid [B, T] marks padding; media_groups [B, T]
    (1, 2, ... per image / video frame, 0 for text) lets tokens of one group see each other on sliding layers
    (still within the window): the reference's AND(window, OR(causal, same group))."""
    rebuilds_keys = False

    def __init__(self, cfg: TextConfig, positions, key_valid=None, media_groups=None):
        B, T = positions.shape
        valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=positions.device)
        self.positions, q, kp = positions, positions[:, :, None], positions[:, None, :]
        causal = (kp <= q) & valid[:, None, :]
        in_window = kp > q - cfg.sliding_window
        sliding = causal & in_window
        if media_groups is not None:
            g = media_groups
            sliding |= (g[:, :, None] == g[:, None, :]) & (g[:, :, None] > 0) & in_window & valid[:, None, :]
        # A padding query sees itself, so that no row of the mask is empty (SDPA would return NaN).
        eye = torch.eye(T, dtype=torch.bool, device=positions.device)
        self.mask = {"full": (causal | eye)[:, None], "sliding": (sliding | eye)[:, None]}

    def update(self, spec: LayerSpec, k_new, v_new):
        return k_new.transpose(1, 2), v_new.transpose(1, 2), self.mask["sliding" if spec.sliding else "full"]

    def key_positions(self, kind: str) -> torch.Tensor:
        return self.positions


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, E)
        if cfg.ple_dim:
            L, P = cfg.num_layers, cfg.ple_dim
            self.embed_tokens_per_layer = nn.Embedding(cfg.ple_vocab_size, L * P)
            self.per_layer_model_projection = Linear(E, L * P)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        # Reads PLE rows from the checkpoint file, when weights.load maps the table from it (CPU): see
        # weights.FileRows. The table itself (memory-mapped, never touched by a lookup) stays the parameter.
        self.ple_rows = None
        self.checkpointing = False  # gradient checkpointing per decoder layer (gemma4.train)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in cfg.layers)
        self.donors = frozenset(s.kv_source for s in cfg.layers if s.kv_shared)
        self.norm = RMSNorm(E, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(E, cfg.vocab_size)
        self.init_buffers()

    def init_buffers(self, device=None):
        """(Re)build the non-checkpoint buffers, e.g. after the model was built on the meta device."""
        # One RoPE table per attention kind (all layers of a kind share head_dim and theta).
        for kind in ("sliding", "full"):
            spec = next((s for s in self.cfg.layers if s.sliding == (kind == "sliding")), None)
            if spec is not None:
                inv = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_fraction)
                self.register_buffer(f"inv_freq_{kind}", inv.to(device or "cpu"), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens  # nn.Embedding, or a quantized table (gemma4.quant) that has `lookup`
        rows = table.lookup(input_ids) if hasattr(table, "lookup") else F.embedding(input_ids, table.weight)
        # The scale is rounded to the weight dtype first, as the reference does (sqrt(1536) -> 39.25 in bf16).
        return rows * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=rows.dtype)

    def per_layer_inputs(self, ple_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, L, P]: (token's own PLE row x sqrt(P) + projection of the main embedding) / sqrt(2)."""
        cfg, w = self.cfg, self.embed_tokens_per_layer.weight
        # The table stays in its stored dtype (memory-mapped): convert just the rows looked up.
        own = self.ple_rows(ple_ids.cpu()) if self.ple_rows is not None else F.embedding(ple_ids.to(w.device), w)
        own = own.to(embeds.device, embeds.dtype)
        # In place where the reference makes a new tensor (same numbers): these are prompt-sized, [T, L * P]
        # (9 MB a 256-token chunk in fp32), and five copies of them were an int4 prefill's peak memory.
        own.mul_(torch.tensor(cfg.ple_dim ** 0.5, dtype=embeds.dtype))  # scale rounded as the reference does
        proj = self.per_layer_model_projection(embeds).mul_(cfg.hidden_size ** -0.5)
        proj = self.per_layer_projection_norm(proj.view(*embeds.shape[:-1], cfg.num_layers, cfg.ple_dim))
        return proj.add_(own.view_as(proj)).mul_(2.0 ** -0.5)

    def forward(self, embeds, ple_ids, positions, cache: KVCache | None = None, keep=None, key_valid=None,
                media_groups=None, return_kv: bool = False):
        """Run the decoder over new tokens; returns final-normed hidden states [B, T', E].

        embeds [B, T, E] (already scaled); ple_ids [B, T] (token ids for the PLE lookup, multimodal slots
        mapped to the pad id); positions [B, T]. `cache`: the K/V of earlier tokens to read and extend (KVCache);
        without one, the T tokens attend among themselves (`key_valid`, `media_groups`: see SelfOnly).
        `keep`: a slice along T of the outputs wanted. KV-shared layers produce no K/V, so from the first of
        them on only the kept tokens are computed (the last prompt token in prefill). `return_kv`: also return
        {kind: (K, V [B, K, S, D], mask [B, 1, T, S])} of the last layer of each kind that computes its own K/V
        (what the MTP drafters attend to).
        """
        cfg = self.cfg
        B, T, _ = embeds.shape
        ple = list(self.per_layer_inputs(ple_ids, embeds).unbind(2)) if cfg.ple_dim else [None] * cfg.num_layers
        if keep is not None and T > 1 and cfg.ple_dim:
            # One copy per layer, each freed once its layer has run (the KV-shared layers' holding only the kept
            # tokens): the whole [T, L, P] table lived on to the last non-shared layer, where a prefill's memory
            # peaks (9 MB of a 512-token bf16 prefill).
            ple = [p.clone() if i < cfg.first_shared_layer else p[:, keep].clone() for i, p in enumerate(ple)]
        dtype = embeds.dtype
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions, dtype)
                for kind in ("sliding", "full") if hasattr(self, f"inv_freq_{kind}")}
        if cache is None:
            cache = SelfOnly(cfg, positions, key_valid, media_groups)
        elif media_groups is not None or key_valid is not None:
            raise ValueError("with a cache, media groups and padding are the cache's (engine.kv.PagedBatch)")
        key_rope = {}

        def keys_rope(kind):  # cos, sin at the cache's key positions, for K=V layers (once per kind)
            if kind not in key_rope:
                key_rope[kind] = rope_cos_sin(getattr(self, f"inv_freq_{kind}"), cache.key_positions(kind), dtype)
            return key_rope[kind]

        x, shared, last_kv = embeds, {}, {}
        for i, layer in enumerate(self.layers):
            spec = layer.spec
            kind = "sliding" if spec.sliding else "full"
            cos, sin = rope[kind]
            if i == cfg.first_shared_layer and keep is not None:
                # Copies, not views: the prompt-sized tensors are freed here, before the shared layers (a
                # 512-token prefill of E2B in fp32 held 21 MB of PLE inputs and RoPE tables to the end).
                p = None  # the last layer's prompt-sized PLE input
                x = x[:, keep].clone()
                rope = {kd: (c[:, keep].clone(), s[:, keep].clone()) for kd, (c, s) in rope.items()}
                cos, sin = rope[kind]
                shared = {j: (k, v, m[:, :, keep]) for j, (k, v, m) in shared.items()}
                if x.device.type == "cpu" and T > 1:
                    return_prompt_buffers()
            p, ple[i] = ple[i], None

            def run(x, p, cos, sin, layer=layer, spec=spec):
                x_normed = layer.input_layernorm(x)
                if spec.kv_shared:  # K/V come explicitly from the donor layer
                    k, v, mask = shared[spec.kv_source]
                else:
                    k, v, mask = layer.self_attn.kv(x_normed, cos, sin, cache, keys_rope)
                return layer(x, x_normed, p, cos, sin, k, v, mask), k, v, mask

            if self.checkpointing and torch.is_grad_enabled():  # fine-tuning: the backward recomputes the layer
                x, k, v, mask = torch.utils.checkpoint.checkpoint(run, x, p, cos, sin, use_reentrant=False)
            else:
                x, k, v, mask = run(x, p, cos, sin)
            if not spec.kv_shared:
                last_kv[kind] = (k, v, mask)
                if i in self.donors:
                    shared[i] = (k, v, mask)
        if keep is not None and cfg.first_shared_layer == cfg.num_layers:
            x = x[:, keep]
        return (self.norm(x), last_kv) if return_kv else self.norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's raw logits (before the softcap)."""
        if hasattr(self, "lm_head"):
            return self.lm_head(hidden)
        if hasattr(self.embed_tokens, "project"):  # quantized tied table
            return self.embed_tokens.project(hidden)
        return ops.linear(hidden, self.embed_tokens.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        cap = self.cfg.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

