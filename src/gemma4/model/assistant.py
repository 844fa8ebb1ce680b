"""Gemma 4's MTP "assistant" drafters: a small decoder that proposes the target's next tokens from the target's
own state, for speculative decoding.

One draft step reads the target's scaled embedding of the last token and its last hidden state (after the final
norm), concatenated -> `pre_projection` -> 4 decoder layers -> norm. None of the layers has K/V of its own: each
attends to the target's K/V of its attention kind (the target's last non-shared sliding / full layer), with the
draft position held at the target's last position. `post_projection` maps the result back to the target's width:
the "hidden state" of the next draft step. Logits come from the drafter's own tied embedding table; E2B / E4B's
drafters score only the 4,096 tokens of the 32 best of 2,048 token clusters (`centroids`, `token_ordering`).

Module names follow the published checkpoint keys (`model.layers.N...`, `pre_projection`, `masked_embedding...`).
Shapes: B batch, T draft positions (1), S target keys, E drafter width, Eb target width (backbone), V vocab.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import ConfigError, TextConfig, parse_text_config
from .text import DecoderLayer, Linear, RMSNorm, rope_cos_sin, rope_inv_freq

TARGET = -1  # LayerSpec.kv_source of a drafter layer: the target's K/V of the layer's attention kind


@dataclass(frozen=True)
class AssistantConfig:
    text: TextConfig  # the drafter's decoder (its layers' kv_source is TARGET)
    backbone_hidden_size: int  # the target's hidden size: E2B 1536, E4B 2560, 31B 5376
    use_ordered_embeddings: bool  # centroid head (E2B, E4B): only the tokens of the best clusters are scored
    num_centroids: int  # token clusters (2048); vocab_size / num_centroids tokens each
    centroid_top_k: int  # clusters scored per position (32)


def parse_assistant_config(cfg: dict) -> AssistantConfig:
    """A drafter's config.json (model_type gemma4_assistant) -> AssistantConfig; ConfigError if it is not one."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gemma4_assistant":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ConfigError(f"not a Gemma 4 assistant (drafter) config: model_type {got!r}, expected 'gemma4_assistant'")
    tc = cfg.get("text_config")
    if not isinstance(tc, dict):
        raise ConfigError("a gemma4_assistant config needs a text_config object")
    n = tc.get("num_hidden_layers")
    if tc.get("num_kv_shared_layers") not in (None, 0, n):
        raise ConfigError(f"num_kv_shared_layers={tc['num_kv_shared_layers']}: every drafter layer attends to the "
                          f"target's K/V ({n} of {n})")
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        if tc.get(key):
            raise ConfigError(f"text_config.{key} must be 0 for a drafter, got {tc[key]!r}")
    for key in ("enable_moe_block", "use_double_wide_mlp"):
        if tc.get(key):
            raise ConfigError(f"text_config.{key} must be false for a drafter")
    text = parse_text_config({**tc, "num_kv_shared_layers": 0}, tc.get("dtype") or cfg.get("dtype"))
    text = dataclasses.replace(text, layers=tuple(dataclasses.replace(s, kv_source=TARGET) for s in text.layers))
    ordered = bool(cfg.get("use_ordered_embeddings", False))
    centroids, top_k = cfg.get("num_centroids", 2048), cfg.get("centroid_intermediate_top_k", 32)
    backbone = cfg.get("backbone_hidden_size")
    if not isinstance(backbone, int) or backbone <= 0:
        raise ConfigError(f"backbone_hidden_size must be a positive integer, got {backbone!r}")
    if ordered and not (isinstance(centroids, int) and centroids > 0 and text.vocab_size % centroids == 0
                        and isinstance(top_k, int) and 0 < top_k <= centroids):
        raise ConfigError(f"num_centroids={centroids!r} must divide vocab_size={text.vocab_size} and "
                          f"centroid_intermediate_top_k={top_k!r} be in [1, num_centroids]")
    return AssistantConfig(text, backbone, ordered, centroids, top_k)


