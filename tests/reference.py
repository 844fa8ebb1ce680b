"""Tiny random-weight checkpoints of the four Gemma 4 shapes, written by the reference (transformers).

Every norm weight and scalar is randomised before saving: the reference's default init leaves them at
one, which would hide wiring bugs (a norm applied to the wrong tensor, a missing layer_scalar).
"""
from __future__ import annotations

import json
import os

import torch

BASE = dict(vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
            final_logit_softcapping=30.0, max_position_embeddings=4096, rms_norm_eps=1e-6)
S, F = "sliding_attention", "full_attention"

SHAPES = {
    # PLE, KV sharing (last 4 of 10 layers), double-wide MLP on shared layers, 1 KV head
    "e2b": dict(BASE, num_hidden_layers=10, layer_types=[S, S, S, S, F] * 2, num_key_value_heads=1,
                num_attention_heads=2, hidden_size_per_layer_input=8, num_kv_shared_layers=4,
                use_double_wide_mlp=True),
    # PLE, KV sharing (last 4 of 12), 2 KV heads
    "e4b": dict(BASE, num_hidden_layers=12, layer_types=[S, S, S, S, S, F] * 2, hidden_size_per_layer_input=8,
                num_kv_shared_layers=4),
    # mixture of experts next to the dense MLP, K=V and 1 global KV head on global layers, no PLE
    "26b": dict(BASE, num_hidden_layers=6, layer_types=[S, S, F, S, S, F], hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=8, top_k_experts=3, moe_intermediate_size=24,
                attention_k_eq_v=True, num_global_key_value_heads=1, use_bidirectional_attention="vision"),
    # dense, K=V and global KV heads, no PLE
    "31b": dict(BASE, num_hidden_layers=6, layer_types=[S, S, S, S, S, F], hidden_size_per_layer_input=0,
                attention_k_eq_v=True, num_global_key_value_heads=1, use_bidirectional_attention="vision"),
}


def randomise(model: torch.nn.Module, seed: int = 0, tame: bool = False) -> None:
    """Every norm weight and scalar uniform in [0.5, 1.5], other weights normal(0, 0.05). `tame`: scaled
    the way a trained model's are (embeddings large next to what each layer adds: post-norms near 0.1,
    other norms near 1, weights std 0.02), so that small weight errors stay small; a wild random model is
    chaotic (its fp32 and bf16 logits agree only to a cosine of ~0.97), which would drown what a
    quantization test measures."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("layer_scalar")]
        for name, t in list(model.named_parameters()) + buffers:
            lo, hi = (0.5, 1.5)
            if tame:
                lo, hi = (0.05, 0.15) if ".post_" in name else (0.8, 1.2)
            if name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")) or \
                    "layernorm" in name:
                t.copy_(torch.empty_like(t).uniform_(lo, hi, generator=gen))
            else:  # every other weight from the same seeded generator, so a shape gives one model
                std = 0.05 if not tame else 0.3 if "embed_tokens" in name else 0.02
                t.copy_(torch.empty_like(t).normal_(0, std, generator=gen))


# Tiny media towers: the text-only load must skip their tensors.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, position_embedding_size=64, use_clipped_linears=True)
AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32,
             subsampling_conv_channels=[8, 4])


def build(shape: str, out: str, text_only: bool = False, published_layout: bool = True,
          unused_shared_kv: bool = False, towers: bool = False, max_shard_size=None, seed: int = 0,
          tame: bool = False, overrides: tuple = ()):
    """Write a checkpoint to `out`; returns the reference model (fp32, eval). `tame`: see `randomise`;
    `overrides`: ((text config field, value), ...) changed from the shape's."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    tc = dict(SHAPES[shape], **dict(overrides))
    if text_only:
        model = Gemma4ForCausalLM(Gemma4TextConfig(**tc))
    else:
        model = Gemma4ForConditionalGeneration(Gemma4Config(
            text_config=tc, vision_config=VISION if towers else None, audio_config=AUDIO if towers else None))
    randomise(model, seed, tame)
    model.eval()
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    cfg_file = os.path.join(out, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if published_layout:  # the Hub layout: global_head_dim / num_global_key_value_heads, no per_layer_config
        text = cfg if text_only else cfg["text_config"]
        text.pop("per_layer_config", None)
        text["global_head_dim"] = tc["global_head_dim"]
        text["num_global_key_value_heads"] = tc.get("num_global_key_value_heads")
        with open(cfg_file, "w") as f:
            json.dump(cfg, f, indent=2)
    if unused_shared_kv:  # as some published files: K/V weights on KV-shared layers, never used
        from safetensors.torch import load_file, save_file

        st = os.path.join(out, "model.safetensors")
        state = load_file(st)
        prefix = "model." if text_only else "model.language_model."
        E, D = tc["hidden_size"], tc["head_dim"]
        for i in range(tc["num_hidden_layers"] - tc.get("num_kv_shared_layers", 0), tc["num_hidden_layers"]):
            d = tc["global_head_dim"] if tc["layer_types"][i] == F else D
            kv = tc["num_key_value_heads"]
            state[f"{prefix}layers.{i}.self_attn.k_proj.weight"] = torch.randn(kv * d, E)
            state[f"{prefix}layers.{i}.self_attn.v_proj.weight"] = torch.randn(kv * d, E)
            state[f"{prefix}layers.{i}.self_attn.k_norm.weight"] = torch.randn(d)
        save_file(state, st, metadata={"format": "pt"})
    return model


# ---- Media towers that run (issue 6): tiny edge / large vision towers, a tiny Conformer ----------------------
# Placeholder and delimiter ids inside the tiny 512-token vocabulary (the real ones are ~256000-258884).
MEDIA_TOKENS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, boa_token_id=503,
                    eoa_token_index=504, audio_token_id=505, video_token_id=506)
