"""The Gemma 4 text decoder (all four sizes), written to give the reference's numbers.

Module names follow the published checkpoint keys (minus the `model.language_model.` prefix), so that
loading is a straight name match. Positions always come from the caller; the K/V cache, when given,
is an `engine.kv.KVCache` and only stores what the model needs (see there).

Shapes: B batch, T new tokens, S keys, H query heads, K KV heads, D head dim, E hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import LayerSpec, TextConfig
from ..memory import return_freed_heap


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T. On a CPU, bf16 products avoid PyTorch's bf16 GEMM, which most CPUs emulate (6x slower than
    fp32 here; 8 rows cost 7x one row): up to 64 rows (decode steps, short prompt chunks) go to our kernel,
    which reads the bf16 weights once for all of them at ~1.4x F.linear's speed for one row
    (benchmarks/bench_kernels.py); more rows run as fp32 GEMMs. Both sum in fp32 and round once to bf16, as
    the reference's bf16 matmul rounds."""
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel():
        rows = x.numel() // x.shape[-1]
        # A graph needs a backward (the kernel has none) and no reused buffers (_fp32_product's).
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return F.linear(x.float(), w.float()).to(x.dtype)
        if rows <= kernels.MAX_BF16_KERNEL_ROWS and w.dim() == 2 and kernels.kernel_available():
            return kernels.gemv_bf16(x, w)
        if rows >= 16:
            return _fp32_product(x, w)
    return F.linear(x, w)


