"""The Gemma 4 audio tower (E2B/E4B): a USM-style Conformer over log-mel features, ~300M parameters.

  log-mel [B, T, 128] (10 ms frames, gemma4.media) -> two 3x3 stride-2 convolutions (time and frequency / 4,
  so 40 ms per step) -> linear to width E -> L Conformer blocks (half-step FFN, chunked local self-attention
  with relative positions, light depthwise convolution, half-step FFN) -> linear to `output_proj_dims`
  -> `embed_audio` (scale-less RMSNorm + linear) into the text width: one soft token per 40 ms.

Attention is local: frames are cut into chunks of 12, and each frame sees itself and the 11 frames before it
(the window holds 12 past frames, but the reference's mask drops the oldest); no future frames.

Module and parameter names equal the checkpoint keys below `model.audio_tower.` / `model.embed_audio.`.
Shapes: B clips, T frames, E width, H heads, D head dim, C chunk size, W context window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .text import RMSNorm
from .vision import ClippedLinear

# Gemma4AudioConfig's defaults.
AUDIO_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, hidden_act="silu",
                      subsampling_conv_channels=[128, 32], conv_kernel_size=5, residual_weight=0.5,
                      attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
                      attention_logit_cap=50.0, attention_invalid_logits_value=-1.0e9, use_clipped_linears=True,
                      rms_norm_eps=1e-6, gradient_clipping=1e10, output_proj_dims=1536)
MEL_BINS = 128  # the feature extractor's feature_size


def audio_settings(cfg: dict) -> dict:
    s = {**AUDIO_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if s["hidden_act"] != "silu":
        raise ValueError(f"audio_config.hidden_act {s['hidden_act']!r} is not silu")
    if s["attention_context_right"] != 0:
        raise ValueError("audio_config.attention_context_right != 0 (look-ahead) is not supported")
    return s


def clip_value(dtype: torch.dtype, limit: float) -> float:
    """The reference's `gradient_clipping` bound, kept inside the dtype's range."""
    return min(limit, torch.finfo(dtype).max)


class SubsampleLayer(nn.Module):
    """3x3 stride-2 convolution over (time, frequency), LayerNorm over channels, ReLU."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(cout, eps=eps, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """x [B, C, T, F], mask [B, T] (True = real frame) -> [B, C', T/2, F/2], mask [B, T/2]."""
        x = x * mask[:, None, :, None].to(x.dtype)  # padding frames must not leak into real ones
        x = self.conv(x.to(self.conv.weight.dtype))
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return x, mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        c0, c1 = s["subsampling_conv_channels"]
        self.layer0 = SubsampleLayer(1, c0, s["rms_norm_eps"])
        self.layer1 = SubsampleLayer(c0, c1, s["rms_norm_eps"])
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, s["hidden_size"], bias=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        """features [B, T, 128], mask [B, T] -> [B, T/4, E], mask [B, T/4]."""
        x, mask = self.layer0(features[:, None], mask)
        x, mask = self.layer1(x, mask)
        B, _, T, _ = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, T, -1)  # [B, T/4, (F/4) * c1], frequency-major
        if x.shape[-1] != self.input_proj_linear.in_features:
            # transformers sizes this linear from the first conv width (c0 / 4 * c1), while the data has
            # 128 / 4 frequency rows: only c0 = 128 (every published model) gives a tower that runs.
            raise ValueError(f"audio tower: subsampling_conv_channels[0] must be {MEL_BINS} to take "
                             f"{MEL_BINS}-bin features (input_proj_linear takes {self.input_proj_linear.in_features})")
        return self.input_proj_linear(x), mask


class FeedForward(nn.Module):
    """Macaron half-step feed-forward: x + 0.5 * norm(W2 silu(W1 norm(x)))."""

    def __init__(self, s: dict):
        super().__init__()
        E, clip = s["hidden_size"], s["use_clipped_linears"]
        self.ffw_layer_1 = ClippedLinear(E, 4 * E, clip)
        self.ffw_layer_2 = ClippedLinear(4 * E, E, clip)
        self.pre_layer_norm = RMSNorm(E, s["rms_norm_eps"])
        self.post_layer_norm = RMSNorm(E, s["rms_norm_eps"])
        self.residual_weight, self.clip = s["residual_weight"], s["gradient_clipping"]

    def forward(self, x):
        c = clip_value(x.dtype, self.clip)
        h = self.pre_layer_norm(x.clamp(-c, c))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(h.clamp(-c, c)) * self.residual_weight