class AssistantDecoder(nn.Module):
    """The drafter's decoder stack: `model.*` in the checkpoint (embed_tokens is also its tied LM head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """The centroid head: `centroids` scores the token clusters; the tokens of the `top_k` best (rows of
    `token_ordering` viewed [num_centroids, V / num_centroids]) are scored against the LM head, the rest get
    the lowest of those scores minus one, as the reference fills them."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.top_k, self.num_centroids = cfg.centroid_top_k, cfg.num_centroids
        self.centroids = Linear(cfg.text.hidden_size, cfg.num_centroids)
        self.register_buffer("token_ordering", torch.zeros(cfg.text.vocab_size, dtype=torch.long))

    def candidates(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, E] -> the token ids scored at each position [B, T, top_k * V / num_centroids]."""
        clusters = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # [B, T, top_k]
        return self.token_ordering.view(self.num_centroids, -1)[clusters].flatten(-2)

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ids = self.candidates(h)  # [B, T, C]
        scores = (h.unsqueeze(-2) @ table[ids].transpose(-1, -2)).squeeze(-2)  # [B, T, C]
        out = torch.full((*h.shape[:-1], table.shape[0]), scores.min().item() - 1.0, dtype=h.dtype, device=h.device)
        return out.scatter_(-1, ids, scores)


class Assistant(nn.Module):
    """`drafter(embeds, hidden, positions, kv)` -> (logits [B, T, V], next hidden [B, T, Eb])."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.cfg = cfg
        E, Eb = cfg.text.hidden_size, cfg.backbone_hidden_size
        self.model = AssistantDecoder(cfg.text)
        self.pre_projection = Linear(2 * Eb, E)
        self.post_projection = Linear(E, Eb)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(cfg)
        self.init_buffers()

    def init_buffers(self, device=None):
        """(Re)build the RoPE tables of the drafter's own attention kinds (not in the checkpoint)."""
        for kind in ("sliding", "full"):
            spec = next((s for s in self.cfg.text.layers if s.sliding == (kind == "sliding")), None)
            if spec is not None:
                inv = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_fraction)
                self.register_buffer(f"inv_freq_{kind}", inv.to(device or "cpu"), persistent=False)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: dict):
        """embeds [B, T, Eb]: the target's scaled embedding of the token drafted from; hidden [B, T, Eb]: the
        target's final-normed hidden state there (or the previous draft step's next hidden); positions [B, T]:
        the target's last position; kv {"sliding" / "full": (K, V [B, K, S, D], mask [B, 1, T, S])}: the keys
        the target's last layer of each kind attended with (True = attend). -> (logits [B, T, V], next hidden)."""
        h, next_hidden = self.step(embeds, hidden, positions, kv)
        return self.logits(h), next_hidden

    def step(self, embeds, hidden, positions, kv):
        """The decoder: (final-normed drafter state h [B, T, E], next hidden [B, T, Eb]); see `forward`."""
        x = self.pre_projection(torch.cat([embeds, hidden], dim=-1))
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions, x.dtype) for kind in kv}
        for layer in self.model.layers:
            kind = "sliding" if layer.spec.sliding else "full"
            k, v, mask = kv[kind]
            x = layer(x, layer.input_layernorm(x), None, *rope[kind], k, v, mask)
        h = self.model.norm(x)
        return h, self.post_projection(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, E] -> logits [B, T, V] (outside the scored clusters: the lowest score minus one)."""
        table = self.model.embed_tokens.weight
        return self.masked_embedding(h, table) if self.cfg.use_ordered_embeddings else ops.linear(h, table)

    def top_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """argmax of `logits(h)` [B, T] without the [B, T, V] tensor: only the scored clusters' tokens."""
        table = self.model.embed_tokens.weight
        if not self.cfg.use_ordered_embeddings:
            return ops.linear(h, table).argmax(-1)
        ids = self.masked_embedding.candidates(h)
        scores = (h.unsqueeze(-2) @ table[ids].transpose(-1, -2)).squeeze(-2)
        return ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)


def check_pair(target: TextConfig, drafter: AssistantConfig) -> None:
    """ValueError unless `drafter` was made for a target of this shape: its width, vocabulary, and for each
    attention kind the head dim and KV heads of the target layer whose K/V it reads."""
    if drafter.backbone_hidden_size != target.hidden_size:
        raise ValueError(f"the drafter was made for a target {drafter.backbone_hidden_size} wide; this model is "
                         f"{target.hidden_size} wide (E2B 1536, E4B 2560, 26B-A4B 2816, 31B 5376)")
    if drafter.text.vocab_size != target.vocab_size:
        raise ValueError(f"the drafter's vocabulary has {drafter.text.vocab_size} tokens, the model's "
                         f"{target.vocab_size}")
    for spec in drafter.text.layers:
        kind = "sliding" if spec.sliding else "full"
        donor = donor_layer(target, spec.sliding)
        if donor is None:
            raise ValueError(f"the drafter attends to {kind} layers' K/V; this model has none")
        if (spec.head_dim, spec.num_kv_heads) != (donor.head_dim, donor.num_kv_heads):
            raise ValueError(f"drafter layer {spec.index} ({kind}) has head dim {spec.head_dim} and "
                             f"{spec.num_kv_heads} KV heads; the model's {kind} layer {donor.index}, whose K/V it "
                             f"reads, has {donor.head_dim} and {donor.num_kv_heads}")


def donor_layer(target: TextConfig, sliding: bool):
    """The target layer whose K/V a drafter layer of this kind reads: the last that computes its own."""
    return next((s for s in reversed(target.layers) if s.sliding == sliding and not s.kv_shared), None)


@torch.no_grad()
def draft(drafter: Assistant, embed, token: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: dict,
          k: int) -> torch.Tensor:
    """k greedy drafts [B, k] after `token` [B]: each step embeds the previous token with the target's own
    (scaled) table `embed`, and feeds the drafter's next hidden back; the position and the target's K/V stay
    those of the target's last position (see `Assistant.forward`)."""
    out = []
    for _ in range(k):
        h, hidden = drafter.step(embed(token[:, None]), hidden, positions, kv)
        token = drafter.top_tokens(h)[:, -1]
        out.append(token)
    return torch.stack(out, dim=1)
