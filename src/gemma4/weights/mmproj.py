"""The vision and audio towers as llama.cpp keeps them: an `mmproj` GGUF beside the model's GGUF.

The layout is llama.cpp's converter's (`convert_hf_to_gguf.py --mmproj`, conversion/gemma.py
`Gemma4VisionAudioModel`): architecture `clip`, `clip.vision.*` / `clip.audio.*` metadata, tensors `v.*`
(vision), `a.*` (audio) and `mm.*` (the projections into the text width). What the converter changes and this
file undoes: scalar clip bounds stored as 1-element tensors, the audio `per_dim_scale` stored after its softplus,
the depthwise convolution without its middle axis, and the patch embedding as a [E, 3, p, p] convolution kernel
(ours is a linear over p x p x 3 pixel values).

The metadata lacks a few of our config fields: the head width (from `attn_q_norm`), the KV heads (from `attn_k`),
the position table size, the audio convolution widths and output width (from their tensors), whether linears
clip (stored bounds) and whether the vision output is standardised (`v.std_bias`). The rest are Gemma 4's
defaults (every published config uses them). The media token ids come from the model's vocabulary.
"""
from __future__ import annotations

import os

import gguf
import numpy as np
import torch

from .gguf import (
    DIRECT,
    EXPORT_TYPES,
    FLOATS,
    GGML,
    GGUFError,
    _drop_pages,
    float_tensor,
    read_header,
)

ARCH = "clip"
BOUNDS = ("input_max", "input_min", "output_max", "output_min")
# Chat-template markers -> config.json token-id fields (a GGUF has no config.json: the ids are the vocabulary's).
MEDIA_TOKENS = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
                "audio_token_id": "<|audio|>"}


def _clipped(pairs: dict) -> dict:
    """ClippedLinear modules: the weight under `.linear`, the four clip bounds beside it (where the config clips)."""
    out = {}
    for ours, theirs in pairs.items():
        out[f"{ours}.linear.weight"] = f"{theirs}.weight"
        out.update({f"{ours}.{b}": f"{theirs}.{b}" for b in BOUNDS})
    return out


