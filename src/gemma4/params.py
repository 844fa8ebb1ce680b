"""Parameter counts and K/V cache size of a Gemma 4 model, from its config.json alone (no weights).

Counting convention (the one README §2 of the shared configs uses): every tensor the checkpoint stores,
the tied LM head once. That is parameters plus persistent buffers: the per-layer `layer_scalar` (JAX's
`skip_scale`), the vision tower's `std_bias` / `std_scale` and the clipped linears' min/max bounds.

The text decoder is counted by building our own `Gemma4` on the meta device (no memory, well under a
second for 31B), so the count is the model we run. The vision and audio towers are not built yet: they are
counted in closed form, from transformers' Gemma4VisionModel / Gemma4AudioModel / Gemma4MultimodalEmbedder
(tests/test_cli.py checks both formulas against transformers' own meta-device instantiation).
"""
from __future__ import annotations

from .config import ModelConfig
from .engine.kv import kv_bytes, kv_bytes_per_token
from .model import empty_model
from .weights import resolve_dtype


def vision_params(v: dict, text_hidden: int) -> tuple[int, int]:
    """(vision tower, `embed_vision` projector) sizes; defaults are Gemma4VisionConfig's."""
    h, ffn, layers = v.get("hidden_size", 768), v.get("intermediate_size", 3072), v.get("num_hidden_layers", 16)
    heads, kv, hd = v.get("num_attention_heads", 12), v.get("num_key_value_heads", 12), v.get("head_dim", 64)
    patch, table = v.get("patch_size", 16), v.get("position_embedding_size", 10240)
    clip_bounds = 4 * 7 if v.get("use_clipped_linears", False) else 0  # in/out min/max of 7 linears
    layer = (h * heads * hd + 2 * h * kv * hd + heads * hd * h  # q, k, v, o
             + 2 * hd  # q_norm, k_norm (v_norm has no scale)
             + 3 * h * ffn  # gate, up, down
             + 4 * h  # input / post-attention / pre- and post-feedforward norms
             + clip_bounds)
    tower = (3 * patch * patch * h  # patch input projection
             + 2 * table * h  # learned 2-D position table (x and y)
             + layers * layer
             + (2 * h if v.get("standardize", False) else 0))  # std_bias, std_scale
    return tower, h * text_hidden  # projector: scale-less RMSNorm, then a linear into the text width


def audio_params(a: dict, text_hidden: int) -> tuple[int, int]:
    """(audio tower, `embed_audio` projector) sizes of the Conformer encoder; defaults are Gemma4AudioConfig's."""
    h, layers, heads = a.get("hidden_size", 1024), a.get("num_hidden_layers", 12), a.get("num_attention_heads", 8)
    c0, c1 = a.get("subsampling_conv_channels", [128, 32])
    kernel, out = a.get("conv_kernel_size", 5), a.get("output_proj_dims", 1536)
    clip_bounds = 4 * 10 if a.get("use_clipped_linears", True) else 0  # in/out min/max of 10 linears
    feed_forward = 2 * h * 4 * h + 2 * h  # two linears (x4 width), pre / post norm
    attention = 5 * h * h + h // heads  # q, k, v, post, relative_k_proj; per_dim_scale
    light_conv = 3 * h * h + h * kernel + 2 * h  # linear_start (2h, GLU), linear_end, depthwise conv, 2 norms
    layer = 2 * feed_forward + attention + light_conv + 3 * h + clip_bounds  # + 3 norms
    subsample = (9 * c0 + c0  # 3x3 conv 1 -> c0, LayerNorm without bias
                 + 9 * c0 * c1 + c1  # 3x3 conv c0 -> c1, LayerNorm
                 + (c0 // 4) * c1 * h)  # input_proj_linear (transformers sizes it from c0)
    tower = subsample + layers * layer + h * out + out  # output_proj has a bias
    return tower, out * text_hidden


def count_params(config: ModelConfig, context: int | None = None, dtype=None) -> dict:
    """Parameter counts (see the module docstring), and the K/V cache of one `context`-token sequence
    (default: max_position_embeddings) at `dtype` (default: the checkpoint's)."""
    text = config.text
    model = empty_model(config).language_model
    state = model.state_dict()  # parameters and persistent buffers; a tied LM head is not a separate tensor
    params_text = sum(t.numel() for t in state.values())
    experts = sum(t.numel() for name, t in state.items() if ".experts." in name)
    # A token runs top_k of the num_experts experts; everything else (embeddings included) counts fully.
    inactive = experts * (text.num_experts - text.top_k_experts) // text.num_experts if text.num_experts else 0
    vision = sum(vision_params(config.vision, text.hidden_size)) if config.vision else 0
    audio = sum(audio_params(config.audio, text.hidden_size)) if config.audio else 0

    context = text.max_position_embeddings if context is None else context
    if not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    dtype = resolve_dtype(dtype, config)
    cache_bytes = kv_bytes(text, context, dtype.itemsize)
    return {
        "params_total": params_text + vision + audio,
        "params_active": params_text - inactive,
        "params_embedding": state["embed_tokens.weight"].numel(),
        "params_ple": state["embed_tokens_per_layer.weight"].numel() if text.ple_dim else 0,
        "params_text": params_text,
        "params_vision": vision,
        "params_audio": audio,
        "layers": text.num_layers,
        "context": context,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": kv_bytes_per_token(text, context, dtype.itemsize),
        "kv_cache_bytes": cache_bytes,
    }


def plan_parallel(config: ModelConfig, world: int, expert_parallel: bool = False, context: int | None = None,
                  dtype=None) -> dict:
    """Per-rank memory of `world`-way tensor parallelism (gemma4.parallel), from the model sharded on the meta
    device: the text weights each rank holds (rank 0 holds the media towers as well) and its K/V cache of one
    `context`-token sequence, at `dtype` (default: the checkpoint's)."""
    from .parallel import shard

    model = shard(empty_model(config, media=False), 0, world, expert_parallel)
    dtype = resolve_dtype(dtype, config)
    text = model.config.text
    context = text.max_position_embeddings if context is None else context
    params = sum(t.numel() for t in model.language_model.state_dict().values())
    vision = sum(vision_params(config.vision, text.hidden_size)) if config.vision else 0
    audio = sum(audio_params(config.audio, text.hidden_size)) if config.audio else 0
    return {"tensor_parallel": world, "expert_parallel": expert_parallel, "params_text_per_rank": params,
            "weight_bytes_per_rank": params * dtype.itemsize, "tower_bytes_rank0": (vision + audio) * dtype.itemsize,
            "kv_bytes_per_token_per_rank": kv_bytes_per_token(text, context, dtype.itemsize),
            "kv_cache_bytes_per_rank": kv_bytes(text, context, dtype.itemsize)}