def _fp32_product(x: torch.Tensor, w: torch.Tensor, block_bytes: int = 3 << 20, depth: int = 2048) -> torch.Tensor:
    """x @ w.T by fp32 GEMMs over blocks of weight rows (~3 MB as fp32), rounded to x's dtype. Peak memory of
    a bf16 prefill is set here: a whole fp32 copy of the weight would add its size (55 MB for E2B's PLE
    projection), 512-row blocks of the 6144-wide down projection were 12.6 MB, and so was the fp32 copy of its
    [512, 6144] input; so inputs wider than `depth` are taken `depth` columns at a time, summed in fp32 (the
    same sum in another order: a bf16 result differs in ~0.02% of entries, by one unit). 128-512 rows and 2048
    columns run as fast as whole weights here. The fp32 input and weight block live in buffers kept for reuse
    (kernels.scratch); only the result is new."""
    N, K = w.shape
    x2, width = x.reshape(-1, K), min(K, depth)
    block = min(N, max(64, min(512, block_bytes // (4 * width)) // 64 * 64))
    if K <= depth:
        x32 = kernels.scratch("input", x2.numel()).view(x2.shape).copy_(x2)  # [M, K] fp32
        out = kernels.blocked_product(x32, N, block, lambda buf, n: buf.copy_(w[n:n + len(buf)]), x.dtype)
        return out.view(*x.shape[:-1], N)
    wbuf = kernels.scratch("weights", block * width).view(block, width)
    acc = x2.new_zeros(len(x2), N, dtype=torch.float32)  # [M, N] fp32 sums over the column chunks
    for k in range(0, K, depth):
        cols = min(depth, K - k)
        xk = kernels.scratch("input", len(x2) * cols).view(len(x2), cols).copy_(x2[:, k:k + cols])
        for n in range(0, N, block):
            rows = min(block, N - n)
            acc[:, n:n + rows].addmm_(xk, wbuf[:rows, :cols].copy_(w[n:n + rows, k:k + cols]).t())
    return acc.to(x.dtype).view(*x.shape[:-1], N)


class Linear(nn.Linear):
    """A bias-free projection; gemma4.quant swaps these for int8 / int4 ones."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight)


_KERNEL_FLOATS = (torch.float32, torch.bfloat16)  # what the CPU kernels (norm, attention) take


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in (at least) fp32. Gemma 4 scales by `weight`, not `1 + weight`."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference's x.float() * pow(mean(x^2) + eps, -0.5) * weight.float(), rounded to x's dtype.
        # F.rms_norm computes exactly that, in six ATen ops; on a CPU our kernel does it in one (a decode
        # step runs ~250 norms). Compiled code fuses F.rms_norm itself; autograd needs F.rms_norm.
        if x.device.type == "cpu" and x.dtype in _KERNEL_FLOATS and not x.requires_grad \
                and (self.weight is None or self.weight.dtype in _KERNEL_FLOATS and not self.weight.requires_grad) \
                and not torch.compiler.is_compiling() and kernels.kernel_available():
            return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


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


def small_query_attention(q, k, v, mask):
    """Attention for a few queries, q [B, H, T, D] over k, v [B, K, S, D]: the query heads of a KV head are
    stacked as rows (no copy of K/V per query head). Computed in (at least) fp32: CPUs emulate bf16, and a
    bf16 probs @ v is ~7x slower than upcasting (1.9 ms vs 0.28 ms for 512 keys, 8 heads of 256). On a CPU
    the kernel does it in one pass over K/V: 40 us instead of 190-230 for E2B's sliding layers. The weight
    reads around it got faster too (E2B int4 step 106 -> 79 ms, its qgemv calls 79 -> 53 ms): most likely the
    bmm's BLAS threads went on spinning after each call and took the cores from the next one."""
    B, H, T, D = q.shape
    K, out_dtype = k.shape[1], q.dtype
    no_grad = not (q.requires_grad or k.requires_grad or v.requires_grad)  # the kernel has no backward
    if q.device.type == "cpu" and all(t.dtype in _KERNEL_FLOATS for t in (q, k, v)) and no_grad \
            and D % 8 == 0 and k.stride(-1) == 1 and v.stride(-1) == 1 and kernels.kernel_available():
        return kernels.decode_attention(q, k, v, mask)
    # (a GPU has native bf16: upcasting there only adds copies and fp32 GEMMs, 1 ms of a 6 ms E2B step)
    dtype = torch.promote_types(q.dtype, torch.float32) if q.device.type == "cpu" else q.dtype
    q, k, v = q.reshape(B, K, H // K * T, D).to(dtype), k.to(dtype), v.to(dtype)
    scores = (q @ k.transpose(-1, -2)).view(B, K, H // K, T, -1)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, T, S]
    probs = torch.softmax(scores, dim=-1).view(B, K, H // K * T, -1)
    return (probs @ v).view(B, H, T, D).to(out_dtype)


def prefill_attention(q, k, v, mask, block: int = 256):
    """SDPA (no 1/sqrt(D) scale) of q [B, H, T, D] over k, v [B, K, S, D] with mask [B, 1, T, S]. On a CPU,
    by blocks of 256 queries over just the keys each block may see: the CPU kernel computes every masked
    score, and a sliding layer's 2,048-token prompt sees 768 of the 2,048 keys per block, a causal one half
    (E2B, 2,048 tokens: 267 -> 110 ms per sliding layer, 524 -> 331 ms per full one). Masked keys weigh
    exactly 0 either way. (A GPU's kernels are fast enough; the key range would cost a device sync there.)"""
    k, v = k.to(q.dtype), v.to(q.dtype)  # a bf16 cache under fp32 activations (engine.kv.cache_dtype)
    gqa = k.shape[1] != q.shape[1]
    T = q.shape[2]
    if q.device.type != "cpu" or T <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=gqa)
    out = []
    for t0 in range(0, T, block):
        m = mask[:, :, t0:t0 + block]
        seen = m.any(dim=(0, 1, 2)).nonzero()  # keys that some query of the block sees
        lo, hi = (seen[0].item(), seen[-1].item() + 1) if len(seen) else (0, k.shape[2])
        out.append(F.scaled_dot_product_attention(q[:, :, t0:t0 + block], k[:, :, lo:hi], v[:, :, lo:hi],
                                                  attn_mask=m[..., lo:hi], scale=1.0, enable_gqa=gqa))
    return torch.cat(out, dim=2)


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

    def new_kv(self, x: torch.Tensor, cos, sin, keep_k: bool = True):
        """K [B, T, K, D] (normed, rotated) and V [B, T, K, D] (normed without scale) of the new tokens.
        With K=V, V is the normalised raw key projection; a cache stores only V and K is rebuilt from it,
        so K is not computed (None) unless `keep_k`."""
        B, T, _ = x.shape
        raw_k = self.k_proj(x).view(B, T, -1, self.head_dim)
        if self.v_proj is None:
            v = self.v_norm(raw_k)
            return (apply_rope(self.k_norm(raw_k), cos, sin) if keep_k else None), v
        return apply_rope(self.k_norm(raw_k), cos, sin), self.v_norm(self.v_proj(x).view(B, T, -1, self.head_dim))

    def forward(self, x, cos, sin, k, v, mask):
        """x [B, T, E]; k, v [B, K, S, D]; mask [B, 1, T, S] (True = attend)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), cos, sin).transpose(1, 2)
        # Gemma 4 attention has no 1/sqrt(D) scale: q_norm / k_norm already fix the logit scale.
        if T <= 4:  # decode: CPU's flash-attention kernel costs ~1.5 ms a call whatever the size
            out = small_query_attention(q, k, v, mask)
        else:
            out = prefill_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x):
        h = F.gelu(self.gate_proj(x), approximate="tanh")
        # In place without autograd: one prompt-sized [T, intermediate] tensor fewer at the peak of a prefill.
        h = h * self.up_proj(x) if h.requires_grad else h.mul_(self.up_proj(x))
        return self.down_proj(h)


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


def expert_matmul(x: torch.Tensor, bank, e: int) -> torch.Tensor:
    """x @ W[e].T for a bank of expert weights: a float tensor [n, out, in], or a quantized bank module."""
    return bank.matmul(x, e) if isinstance(bank, nn.Module) else matmul(x, bank[e])


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj [n, 2I, E], down_proj [n, E, I]; only chosen experts run."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n, E, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * I, E))
        self.down_proj = nn.Parameter(torch.empty(n, E, I))

    def forward(self, x, weights, ids):  # x [N, E], weights / ids [N, k]
        out = torch.zeros_like(x)
        flat = ids.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // ids.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            tok = token[start:start + n]
            start += n
            gate, up = expert_matmul(x[tok], self.gate_up_proj, e).chunk(2, dim=-1)
            y = expert_matmul(F.gelu(gate, approximate="tanh") * up, self.down_proj, e)
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
            h = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar


def _mask(q_pos, k_pos, k_valid, window: int | None):
    """[B, 1, T, S] boolean mask from query positions [B, T] and key positions / validity [B, S]."""
    q, kp = q_pos[:, :, None], k_pos[:, None, :]
    m = (kp <= q) & k_valid[:, None, :]
    if window is not None:  # the reference's sliding window: key > query - window
        m &= kp > q - window
    return m[:, None]


def _group_mask(groups, pos, k_valid, window: int):
    """[B, 1, T, T]: query and key in the same media group (> 0), key within the sliding window (key > query -
    window: every later key of the group passes) — the reference's AND(window, OR(causal, same block))."""
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] > 0)
    return (same & (pos[:, None, :] > pos[:, :, None] - window) & k_valid[:, None, :])[:, None]


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

    def forward(self, embeds, ple_ids, positions, cache=None, cache_rows=slice(None), key_valid=None, keep=None,
                media_groups=None):
        """Run the decoder over new tokens; returns final-normed hidden states.

        embeds [B, T, E] (already scaled); ple_ids [B, T] (token ids for the PLE lookup, multimodal slots
        mapped to the pad id); positions [B, T]. `cache`: an engine.kv.KVCache to read and extend (its rows
        `cache_rows` hold these sequences); without one, the T tokens attend among themselves, `key_valid`
        [B, T] marking padding. `keep`: a slice along T of the outputs wanted. KV-shared layers produce no
        K/V, so from the first of them on only the kept tokens are computed (the last prompt token in prefill).
        `media_groups` [B, T]: 1, 2, ... per image / video frame, 0 for text (26B/31B, `use_bidirectional_attention:
        "vision"`): on sliding layers the tokens of one group also see each other's later tokens (still within
        the window); full layers stay causal. Cache-free path only: with a cache, the cache's plan carries
        them (engine.kv.PagedKVCache.batch).
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
        if cache is not None:
            if media_groups is not None:
                raise ValueError("media_groups go to the cache's plan (engine.kv.PagedKVCache.batch), not here")
            plan = cache.plan(positions, cache_rows)
        else:
            valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=positions.device)
            # A padding query sees itself, so that no row of the mask is empty (SDPA would return NaN).
            eye = torch.eye(T, dtype=torch.bool, device=positions.device)[None, None]
            plan_masks = {kind: _mask(positions, positions, valid, cfg.sliding_window if kind == "sliding" else None)
                          | eye for kind in ("sliding", "full")}
            if media_groups is not None:
                plan_masks["sliding"] = plan_masks["sliding"] | _group_mask(media_groups, positions, valid,
                                                                            cfg.sliding_window)
        x, shared, key_rope = embeds, {}, {}
        for i, layer in enumerate(self.layers):
            spec = layer.spec
            kind = "sliding" if spec.sliding else "full"
            cos, sin = rope[kind]
            if i == cfg.first_shared_layer and keep is not None:
                # Copies, not views: the prompt-sized tensors are freed here, before the shared layers (a
                # 512-token prefill of E2B in fp32 held 21 MB of PLE inputs and RoPE tables to the end).
                p = x_normed = k_new = v_new = None  # the last layer's prompt-sized tensors
                x, positions = x[:, keep].clone(), positions[:, keep]
                rope = {kd: (c[:, keep].clone(), s[:, keep].clone()) for kd, (c, s) in rope.items()}
                cos, sin = rope[kind]
                shared = {j: (k, v, m[:, :, keep]) for j, (k, v, m) in shared.items()}
                if x.device.type == "cpu" and T > 1:
                    return_freed_heap()
            x_normed = layer.input_layernorm(x)
            if spec.kv_shared:  # K/V come explicitly from the donor layer
                k, v, mask = shared[spec.kv_source]
            else:
                attn = layer.self_attn
                k_new, v_new = attn.new_kv(x_normed, cos, sin, keep_k=cache is None)
                if cache is None:
                    k, v, mask = k_new.transpose(1, 2), v_new.transpose(1, 2), plan_masks[kind]
                else:
                    k, v, mask = cache.update(i, k_new, v_new, plan)
                if k is None:  # K=V layer: the cache keeps one copy, keys are rebuilt from it
                    if kind not in key_rope:
                        key_rope[kind] = rope_cos_sin(getattr(self, f"inv_freq_{kind}"), plan.key_pos[kind], dtype)
                    c, s = key_rope[kind]
                    k = apply_rope(v.transpose(1, 2) * attn.k_norm.weight.to(dtype), c, s).transpose(1, 2)
                    k = k.to(v.dtype)  # as a stored K would be (a bf16 cache under fp32 activations)
                if i in self.donors:
                    shared[i] = (k, v, mask)
            p, ple[i] = ple[i], None
            x = layer(x, x_normed, p, cos, sin, k, v, mask)
        if keep is not None and cfg.first_shared_layer == cfg.num_layers:
            x = x[:, keep]
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lm_head"):
            logits = self.lm_head(hidden)
        elif hasattr(self.embed_tokens, "project"):  # quantized tied table
            logits = self.embed_tokens.project(hidden)
        else:
            logits = matmul(hidden, self.embed_tokens.weight)
        cap = self.cfg.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