# ours (below vision_tower.encoder.layers.N. / audio_tower.layers.N.) -> the file's (below v.blk.N. / a.blk.N.)
_VISION_LAYER = {
    "input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "attn_post_norm.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight", "post_feedforward_layernorm.weight": "ffn_post_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    **_clipped({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}),
}
_AUDIO_LAYER = {
    "feed_forward1.pre_layer_norm.weight": "ffn_norm.weight",
    "feed_forward1.post_layer_norm.weight": "ffn_post_norm.weight",
    "feed_forward2.pre_layer_norm.weight": "ffn_norm_1.weight",
    "feed_forward2.post_layer_norm.weight": "ffn_post_norm_1.weight",
    "lconv1d.pre_layer_norm.weight": "conv_norm.weight", "lconv1d.conv_norm.weight": "norm_conv.weight",
    "lconv1d.depthwise_conv1d.weight": "conv_dw.weight", "norm_pre_attn.weight": "attn_pre_norm.weight",
    "norm_post_attn.weight": "attn_post_norm.weight", "norm_out.weight": "ln2.weight",
    "self_attn.relative_k_proj.weight": "attn_k_rel.weight", "self_attn.per_dim_scale": "per_dim_scale.weight",
    **_clipped({"feed_forward1.ffw_layer_1": "ffn_up", "feed_forward1.ffw_layer_2": "ffn_down",
                "feed_forward2.ffw_layer_1": "ffn_up_1", "feed_forward2.ffw_layer_2": "ffn_down_1",
                "lconv1d.linear_start": "conv_pw1", "lconv1d.linear_end": "conv_pw2", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.post": "attn_out"}),
}
_GLOBAL = {
    "vision_tower.patch_embedder.input_proj.weight": "v.patch_embd.weight",
    "vision_tower.patch_embedder.position_embedding_table": "v.position_embd.weight",
    "vision_tower.std_bias": "v.std_bias", "vision_tower.std_scale": "v.std_scale",
    "embed_vision.embedding_projection.weight": "mm.input_projection.weight",
    "audio_tower.subsample_conv_projection.layer0.conv.weight": "a.conv1d.0.weight",
    "audio_tower.subsample_conv_projection.layer0.norm.weight": "a.conv1d.0.norm.weight",
    "audio_tower.subsample_conv_projection.layer1.conv.weight": "a.conv1d.1.weight",
    "audio_tower.subsample_conv_projection.layer1.norm.weight": "a.conv1d.1.norm.weight",
    "audio_tower.subsample_conv_projection.input_proj_linear.weight": "a.input_projection.weight",
    "audio_tower.output_proj.weight": "a.pre_encode.out.weight",
    "audio_tower.output_proj.bias": "a.pre_encode.out.bias",
    "embed_audio.embedding_projection.weight": "mm.a.input_projection.weight",
}
_LAYER_PREFIX = {"vision_tower.encoder.layers.": ("v.blk.", _VISION_LAYER),
                 "audio_tower.layers.": ("a.blk.", _AUDIO_LAYER)}


def file_name(ours: str) -> str:
    """Our tower parameter name -> the mmproj tensor name."""
    if ours in _GLOBAL:
        return _GLOBAL[ours]
    for prefix, (theirs, table) in _LAYER_PREFIX.items():
        if ours.startswith(prefix):
            layer, _, rest = ours[len(prefix):].partition(".")
            if rest in table:
                return f"{theirs}{layer}.{table[rest]}"
    raise KeyError(ours)


def our_names(layers: dict) -> dict:
    """{file tensor name: our name} for towers of these depths ({"vision": layers, "audio": layers})."""
    out = {v: k for k, v in _GLOBAL.items()}
    for prefix, (theirs, table) in _LAYER_PREFIX.items():
        for i in range(layers.get(prefix.split("_")[0], 0)):
            out.update({f"{theirs}{i}.{t}": f"{prefix}{i}.{o}" for o, t in table.items()})
    return out


# ---- the converter's tensor changes, both ways --------------------------------------------------------------

def to_file(ours: str, t: torch.Tensor) -> torch.Tensor:
    """Our tensor -> the array the converter writes for it (float; the caller picks the type)."""
    if t.dim() == 0:
        return t.reshape(1)
    if ours.endswith("per_dim_scale"):
        return torch.nn.functional.softplus(t.float())
    if ours.endswith("depthwise_conv1d.weight"):  # [C, 1, K] -> [C, K]
        return t.reshape(t.shape[0], t.shape[2])
    if ours.endswith("patch_embedder.input_proj.weight"):  # [E, p*p*3] (pixels row-major, RGB last) -> [E, 3, p, p]
        p = int((t.shape[1] // 3) ** 0.5)
        return t.reshape(t.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()
    return t


def from_file(ours: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The file's tensor (float, its own shape) -> ours of `shape`."""
    if ours.endswith("per_dim_scale"):  # softplus^-1(y) = y + log(1 - exp(-y)), exact for large y too
        y = t.float()
        return (y + torch.log(-torch.expm1(-y))).reshape(shape)
    if ours.endswith("patch_embedder.input_proj.weight"):
        return t.permute(0, 2, 3, 1).reshape(shape)
    return t.reshape(shape)


# ---- reading ------------------------------------------------------------------------------------------------

class MmprojFile:
    """An opened mmproj GGUF: its towers' configs (transformers' vision_config / audio_config) and tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.fields, tensors = read_header(self.path)
        except GGUFError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in tensors}
        arch, kind = self.fields.get("general.architecture"), self.fields.get("general.type")
        if arch != ARCH or kind not in (None, "mmproj"):
            raise GGUFError(f"{self.path}: not an mmproj file (architecture {arch!r}, type {kind!r}); the model's "
                            f"vision / audio towers come as an mmproj GGUF")
        for tower, projector in (("vision", "gemma4v"), ("audio", "gemma4a")):
            found = self.fields.get(f"clip.{tower}.projector_type", self.fields.get("clip.projector_type"))
            if self.fields.get(f"clip.has_{tower}_encoder") and found != projector:
                raise GGUFError(f"{self.path}: a {tower} tower of projector type {found!r}, not Gemma 4's "
                                f"({projector!r})")
        self.vision = self._vision_config() if self.fields.get("clip.has_vision_encoder") else None
        self.audio = self._audio_config() if self.fields.get("clip.has_audio_encoder") else None
        if self.vision is None and self.audio is None:
            raise GGUFError(f"{self.path}: an mmproj file with neither a vision nor an audio tower")

    def _get(self, key):
        if key not in self.fields:
            raise GGUFError(f"{self.path}: metadata {key} is missing")
        return self.fields[key]

    def _shape(self, name) -> tuple:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def _vision_config(self) -> dict:
        mean, std = self.fields.get("clip.vision.image_mean"), self.fields.get("clip.vision.image_std")
        if (mean is not None and any(mean)) or (std is not None and any(s != 1 for s in std)):
            raise GGUFError(f"{self.path}: image mean {mean} / std {std} are not Gemma 4's (0 and 1: the tower "
                            f"scales pixels itself)")
        head_dim = self._shape("v.blk.0.attn_q_norm.weight")[0]
        return {"model_type": "gemma4_vision", "hidden_size": int(self._get("clip.vision.embedding_length")),
                "intermediate_size": int(self._get("clip.vision.feed_forward_length")),
                "num_hidden_layers": int(self._get("clip.vision.block_count")),
                "num_attention_heads": int(self._get("clip.vision.attention.head_count")),
                "num_key_value_heads": self._shape("v.blk.0.attn_k.weight")[0] // head_dim, "head_dim": head_dim,
                "patch_size": int(self._get("clip.vision.patch_size")),
                "position_embedding_size": self._shape("v.position_embd.weight")[1],
                "use_clipped_linears": "v.blk.0.attn_q.input_max" in self.tensors,
                "standardize": "v.std_bias" in self.tensors,
                "rms_norm_eps": _f32(self.fields.get("clip.vision.attention.layer_norm_epsilon", 1e-6))}

    def _audio_config(self) -> dict:
        return {"model_type": "gemma4_audio", "hidden_size": int(self._get("clip.audio.embedding_length")),
                "num_hidden_layers": int(self._get("clip.audio.block_count")),
                "num_attention_heads": int(self._get("clip.audio.attention.head_count")),
                "subsampling_conv_channels": [self._shape("a.conv1d.0.weight")[0],
                                              self._shape("a.conv1d.1.weight")[0]],
                "conv_kernel_size": self._shape("a.blk.0.conv_dw.weight")[1],
                "output_proj_dims": self._shape("a.pre_encode.out.weight")[0],
                "use_clipped_linears": "a.blk.0.attn_q.input_max" in self.tensors,
                "rms_norm_eps": _f32(self.fields.get("clip.audio.attention.layer_norm_epsilon", 1e-6))}

    def check_model(self, text_hidden: int, tokens: list[str]) -> dict:
        """That the towers project into this model's width; -> the media token ids from its vocabulary."""
        for tower in ("vision", "audio"):
            width = self.fields.get(f"clip.{tower}.projection_dim")
            if getattr(self, tower) is not None and width != text_hidden:
                raise GGUFError(f"{self.path}: its {tower} tower projects to width {width}, but the model's is "
                                f"{text_hidden}: this mmproj belongs to another model")
        index = {t: i for i, t in enumerate(tokens)}
        missing = [t for t in MEDIA_TOKENS.values() if t not in index]
        if missing:
            raise GGUFError(f"{self.path}: the model's vocabulary has no {', '.join(missing)}: it cannot take media")
        return {k: index[t] for k, t in MEDIA_TOKENS.items()}

    def state(self, model, dtype: torch.dtype, device) -> dict:
        """{our name: tensor} for every tower parameter and buffer `model` (built on meta) has."""
        wanted = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_tower.", "embed_vision.",
                                                                                 "audio_tower.", "embed_audio."))}
        layers = {"vision": (self.vision or {}).get("num_hidden_layers", 0),
                  "audio": (self.audio or {}).get("num_hidden_layers", 0)}
        names = our_names(layers)
        state = {}
        for name, t in self.tensors.items():
            ours = names.get(name)
            if ours is None or ours not in wanted:
                raise GGUFError(f"{self.path}: unexpected tensor {name!r} for Gemma 4's towers")
            if t.tensor_type not in FLOATS and t.tensor_type not in DIRECT and \
                    t.tensor_type not in getattr(gguf.quants, "_type_traits", {}):
                raise GGUFError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which gemma4 cannot read")
            shape = tuple(wanted[ours].shape)
            value = float_tensor(t, torch.float32)
            if value.numel() != int(np.prod(shape)):
                raise GGUFError(f"{self.path}: tensor {name} has shape {tuple(value.shape)}, the towers need {shape}")
            state[ours] = from_file(ours, value, shape).to(device=device, dtype=dtype)
            _drop_pages(t)
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise GGUFError(f"{self.path}: missing tensor(s) {[file_name(m) for m in missing[:8]]}")
        return state


def media_config(g, towers: MmprojFile):
    """The model GGUF's config with the mmproj's towers and the vocabulary's media token ids."""
    from ..config import parse_config
    from .gguf import gguf_text_config

    tc = gguf_text_config(g)
    if not tc["hidden_size_per_layer_input"]:  # 26B / 31B: image tokens see each other (E2B / E4B: causal), the
        tc["use_bidirectional_attention"] = "vision"  # rule llama.cpp applies (mtmd_decode_use_non_causal)
    tokens = g.field("tokenizer.ggml.tokens")
    if tokens is None:  # no vocabulary in the file: the model runs with the built-in one (Gemma 4's)
        from ..tokenizer import load_tokenizer

        vocab = load_tokenizer(None).backend.get_vocab(with_added_tokens=True)
        tokens = sorted(vocab, key=vocab.get)
    ids = towers.check_model(tc["hidden_size"], tokens)
    return parse_config({"model_type": "gemma4", "text_config": tc, "vision_config": towers.vision,
                         "audio_config": towers.audio, **ids})


def _f32(v: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.999999974752427e-07)."""
    return float(f"{v:.7g}")


def find_mmproj(model_file: str) -> str | None:
    """The mmproj GGUF beside a model GGUF (llama.cpp and LM Studio keep `mmproj-*.gguf` in the model's folder)."""
    folder = os.path.dirname(os.path.abspath(model_file))
    found = sorted(n for n in os.listdir(folder) if n.startswith("mmproj") and n.endswith(".gguf"))
    if len(found) > 1:
        raise GGUFError(f"{folder} holds several mmproj files ({', '.join(found)}); give one with --mmproj")
    return os.path.join(folder, found[0]) if found else None


# ---- writing ------------------------------------------------------------------------------------------------

def _export_type(ours: str, name: str, dims: int, kind: GGML) -> GGML:
    """The converter's choice (MmprojModel / Gemma4VisionAudioModel.tensor_force_quant, then prepare_tensors):
    F32 for 1-D tensors, norms, clip bounds, the position table and the audio convolutions; the patch kernel F16
    in an f16 file, else F32; F16 where a quantized type does not divide the rows into blocks."""
    if dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name == "v.position_embd.weight":
        return GGML.F32
    hf = "model." + ours
    if "audio_tower" in hf and (".conv" in hf or "_conv" in hf):
        return GGML.F32
    if name == "v.patch_embd.weight":
        return GGML.F16 if kind == GGML.F16 else GGML.F32
    return kind


def export_mmproj(model, out: str, kind: str = "f16", model_dir: str | None = None, name: str | None = None) -> None:
    """Write the model's vision / audio towers as the mmproj GGUF llama.cpp's converter writes (`--mmproj`).
    `kind`: f32, f16, bf16 or q8_0 (the converter's types; q4_0 writes f16, as Q4_0 models ship their towers)."""
    from pathlib import Path

    from .gguf import _tensor_bytes

    if kind not in EXPORT_TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(EXPORT_TYPES)}, got {kind!r}")
    if not (hasattr(model, "vision_tower") or hasattr(model, "audio_tower")):
        raise ValueError("this model has no vision or audio tower to write (load it with its towers)")
    ggml_kind, file_type = EXPORT_TYPES["f16" if kind == "q4_0" else kind]
    tmp = out + ".partial"
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        plan = []
        for ours, t in model.state_dict().items():
            if not ours.startswith(("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")):
                continue
            gname, value = file_name(ours), to_file(ours, t.detach().float().cpu())
            t_kind = _export_type(ours, gname, value.dim(), ggml_kind)
            if t_kind in DIRECT and value.shape[-1] % 32:
                t_kind = GGML.F16
            data = _tensor_bytes(value, t_kind)
            plan.append(data)
            w.add_tensor_info(gname, data.shape if t_kind in (GGML.F32, GGML.F16) else
                              gguf.quant_shape_to_byte_shape(tuple(value.shape), t_kind), data.dtype, data.nbytes,
                              raw_dtype=None if t_kind in (GGML.F32, GGML.F16) else t_kind)
        total, shared, expert, _ = w.get_total_parameter_count()
        meta = gguf.Metadata.load(None, Path(model_dir) if model_dir else None, name, total)
        if meta.name is None:
            meta.name = "Gemma 4"
        meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, 0)
        w.add_type(gguf.GGUFType.MMPROJ)
        meta.set_gguf_meta_model(w)
        _write_metadata(w, model, file_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in plan:
            w.write_tensor_data(data)
        w.close()
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out)


def _write_metadata(w, model, file_type) -> None:
    """The converter's keys (MmprojModel.set_gguf_parameters, Gemma4VisionAudioModel.set_gguf_parameters)."""
    width = model.config.text.hidden_size
    w.add_file_type(file_type)
    if hasattr(model, "vision_tower"):
        s = model.vision_tower.settings
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(width)
        w.add_vision_image_size(224)  # unused by Gemma 4 (images keep their aspect ratio); the converter's value
        w.add_vision_patch_size(s["patch_size"])
        w.add_vision_embedding_length(s["hidden_size"])
        w.add_vision_feed_forward_length(s["intermediate_size"])
        w.add_vision_block_count(s["num_hidden_layers"])
        w.add_vision_head_count(s["num_attention_heads"])
        w.add_vision_image_mean([0.0, 0.0, 0.0])
        w.add_vision_image_std([1.0, 1.0, 1.0])
    if hasattr(model, "audio_tower"):
        s = model.audio_tower.settings
        w.add_clip_has_audio_encoder(True)
        w.add_audio_projection_dim(width)
        w.add_audio_embedding_length(s["hidden_size"])
        w.add_audio_feed_forward_length(s["hidden_size"] * 4)
        w.add_audio_block_count(s["num_hidden_layers"])
        w.add_audio_head_count(s["num_attention_heads"])
    if hasattr(model, "vision_tower"):
        w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
        w.add_vision_attention_layernorm_eps(model.vision_tower.settings["rms_norm_eps"])
    if hasattr(model, "audio_tower"):
        from ..model.audio import MEL_BINS

        w.add_clip_audio_projector_type(gguf.VisionProjectorType.GEMMA4A)
        w.add_audio_num_mel_bins(MEL_BINS)
        w.add_audio_attention_layernorm_eps(model.audio_tower.settings["rms_norm_eps"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