class AudioAttention(nn.Module):
    """Chunked local self-attention with Transformer-XL style relative position logits, in fp32."""

    def __init__(self, s: dict):
        super().__init__()
        E, H, clip = s["hidden_size"], s["num_attention_heads"], s["use_clipped_linears"]
        self.num_heads, self.head_dim = H, E // H
        self.chunk = s["attention_chunk_size"]
        self.past = s["attention_context_left"] - 1  # past frames held in each chunk's key window
        self.window = self.chunk + self.past  # W keys per chunk (no look-ahead)
        self.cap, self.invalid = s["attention_logit_cap"], s["attention_invalid_logits_value"]
        self.q_proj = ClippedLinear(E, E, clip)
        self.k_proj = ClippedLinear(E, E, clip)
        self.v_proj = ClippedLinear(E, E, clip)
        self.post = ClippedLinear(E, E, clip)
        self.relative_k_proj = nn.Linear(E, E, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def _windows(self, x: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """x [B, T, H, D] -> [B, H, n, W, D]: for chunk c, frames c*C - past .. c*C + C - 1 (zeros outside)."""
        x = F.pad(x, (0, 0, 0, 0, self.past, self.chunk - 1))
        x = x.unfold(1, self.window, self.chunk)[:, :num_chunks]  # [B, n, H, D, W]
        return x.permute(0, 2, 1, 4, 3)

    def forward(self, x: torch.Tensor, rel_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, E]; rel_pos [R, E] sinusoids of distances R-1 .. 0; valid [B, T] -> [B, T, E]."""
        B, T, _ = x.shape
        H, D, C, W = self.num_heads, self.head_dim, self.chunk, self.window
        n = -(-T // C)
        q = self.q_proj(x).float().view(B, T, H, D)
        k = self.k_proj(x).float().view(B, T, H, D)
        v = self.v_proj(x).float().view(B, T, H, D)
        # Learned per-dimension query scale (softplus(0) = log 2 cancels the 1/log 2), fixed key scale.
        q = q * (D ** -0.5 / math.log(2)) * F.softplus(self.per_dim_scale.float())
        k = k * (math.log(1 + math.e) / math.log(2))

        q = F.pad(q, (0, 0, 0, 0, 0, n * C - T)).view(B, n, C, H, D).permute(0, 3, 1, 2, 4)  # [B, H, n, C, D]
        kw, vw = self._windows(k, n), self._windows(v, n)  # [B, H, n, W, D]
        content = q @ kw.transpose(-1, -2)  # [B, H, n, C, W]

        R = rel_pos.shape[0]  # table rows: distances R-1 down to 0
        rel_k = self.relative_k_proj(rel_pos).float().view(R, H, D)
        rel = torch.einsum("bhncd,rhd->bhncr", q, rel_k)  # [B, H, n, C, R]
        # Query i of a chunk and window key j are (i + past - j) frames apart. The reference's "relative
        # shift" gives pair (i, j) table row j - i (= distance R-1-row, as R-1 == past in every config),
        # and 0 where that row does not exist (keys after the query).
        i = torch.arange(C, device=x.device)[:, None]
        j = torch.arange(W, device=x.device)[None, :]
        col = j - i  # [C, W]
        in_table = (col >= 0) & (col < R)
        rel = torch.gather(rel, -1, col.clamp(0, R - 1).expand(B, H, n, C, W)) * in_table

        logits = torch.tanh((content + rel) / self.cap) * self.cap
        # Key j of chunk c is frame c*C - past + j: it must exist, be real audio, and lie 0..past-1 frames back.
        frame = torch.arange(n, device=x.device)[:, None, None] * C - self.past + j  # [n, 1, W]
        dist = i + self.past - j  # [C, W]
        key_ok = F.pad(valid, (self.past, W))[:, (frame + self.past).clamp(min=0)]  # [B, n, 1, W]
        allowed = key_ok & (frame >= 0) & (frame < T) & (dist >= 0) & (dist < self.past)
        logits = logits.masked_fill(~allowed[:, None], self.invalid)  # finite: a padding row stays finite
        probs = torch.softmax(logits, dim=-1)
        out = (probs @ vw).permute(0, 2, 3, 1, 4).reshape(B, n * C, H * D)[:, :T]
        return self.post(out.to(x.dtype))


class LightConv(nn.Module):
    """GLU, causal depthwise convolution over time (kernel 5), RMSNorm, SiLU, linear; residual."""

    def __init__(self, s: dict):
        super().__init__()
        E, clip, eps = s["hidden_size"], s["use_clipped_linears"], s["rms_norm_eps"]
        self.linear_start = ClippedLinear(E, 2 * E, clip)
        self.linear_end = ClippedLinear(E, E, clip)
        self.depthwise_conv1d = nn.Conv1d(E, E, s["conv_kernel_size"], groups=E, bias=False)
        self.pre_layer_norm = RMSNorm(E, eps)
        self.conv_norm = RMSNorm(E, eps)
        self.clip = s["gradient_clipping"]

    def forward(self, x):
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # [B, T, E]
        k = self.depthwise_conv1d.kernel_size[0]
        h = self.depthwise_conv1d(F.pad(h.transpose(1, 2), (k - 1, 0))).transpose(1, 2)  # causal: left pad
        c = clip_value(h.dtype, self.clip)
        h = F.silu(self.conv_norm(h.clamp(-c, c)))
        return x + self.linear_end(h)


class ConformerLayer(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        E, eps = s["hidden_size"], s["rms_norm_eps"]
        self.feed_forward1 = FeedForward(s)
        self.feed_forward2 = FeedForward(s)
        self.self_attn = AudioAttention(s)
        self.lconv1d = LightConv(s)
        self.norm_pre_attn = RMSNorm(E, eps)
        self.norm_post_attn = RMSNorm(E, eps)
        self.norm_out = RMSNorm(E, eps)
        self.clip = s["gradient_clipping"]

    def forward(self, x, rel_pos, valid):
        c = clip_value(self.norm_pre_attn.weight.dtype, self.clip)
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(x.clamp(-c, c)), rel_pos, valid)
        x = x + self.norm_post_attn(h.clamp(-c, c))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(x.clamp(-c, c))


class AudioModel(nn.Module):
    """`model.audio_tower`: log-mel features [B, T, 128] + mask -> ([B, T/4, output_proj_dims], mask [B, T/4])."""

    def __init__(self, cfg: dict):
        super().__init__()
        s = self.settings = audio_settings(cfg)
        self.subsample_conv_projection = SubsampleConvProjection(s)
        self.layers = nn.ModuleList(ConformerLayer(s) for _ in range(s["num_hidden_layers"]))
        self.output_proj = nn.Linear(s["hidden_size"], s["output_proj_dims"], bias=True)
        self.init_buffers()

    def init_buffers(self, device=None):
        """Sinusoid timescales of the relative position table (not in the checkpoint)."""
        n = self.settings["hidden_size"] // 2
        step = math.log(10000.0) / max(n - 1, 1)
        inv = torch.exp(torch.arange(n, device="cpu") * -step)
        self.register_buffer("inv_timescales", inv.to(device or "cpu"), persistent=False)

    def relative_positions(self, dtype: torch.dtype) -> torch.Tensor:
        """[R, E]: [sin, cos] of distances W/2 .. 0 (the reference's table; W = chunk + past)."""
        s = self.settings
        window = s["attention_chunk_size"] + s["attention_context_left"] - 1 + s["attention_context_right"]
        dist = torch.arange(window // 2, -1, -1, device=self.inv_timescales.device)[:, None]
        t = dist * self.inv_timescales
        return torch.cat([torch.sin(t), torch.cos(t)], dim=-1).to(dtype)

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        x, mask = self.subsample_conv_projection(features, mask.bool())
        rel_pos = self.relative_positions(x.dtype)
        for layer in self.layers:
            x = layer(x, rel_pos, mask)
        return self.output_proj(x), mask
