"""Gemma 4 configuration: read a checkpoint's config.json, derive one spec per decoder layer.

Two layouts exist for the same model. The published checkpoints store `global_head_dim` and
`num_global_key_value_heads`; transformers 5.x writes `per_layer_config` (a dict of per-layer
overrides of `head_dim` / `num_key_value_heads`) instead. Both resolve to the same `LayerSpec`s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config.json we cannot run: unknown, missing or inconsistent fields."""


@dataclass(frozen=True)
class LayerSpec:
    index: int
    sliding: bool  # sliding-window ("local") attention; otherwise full ("global") attention
    head_dim: int  # 256 on sliding layers, 512 (global_head_dim) on global layers
    num_kv_heads: int  # global layers of 26B/31B use num_global_key_value_heads
    k_eq_v: bool  # no v_proj: values are the (v-normed) keys; global layers of 26B/31B
    kv_source: int  # layer whose K/V this layer attends to: itself, or the donor if KV-shared
    intermediate_size: int  # dense MLP width; doubled on KV-shared layers with use_double_wide_mlp
    moe: bool  # 26B-A4B: routed experts run in parallel with the dense MLP
    rope_theta: float
    rope_fraction: float  # share of head_dim rotated ("proportional" RoPE on global layers: 0.25)

    @property
    def kv_shared(self) -> bool:
        return self.kv_source != self.index


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int  # 262144 for every Gemma 4 size
    hidden_size: int  # model width: 1536 E2B, 2560 E4B, 2816 26B-A4B, 5376 31B
    num_layers: int
    num_heads: int  # query heads
    sliding_window: int  # keys a sliding layer sees, itself included: 512 (edge) or 1024
    rms_norm_eps: float
    final_logit_softcap: float | None  # logits = cap * tanh(logits / cap); 30.0 on all sizes
    ple_dim: int  # Per-Layer Embedding width per layer (256 on E2B/E4B, 0 = no PLE)
    ple_vocab_size: int
    num_experts: int  # 0 = no mixture of experts
    top_k_experts: int
    moe_intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    pad_token_id: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    bidirectional: str | None  # "vision": image tokens attend to each other (26B/31B)
    layers: tuple[LayerSpec, ...] = field(repr=False)
    dtype: str = "bfloat16"  # dtype the checkpoint is stored in

    @property
    def first_shared_layer(self) -> int:
        return next((s.index for s in self.layers if s.kv_shared), self.num_layers)


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: dict | None  # vision_config as stored (the vision tower is built from it)
    audio: dict | None  # audio_config as stored (E2B / E4B only)
    token_ids: dict  # image/audio/video placeholder and boundary ids
    architecture: str  # Gemma4ForConditionalGeneration or Gemma4ForCausalLM


# Fields read below, plus the bookkeeping fields transformers writes that do not change the model.
_TEXT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "per_layer_config",
    "hidden_activation", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "sliding_window",
    "layer_types", "final_logit_softcapping", "use_bidirectional_attention", "vocab_size_per_layer_input",
    "hidden_size_per_layer_input", "attention_k_eq_v", "num_kv_shared_layers", "enable_moe_block",
    "use_double_wide_mlp", "num_experts", "top_k_experts", "moe_intermediate_size", "attention_bias",
    "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype",
}
_IGNORED_FIELDS = {
    "model_type", "architectures", "attention_dropout", "initializer_range", "use_cache", "transformers_version",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "tokenizer_class", "_attn_implementation",
    "keys_to_ignore_at_inference", "output_router_logits", "router_aux_loss_coef",
    "quantization_config",  # read by weights.load
}
_TOKEN_FIELDS = ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id",
                 "eoa_token_index", "eoa_token_id", "audio_token_id")


def _fail(msg: str):
    raise ConfigError(f"config.json: {msg}")


