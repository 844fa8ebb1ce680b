"""The Gemma 4 vision tower (SigLIP-style ViT) and its projector into the text embedding space.

Two published sizes, one code path:
  * edge (E2B/E4B, ~150M): 16 layers of width 768; every linear clamps its input and output to ranges
    stored in the checkpoint (`use_clipped_linears`).
  * large (26B-A4B/31B, ~550M): 27 layers of width 1152; no clipping, but the pooled output is
    standardised with a stored per-channel bias and scale (`standardize`).

Pipeline for one image of ph x pw patches (16 px each, both multiples of 3, see gemma4.media):
  patches [P, 768] in [0, 1] -> 2x-1 -> linear + learned (x, y) position rows -> L bidirectional
  layers with 2-D RoPE -> average over each 3x3 block of patches -> x sqrt(width) -> (standardise)
  -> `embed_vision`: scale-less RMSNorm, linear into the text width -> N = P / 9 soft tokens.

Module and parameter names equal the checkpoint keys below `model.vision_tower.` / `model.embed_vision.`.
Shapes: B images, P patches, E vision width, H heads, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .text import Linear, RMSNorm, apply_rope

# Gemma4VisionConfig's defaults: a config.json may leave any of them out.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                       num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                       position_embedding_size=10240, use_clipped_linears=False, standardize=False,
                       rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                       rope_parameters={"rope_type": "axial", "rope_theta": 100.0})


def vision_settings(cfg: dict) -> dict:
    """The stored vision_config with defaults filled in, checked for what this implementation supports."""
    s = {**VISION_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if s["hidden_activation"] != "gelu_pytorch_tanh":
        raise ValueError(f"vision_config.hidden_activation {s['hidden_activation']!r} is not gelu_pytorch_tanh")
    rope = s["rope_parameters"] or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision_config.rope_parameters: only axial RoPE exists in Gemma 4, got {rope!r}")
    if s["head_dim"] % 4:
        raise ValueError(f"vision_config.head_dim={s['head_dim']} must be a multiple of 4 (2-D RoPE)")
    return s


class ClippedLinear(nn.Module):
    """A bias-free linear (`.linear`) whose input and output are clamped to stored ranges when the config
    says so (the edge towers were trained with activation clipping; the bounds are checkpoint buffers)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = Linear(in_features, out_features)
        if clipped:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min.to(x.dtype), self.input_max.to(x.dtype))
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min.to(x.dtype), self.output_max.to(x.dtype))
        return x


def rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, P, H, D]: the first half of each head rotates with the patch's x (column), the second half
    with its y (row); cos / sin [B, P, 2, 1, D/2] hold one table per axis."""
    half = x.shape[-1] // 2
    return torch.cat([apply_rope(x[..., :half], cos[:, :, 0], sin[:, :, 0]),
                      apply_rope(x[..., half:], cos[:, :, 1], sin[:, :, 1])], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        E, H, K, D, clip = (s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                            s["use_clipped_linears"])
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, D
        self.q_proj = ClippedLinear(E, H * D, clip)
        self.k_proj = ClippedLinear(E, K * D, clip)
        self.v_proj = ClippedLinear(E, K * D, clip)
        self.o_proj = ClippedLinear(H * D, E, clip)
        self.q_norm = RMSNorm(D, s["rms_norm_eps"])
        self.k_norm = RMSNorm(D, s["rms_norm_eps"])
        self.v_norm = RMSNorm(D, s["rms_norm_eps"], with_scale=False)

    def forward(self, x, cos, sin, mask):
        """x [B, P, E]; mask None (every patch real) or [B, 1, 1, P] (True = a real patch)."""
        B, P, _ = x.shape
        q = rope_2d(self.q_norm(self.q_proj(x).view(B, P, -1, self.head_dim)), cos, sin).transpose(1, 2)
        k = rope_2d(self.k_norm(self.k_proj(x).view(B, P, -1, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(B, P, -1, self.head_dim)).transpose(1, 2)
        # Bidirectional over the image; like the text model, no 1/sqrt(D): q_norm / k_norm set the scale.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        E, I, clip = s["hidden_size"], s["intermediate_size"], s["use_clipped_linears"]
        self.gate_proj = ClippedLinear(E, I, clip)
        self.up_proj = ClippedLinear(E, I, clip)
        self.down_proj = ClippedLinear(I, E, clip)

    def forward(self, x):
        return self.down_proj(ops.gelu_mul(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        E, eps = s["hidden_size"], s["rms_norm_eps"]
        self.self_attn = VisionAttention(s)
        self.mlp = VisionMLP(s)
        self.input_layernorm = RMSNorm(E, eps)
        self.post_attention_layernorm = RMSNorm(E, eps)
        self.pre_feedforward_layernorm = RMSNorm(E, eps)
        self.post_feedforward_layernorm = RMSNorm(E, eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(s) for _ in range(s["num_hidden_layers"]))


class PatchEmbedder(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        E, p = s["hidden_size"], s["patch_size"]
        self.input_proj = Linear(3 * p * p, E)
        # Row 0: one embedding per patch column (x), row 1: per patch row (y).
        self.position_embedding_table = nn.Parameter(torch.zeros(2, s["position_embedding_size"], E))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pixels [B, P, 3p^2] in [0, 1]; positions [B, P, 2] (x, y), (-1, -1) = padding [B, P]."""
        w = self.input_proj.weight
        # The processor leaves pixels in [0, 1]; the model was trained on [-1, 1].
        h = self.input_proj((2 * (pixels - 0.5)).to(w.dtype))
        table = self.position_embedding_table
        if positions.max() >= table.shape[1]:
            raise ValueError(f"patch position {positions.max().item()} is beyond the learned position table "
                             f"({table.shape[1]} rows): the image has too many patches along one side")
        pos = positions.clamp(min=0)
        emb = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])  # [B, P, E]
        return h + emb.masked_fill(padding[..., None], 0.0)