# Edge (E2B/E4B) layout: activation-clipped linears, no output standardisation.
VISION_EDGE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, position_embedding_size=320, use_clipped_linears=True,
                   standardize=False)
# Large (26B/31B) layout: no clipping, standardised output; grouped KV heads and a head dim of 12 on top.
VISION_LARGE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, position_embedding_size=320, use_clipped_linears=False,
                    standardize=True)
# The first subsampling width must be 128 (transformers sizes input_proj_linear from it).
AUDIO_RUN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=24,
                 subsampling_conv_channels=[128, 4])


def randomise_towers(model: torch.nn.Module, seed: int = 1) -> None:
    """Finite clipping bounds (tight enough that some activations are clipped) and a random standardisation:
    the reference initialises them to +-inf and 0 / 1, which would leave both untested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            u = torch.empty(()).uniform_(0.0, 1.0, generator=gen).item()
            if name.endswith("input_max"):
                b.fill_(1.5 + u)
            elif name.endswith("input_min"):
                b.fill_(-1.5 - u)
            elif name.endswith("output_max"):
                b.fill_(0.2 + 0.4 * u)
            elif name.endswith("output_min"):
                b.fill_(-0.2 - 0.4 * u)
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=gen))
            elif name.endswith("std_scale"):
                b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=gen))


def build_media(shape: str, out: str, vision: dict | None = None, audio: dict | None = None, seed: int = 0,
                tame: bool = False):
    """A multimodal checkpoint with tiny towers that run, placeholder ids in the tiny vocabulary; returns the
    reference Gemma4ForConditionalGeneration (fp32, eval)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=dict(SHAPES[shape]), vision_config=vision,
                                                        audio_config=audio, **MEDIA_TOKENS))
    randomise(model, seed, tame)
    randomise_towers(model, seed + 1)
    model.eval()
    model.save_pretrained(out)
    return model


def build_drafter(shape: str, out: str, ordered: bool = True, seed: int = 0):
    """A tiny MTP drafter (Gemma4AssistantForCausalLM) for the tiny target of `shape`: its width as backbone,
    the K/V heads of the target's layers it reads, random weights (norms and scalars too), a random token
    ordering for the centroid head. Returns the reference drafter (fp32, eval)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    t = SHAPES[shape]
    text = dict(vocab_size=t["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
                global_head_dim=t["global_head_dim"], layer_types=[S, S, S, F], sliding_window=t["sliding_window"],
                attention_k_eq_v=t.get("attention_k_eq_v", False),
                num_global_key_value_heads=t.get("num_global_key_value_heads"), hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, num_kv_shared_layers=4, final_logit_softcapping=None,
                max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"])
    cfg = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=t["hidden_size"],
                                use_ordered_embeddings=ordered, num_centroids=16, centroid_intermediate_top_k=4)
    model = Gemma4AssistantForCausalLM(cfg)
    randomise(model, seed)
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(t["vocab_size"], generator=torch.Generator()
                                                                   .manual_seed(seed)))
    model.eval()
    model.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:  # the published layout (see build)
        cfg = json.load(f)
    cfg["text_config"].pop("per_layer_config", None)
    cfg["text_config"]["global_head_dim"] = t["global_head_dim"]
    cfg["text_config"]["num_global_key_value_heads"] = t.get("num_global_key_value_heads")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return model