def _rope(params: dict, layer_type: str) -> tuple[float, float]:
    p = params.get(layer_type)
    if not isinstance(p, dict) or "rope_theta" not in p:
        _fail(f"rope_parameters[{layer_type!r}] must give rope_theta, got {p!r}")
    kind = p.get("rope_type", "default")
    if kind == "default":
        return float(p["rope_theta"]), 1.0
    if kind == "proportional":
        if p.get("factor", 1.0) != 1.0:
            _fail(f"rope_parameters[{layer_type!r}]: scaled proportional RoPE (factor) is not supported")
        return float(p["rope_theta"]), float(p.get("partial_rotary_factor", 1.0))
    _fail(f"rope_parameters[{layer_type!r}]: unsupported rope_type {kind!r}")


def parse_text_config(tc: dict, dtype: str | None = None) -> TextConfig:
    # Keys starting with "_" are bookkeeping (transformers' `_name_or_path`, tools' provenance notes).
    unknown = sorted(k for k in set(tc) - _TEXT_FIELDS - _IGNORED_FIELDS if not k.startswith("_"))
    if unknown:
        _fail(f"unknown text_config field(s) {unknown}; this Gemma 4 implementation does not know what they change")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if not isinstance(tc.get(key), int) or tc[key] <= 0:
            _fail(f"text_config.{key} must be a positive integer, got {tc.get(key)!r}")
    if tc.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        _fail(f"hidden_activation {tc['hidden_activation']!r} is not Gemma 4's gelu_pytorch_tanh")
    if tc.get("attention_bias"):
        _fail("attention_bias=true is not a Gemma 4 configuration")

    n = tc["num_hidden_layers"]
    types = tc.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        _fail(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    if set(types) - {"sliding_attention", "full_attention"}:
        _fail(f"unknown layer type(s) {sorted(set(types) - {'sliding_attention', 'full_attention'})}")
    if types[-1] != "full_attention":
        _fail("the last layer must be full_attention (transformers forces it; a checkpoint saying otherwise is broken)")

    heads, kv_heads = tc["num_attention_heads"], tc["num_key_value_heads"]
    head_dim = tc.get("head_dim", 256)
    k_eq_v = bool(tc.get("attention_k_eq_v", False))
    # Per-layer head dim / KV heads, from either layout.
    overrides: dict[int, dict] = {}
    if "per_layer_config" in tc:
        if "global_head_dim" in tc or "num_global_key_value_heads" in tc:
            _fail("both per_layer_config and global_head_dim/num_global_key_value_heads are set")
        for key, ov in (tc["per_layer_config"] or {}).items():
            if not str(key).isdigit() or int(key) >= n:
                _fail(f"per_layer_config key {key!r} is not a layer index below {n}")
            if not isinstance(ov, dict) or set(ov) - {"head_dim", "num_key_value_heads"}:
                _fail(f"per_layer_config[{key}] may only set head_dim / num_key_value_heads, got {ov!r}")
            overrides[int(key)] = ov
    else:
        global_ov = {"head_dim": tc.get("global_head_dim", 512)}
        # transformers applies num_global_key_value_heads only together with K=V, as Google's JAX code does.
        if k_eq_v and tc.get("num_global_key_value_heads") is not None:
            global_ov["num_key_value_heads"] = tc["num_global_key_value_heads"]
        overrides = {i: global_ov for i, t in enumerate(types) if t == "full_attention"}

    num_shared = tc.get("num_kv_shared_layers", 0) or 0
    first_shared = n - num_shared
    if not 0 <= num_shared < n:
        _fail(f"num_kv_shared_layers={num_shared} must be in [0, num_hidden_layers={n})")
    # A KV-shared layer reuses the K/V of the last non-shared layer of its own attention type.
    donors = {}
    for i in range(first_shared):
        donors[types[i]] = i
    if num_shared and set(types[first_shared:]) - set(donors):
        _fail("KV-shared layers need a non-shared layer of each attention type before them")

    moe = bool(tc.get("enable_moe_block", False))
    if moe:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not isinstance(tc.get(key), int) or tc[key] <= 0:
                _fail(f"enable_moe_block needs a positive integer {key}, got {tc.get(key)!r}")
        if tc["top_k_experts"] > tc["num_experts"]:
            _fail(f"top_k_experts={tc['top_k_experts']} exceeds num_experts={tc['num_experts']}")
    rope = tc.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }

    layers = []
    for i, t in enumerate(types):
        sliding = t == "sliding_attention"
        ov = overrides.get(i, {})
        hd, kvh = ov.get("head_dim", head_dim), ov.get("num_key_value_heads", kv_heads)
        if not isinstance(hd, int) or hd <= 0 or hd % 2:
            _fail(f"layer {i}: head_dim must be a positive even integer, got {hd!r}")
        if not isinstance(kvh, int) or kvh <= 0 or heads % kvh:
            _fail(f"layer {i}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kvh!r}")
        shared = i >= first_shared
        theta, fraction = _rope(rope, t)
        layers.append(LayerSpec(
            index=i, sliding=sliding, head_dim=hd, num_kv_heads=kvh, k_eq_v=k_eq_v and not sliding,
            kv_source=donors[t] if shared else i,
            intermediate_size=tc["intermediate_size"] * (2 if shared and tc.get("use_double_wide_mlp") else 1),
            moe=moe, rope_theta=theta, rope_fraction=fraction))
    for s in layers:
        donor = layers[s.kv_source]
        if (s.head_dim, s.num_kv_heads) != (donor.head_dim, donor.num_kv_heads):
            _fail(f"KV-shared layer {s.index} and its donor layer {donor.index} differ in head_dim / KV heads")

    eos = tc.get("eos_token_id", 1)
    return TextConfig(
        vocab_size=tc.get("vocab_size", 262_144), hidden_size=tc["hidden_size"], num_layers=n, num_heads=heads,
        sliding_window=tc.get("sliding_window", 512), rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        final_logit_softcap=tc.get("final_logit_softcapping"),
        ple_dim=tc.get("hidden_size_per_layer_input", 256) or 0,
        ple_vocab_size=tc.get("vocab_size_per_layer_input", 262_144),
        num_experts=tc["num_experts"] if moe else 0, top_k_experts=tc["top_k_experts"] if moe else 0,
        moe_intermediate_size=tc["moe_intermediate_size"] if moe else 0,
        max_position_embeddings=tc.get("max_position_embeddings", 131_072),
        tie_word_embeddings=tc.get("tie_word_embeddings", True), pad_token_id=tc.get("pad_token_id", 0) or 0,
        bos_token_id=tc.get("bos_token_id", 2), eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        bidirectional=tc.get("use_bidirectional_attention"), layers=tuple(layers),
        dtype=dtype or tc.get("dtype") or tc.get("torch_dtype") or "bfloat16")


def parse_config(cfg: dict) -> ModelConfig:
    """Parse a whole config.json (multimodal `gemma4` or text-only `gemma4_text`)."""
    if not isinstance(cfg, dict):
        _fail(f"expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type == "gemma4":
        if not isinstance(cfg.get("text_config"), dict):
            _fail("a gemma4 config needs a text_config object")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        text = parse_text_config(cfg["text_config"], cfg["text_config"].get("dtype") or dtype)
        tokens = {k: cfg[k] for k in _TOKEN_FIELDS if cfg.get(k) is not None}
        return ModelConfig(text, cfg.get("vision_config"), cfg.get("audio_config"), tokens,
                           "Gemma4ForConditionalGeneration")
    if model_type == "gemma4_text":
        return ModelConfig(parse_text_config(cfg), None, None, {}, "Gemma4ForCausalLM")
    _fail(f"model_type {model_type!r} is not a Gemma 4 model (expected 'gemma4' or 'gemma4_text')")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read config.json from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    return parse_config(cfg)