class VisionModel(nn.Module):
    """`model.vision_tower`: patches + positions -> pooled features, one [N_i, E] tensor per image."""

    def __init__(self, cfg: dict):
        super().__init__()
        s = self.settings = vision_settings(cfg)
        self.pool = s["pooling_kernel_size"]
        self.patch_embedder = PatchEmbedder(s)
        self.encoder = VisionEncoder(s)
        if s["standardize"]:
            self.register_buffer("std_bias", torch.zeros(s["hidden_size"]))
            self.register_buffer("std_scale", torch.ones(s["hidden_size"]))
        self.init_buffers()

    def init_buffers(self, device=None):
        """RoPE frequencies (not in the checkpoint): D/4 of them, shared by the x and the y axis."""
        s = self.settings
        half = s["head_dim"] // 2
        theta = float((s["rope_parameters"] or {}).get("rope_theta", 100.0))
        inv = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float, device="cpu") / half)
        self.register_buffer("inv_freq", inv.to(device or "cpu"), persistent=False)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [B, P, 3p^2]; positions [B, P, 2] long, (-1, -1) marking padding patches.
        Returns one [N_i, E] fp32-scaled (then model-dtype) tensor per image, N_i = real patches / k^2."""
        B, P, _ = pixel_values.shape
        padding = (positions == -1).all(-1)  # [B, P]
        x = self.patch_embedder(pixel_values, positions, padding)
        dtype = x.dtype
        # 2-D RoPE tables: [B, P, 2 axes, 1, D/2], each axis's D/4 frequencies written twice (rotate-half form).
        freqs = positions[..., None].float() * self.inv_freq  # [B, P, 2, D/4]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, :, None, :]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        # Padding patches (only present when images of different sizes share a batch) are never attended to.
        mask = ~padding[:, None, None, :] if padding.any() else None
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, mask)
        return [self._pool(x[b][~padding[b]], positions[b][~padding[b]]) for b in range(B)]

    def _pool(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """h [P, E] real patches, pos [P, 2] -> [P / k^2, E]: mean of each k x k block of patches (row-major
        blocks), x sqrt(E) in fp32, then standardised; the reference rounds the mean to the model dtype first."""
        k, dtype = self.pool, h.dtype
        width = int(pos[:, 0].max().item()) + 1  # patches per row
        n = h.shape[0] // (k * k)
        if n * k * k != h.shape[0] or width % k:
            raise ValueError(f"{h.shape[0]} patches of width {width} do not tile into {k}x{k} pooling blocks")
        block = torch.div(pos, k, rounding_mode="floor")
        idx = block[:, 0] + (width // k) * block[:, 1]  # [P] soft-token index of each patch
        # The mean as a [n, P] x [P, E] product with weights 1/k^2, as the reference computes it (an
        # index_add gives the same mean, rounded differently; the text model amplifies such 1e-7 changes).
        weights = F.one_hot(idx, n).float() * (1.0 / (k * k))  # [P, n]
        pooled = weights.T @ h.float()  # [n, E]
        out = pooled.to(dtype).float() * self.settings["hidden_size"] ** 0.5
        if self.settings["standardize"]:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out.to(dtype)


class MultimodalEmbedder(nn.Module):
    """`model.embed_vision` / `model.embed_audio`: scale-less RMSNorm, then a linear into the text width.
    The result goes into the text stream as is (text embeddings get x sqrt(width); these do not)."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = Linear(in_dim, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
