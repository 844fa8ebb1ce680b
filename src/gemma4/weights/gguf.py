"""GGUF files (llama.cpp, Ollama, LM Studio): read the Gemma 4 text model from one, and write one.

The layout is llama.cpp's (`convert_hf_to_gguf.py`, `conversion/gemma.py`: `Gemma4Model`), read and written with
the `gguf` package. What the file says and what it means here:
- metadata `gemma4.*` -> a transformers-style text config (`gguf_text_config`): per-layer `head_count_kv` and
  `feed_forward_length` arrays, `sliding_window_pattern`, `key_length` (global) / `key_length_swa`, the two RoPE
  bases, `shared_kv_layers`, PLE width, experts; a global layer without `attn_v` is K=V; the `rope_freqs` tensor
  (1 on rotated pairs, 1e30 on the rest) gives the share of global head dims that proportional RoPE rotates.
- tensors -> our modules (`_GLOBAL`, `_LAYER`); norms are stored as the model uses them (no +1 shift in Gemma 4).
- Q4_0 and Q8_0 are our int4 / int8 format with group 32 (the same nibble order and fp16 scales): their bytes are
  split into weights and scales, no float round trip. Other quantized types (K-quants, ...) are dequantized with
  `gguf.quants` to the model dtype, or quantized to our int4/int8 when `quantize=` asks.
- The PLE table stays in the file, read a row per token (`FileRows`), whatever its type.
"""
from __future__ import annotations

import mmap as mmap_module
import os
import re
from struct import error as struct_error

import gguf
import numpy as np
import torch
from torch import nn

from .. import kernels
from ..config import parse_config

GGML = gguf.GGMLQuantizationType
ARCH = "gemma4"
# Our int4 / int8 formats are Q4_0 / Q8_0 at group size 32.
DIRECT = {GGML.Q4_0: 4, GGML.Q8_0: 8}
FLOATS = {GGML.F32: torch.float32, GGML.F16: torch.float16, GGML.BF16: torch.bfloat16}
# `gemma4 export --type` -> (tensor type, general.file_type)
EXPORT_TYPES = {"f32": (GGML.F32, gguf.LlamaFileType.ALL_F32), "f16": (GGML.F16, gguf.LlamaFileType.MOSTLY_F16),
                "bf16": (GGML.BF16, gguf.LlamaFileType.MOSTLY_BF16),
                "q8_0": (GGML.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
                "q4_0": (GGML.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}

_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
           "per_layer_model_proj.weight": "per_layer_model_projection.weight",
           "per_layer_proj_norm.weight": "per_layer_projection_norm.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "layer_output_scale.weight": "layer_scalar",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "inp_gate.weight": "per_layer_input_gate.weight", "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    # 26B-A4B: router, experts (gate and up fused, as transformers stores them) and the MoE block's norms
    "ffn_gate_inp.weight": "router.proj.weight", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale", "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj", "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
}
_OURS = {v: k for k, v in _LAYER.items()}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(ValueError):
    """A GGUF file we cannot run: not GGUF, truncated, another architecture, an unsupported tensor type."""


def find_gguf(path: str | os.PathLike) -> str | None:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") or _has_magic(path) else None
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        models = sorted(n for n in os.listdir(path) if n.endswith(".gguf") and not n.startswith("mmproj"))
        if len(models) > 1:
            raise GGUFError(f"{path} holds several GGUF models ({', '.join(models)}); give the file")
        return os.path.join(path, models[0]) if models else None
    return None


def _has_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---- the file's header -----------------------------------------------------------------------------------------
# gguf.GGUFReader builds a numpy view per array item: 25 s for the 777k strings of Gemma 4's vocabulary and merges,
# on every load. This reads the same header (GGUF v2/v3, the gguf package's value types) in ~0.5 s; tests check it
# against GGUFReader.

_SCALARS = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
            gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
            gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
            gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d"}


class TensorInfo:
    """One tensor of the file, as gguf.ReaderTensor describes it: `shape` in ggml order (columns first), `data` a
    memory-mapped numpy view in numpy order (bytes per row for quantized types)."""

    def __init__(self, name, shape, tensor_type, data_offset, n_bytes, data):
        self.name, self.shape, self.tensor_type = name, shape, tensor_type
        self.data_offset, self.n_bytes, self.data = data_offset, n_bytes, data


def read_header(path: str) -> tuple[dict, list[TensorInfo]]:
    """(metadata {key: value}, tensors) of a GGUF file; the tensor data stays in a copy-on-write memory map."""
    import mmap
    import struct

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(kind):
        nonlocal pos
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return string()
        if kind == gguf.GGUFValueType.ARRAY:
            item, n = gguf.GGUFValueType(take("<I")), take("<Q")
            if item in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[item]
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", buf, pos))
                pos += n * struct.calcsize(fmt)
                return out
            return [value(item) for _ in range(n)]
        return take(_SCALARS[kind])

    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    start = -(-pos // align) * align
    tensors = []
    for name, dims, raw_type, offset in infos:
        kind = GGML(raw_type)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims))
        shape = tuple(reversed(dims))
        np_type = {GGML.F32: np.float32, GGML.F16: np.float16}.get(kind)
        if np_type is None:
            np_type, shape = np.uint8, tuple(gguf.quant_shape_to_byte_shape(shape, kind))
        n_bytes = n * size // block
        begin = start + offset
        if begin + n_bytes > len(buf):
            raise GGUFError(f"{path}: truncated ({len(buf)} bytes; tensor {name} needs {begin + n_bytes})")
        data = np.frombuffer(buf, dtype=np_type, count=n_bytes // np.dtype(np_type).itemsize, offset=begin)
        tensors.append(TensorInfo(name, np.array(dims), kind, begin, n_bytes, data.reshape(shape)))
        tensors[-1].map = buf
    return fields, tensors


class GGUFModel:
    """An opened GGUF model file: its metadata as our config, its tensors by our names, its tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.fields, tensors = read_header(self.path)
        except (ValueError, OSError, struct_error, UnicodeDecodeError) as e:
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); a truncated or "
                            f"corrupt download?") from None
        arch = self.field("general.architecture")
        if arch != ARCH:
            raise GGUFError(f"{self.path}: a GGUF of architecture {arch!r}, not Gemma 4 ({ARCH!r})")
        self.tensors = {t.name: t for t in tensors}
        self.config = parse_config(gguf_text_config(self))

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def our_tensors(self):
        """(our parameter name, ReaderTensor) for each tensor of the text model; rope_freqs is config only."""
        for name, t in self.tensors.items():
            if name == "rope_freqs.weight":
                continue
            m = _BLOCK.fullmatch(name)
            ours = _GLOBAL.get(name) if m is None else _LAYER.get(m.group(2))
            if ours is None:
                raise GGUFError(f"{self.path}: unexpected tensor {name!r} for a Gemma 4 text model")
            yield ("language_model." + ours if m is None else f"language_model.layers.{m.group(1)}.{ours}"), t


def gguf_text_config(g: GGUFModel) -> dict:
    """The file's `gemma4.*` metadata (and tensor shapes where the metadata is silent) -> a `gemma4_text`
    config.json, in transformers' per_layer_config layout (every global layer's head dim and KV heads)."""
    def get(key, default=KeyError):
        v = g.field(f"{ARCH}.{key}")
        if v is None:
            if default is KeyError:
                raise GGUFError(f"{g.path}: metadata {ARCH}.{key} is missing")
            return default
        return v

    n = int(get("block_count"))
    pattern = get("attention.sliding_window_pattern", None)
    if not isinstance(pattern, list) or len(pattern) != n:
        raise GGUFError(f"{g.path}: {ARCH}.attention.sliding_window_pattern must list {n} layers, got {pattern!r}")
    types = ["sliding_attention" if s else "full_attention" for s in pattern]
    per_layer = lambda v: list(v) if isinstance(v, list) else [v] * n
    ff, kv = per_layer(get("feed_forward_length")), per_layer(get("attention.head_count_kv"))
    heads = get("attention.head_count")
    shared = int(get("attention.shared_kv_layers", 0))
    first_shared = n - shared
    double = any(ff[i] != ff[0] for i in range(n))
    if any(ff[i] != ff[0] * (2 if double and i >= first_shared else 1) for i in range(n)):
        raise GGUFError(f"{g.path}: feed_forward_length {ff} is not Gemma 4's (one width, doubled on KV-shared "
                        f"layers at most)")
    swa_dim, full_dim = get("attention.key_length_swa"), get("attention.key_length")
    sliding_kv = {kv[i] for i in range(n) if pattern[i]}
    if len(sliding_kv) != 1:
        raise GGUFError(f"{g.path}: sliding layers with different KV head counts {sorted(sliding_kv)}")
    first_full = types.index("full_attention") if "full_attention" in types else None
    # K=V: a global layer without attn_v (KV-shared layers have no K/V of their own: look at a donor)
    k_eq_v = first_full is not None and first_full < first_shared and \
        f"blk.{first_full}.attn_k.weight" in g.tensors and f"blk.{first_full}.attn_v.weight" not in g.tensors
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10_000.0))},
            "full_attention": {"rope_type": "proportional", "rope_theta": float(get("rope.freq_base")),
                               "partial_rotary_factor": _rotated_share(g, full_dim)}}
    if get("rope.dimension_count_swa", swa_dim) != swa_dim:
        raise GGUFError(f"{g.path}: partial RoPE on sliding layers is not Gemma 4's")
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{g.path}: no token_embd.weight")
    ple = int(get("embedding_length_per_layer_input", 0))
    tc = {
        "model_type": "gemma4_text", "vocab_size": int(embd.shape[1]), "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(ff[0]), "num_hidden_layers": n, "num_attention_heads": int(heads),
        "num_key_value_heads": sliding_kv.pop(), "head_dim": int(swa_dim), "layer_types": types,
        "per_layer_config": {str(i): {"head_dim": int(full_dim), "num_key_value_heads": int(kv[i])}
                             for i in range(n) if not pattern[i]},
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "sliding_window": int(get("attention.sliding_window")), "rope_parameters": rope,
        "final_logit_softcapping": get("final_logit_softcapping", None),
        "hidden_size_per_layer_input": ple, "attention_k_eq_v": k_eq_v, "num_kv_shared_layers": shared,
        "use_double_wide_mlp": double, "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": g.field("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": g.field("tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": g.field("tokenizer.ggml.padding_token_id", 0),
        "dtype": _stored_dtype(g),
    }
    if ple:
        tc["vocab_size_per_layer_input"] = int(g.tensors["per_layer_token_embd.weight"].shape[1])
    experts = int(get("expert_count", 0))
    if experts:
        tc.update(enable_moe_block=True, num_experts=experts, top_k_experts=int(get("expert_used_count")),
                  moe_intermediate_size=int(get("expert_feed_forward_length")))
    return tc


def _rotated_share(g: GGUFModel, head_dim: int) -> float:
    """Proportional RoPE: `rope_freqs` holds 1 for each rotated pair of a global head and 1e30 (no rotation) for
    the rest; without it, rope.dimension_count / key_length."""
    t = g.tensors.get("rope_freqs.weight")
    if t is None:
        return g.field(f"{ARCH}.rope.dimension_count", head_dim) / head_dim
    f = np.asarray(t.data, dtype=np.float32)
    ones = int((f == 1.0).sum())
    if len(f) != head_dim // 2 or ones + int((f >= 1e29).sum()) != len(f) or (f[:ones] != 1.0).any():
        raise GGUFError(f"{g.path}: rope_freqs is not Gemma 4's proportional RoPE (scaled RoPE is not supported)")
    return 2 * ones / head_dim


def _stored_dtype(g: GGUFModel) -> str:
    kinds = {t.tensor_type for t in g.tensors.values() if len(t.shape) > 1}
    return "float32" if kinds == {GGML.F32} else "float16" if kinds == {GGML.F16} else "bfloat16"


# ---- reading tensors ------------------------------------------------------------------------------------------

def split_blocks(t, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q8_0 tensor [..., N, K] (a file's TensorInfo, or its raw bytes [..., N, blocks * block bytes]) ->
    our (qweight [..., N, K/2 uint8 | K int8], scales fp16 [..., N, K/32]). A Q4_0 block is fp16 d + 16 bytes (low
    nibble: weight j, high: j + 16, stored + 8); a Q8_0 block fp16 d + 32 int8: our layout, scales moved out."""
    raw = t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t.data))
    size = 18 if bits == 4 else 34
    blocks = raw.view(*raw.shape[:-1], raw.shape[-1] // size, size)
    scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    q = blocks[..., 2:].contiguous().reshape(*raw.shape[:-1], -1)
    return (q if bits == 4 else q.view(torch.int8)), scales


def float_tensor(t, dtype: torch.dtype) -> torch.Tensor:
    """Any tensor of the file as a float torch tensor (its own shape, in our [rows, columns] order)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type in (GGML.F32, GGML.F16):
        out = torch.from_numpy(np.asarray(t.data)).view(shape)
    elif t.tensor_type == GGML.BF16:
        out = torch.from_numpy(np.asarray(t.data)).view(torch.bfloat16).view(shape)
    elif t.tensor_type in DIRECT:
        bits = DIRECT[t.tensor_type]
        q, s = split_blocks(t, bits)
        out = kernels.dequantize(q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1]), bits, 32).view(shape)
    else:
        try:
            out = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).view(shape)
        except NotImplementedError:
            raise GGUFError(f"tensor {t.name}: type {t.tensor_type.name} is not supported") from None
    return out.to(dtype)


class QuantizedRows:
    """Decode a row block of a quantized table read raw from the file (`FileRows`): [n, row bytes] -> [n, K]."""

    def __init__(self, tensor_type, width: int):
        self.type, self.width = tensor_type, width

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if self.type in DIRECT:
            return kernels.dequantize(*split_blocks(raw, DIRECT[self.type]), DIRECT[self.type], 32)
        return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), self.type)).view(len(raw), self.width)


def check_types(g: GGUFModel) -> None:
    readable = getattr(gguf.quants, "_type_traits", {})  # the types gguf.quants can dequantize
    for t in g.tensors.values():
        if t.tensor_type not in FLOATS and t.tensor_type not in DIRECT and t.tensor_type not in readable:
            raise GGUFError(f"{g.path}: tensor {t.name} has type {t.tensor_type.name}, which gemma4 cannot read "
                            f"(F32, F16, BF16, Q4_0, Q8_0 directly; K-quants and the rest through gguf.quants)")


def load_state(g: GGUFModel, model, dtype: torch.dtype, device: torch.device):
    """Read every text tensor into `model` (built on meta): float ones as `dtype`; Q4_0 / Q8_0 Linear weights,
    the tied embedding and expert banks swap their module for our quantized one; the PLE table is read by row
    from the file. Returns ({name: tensor} to load, FileRows of the PLE table or None, bits used or None)."""
    from ..model.text import Linear
    from ..quant import QuantizedBank, QuantizedEmbedding, QuantizedLinear
    from . import CheckpointError, FileRows

    check_types(g)
    wanted = model.state_dict()
    state, ple_rows, bits_used = {}, None, set()
    for name, t in g.our_tensors():
        module_name, _, attr = name.rpartition(".")
        shape = tuple(int(d) for d in reversed(t.shape))
        if name.endswith("embed_tokens_per_layer.weight"):
            if name not in wanted or shape != tuple(wanted[name].shape):
                raise CheckpointError(f"{g.path}: tensor {t.name} has shape {shape}, the config needs "
                                      f"{tuple(wanted[name].shape) if name in wanted else 'none'}")
            dt = FLOATS.get(t.tensor_type)
            raw = torch.from_numpy(np.asarray(t.data))
            if dt is not None:  # the table itself stays the parameter (mapped, never read whole)
                state[name] = raw.view(torch.uint8).view(dt).view(shape) if dt == torch.bfloat16 else raw.view(shape)
                ple_rows = FileRows(g.path, t.data_offset, shape, dt)
            else:
                state[name] = raw  # its bytes; lookups decode the rows they read
                ple_rows = FileRows(g.path, t.data_offset, shape, torch.float32, row_bytes=raw.shape[-1],
                                    decode=QuantizedRows(t.tensor_type, shape[1]))
            continue
        if name not in wanted:
            raise CheckpointError(f"{g.path}: unexpected tensor {t.name!r} for this config")
        if shape != tuple(wanted[name].shape):
            raise CheckpointError(f"{g.path}: tensor {t.name} has shape {shape}, the config needs "
                                  f"{tuple(wanted[name].shape)}")
        bits = DIRECT.get(t.tensor_type)
        module = model.get_submodule(module_name)
        if bits and attr == "weight" and (isinstance(module, Linear) or name.endswith("embed_tokens.weight")):
            kind = QuantizedEmbedding if name.endswith("embed_tokens.weight") else QuantizedLinear
            new = kind(shape[0], shape[1], bits, 32, dtype)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            new.qweight, new.scales = (x.to(device) for x in split_blocks(t, bits))
            bits_used.add(bits)
            _drop_pages(t)
            continue
        if bits and attr in ("gate_up_proj", "down_proj"):  # an expert bank [n, out, in]
            bank = QuantizedBank(*shape, bits, 32)
            delattr(module, attr)
            setattr(module, attr, bank)
            bank.qweight, bank.scales = (x.to(device) for x in split_blocks(t, bits))
            bits_used.add(bits)
            _drop_pages(t)
            continue
        state[name] = float_tensor(t, dtype).to(device)
        _drop_pages(t)

    missing = sorted(n for n in set(model.state_dict()) - set(state)
                     if n.startswith("language_model.") and not n.endswith((".qweight", ".scales")))
    if missing:
        raise CheckpointError(f"{g.path}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return state, ple_rows, max(bits_used) if bits_used else None


def _drop_pages(t) -> None:
    """Once a tensor is copied out, its pages of the file leave the RSS (the map would otherwise keep every page
    read while loading resident: E2B Q4_0's peak RSS 3.18 GB against our int4 checkpoint's 1.74). A tensor that
    is still a view of the map reads its pages back from the file."""
    if hasattr(mmap_module, "MADV_DONTNEED"):
        start = t.data_offset - t.data_offset % mmap_module.PAGESIZE
        t.map.madvise(mmap_module.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


def load_gguf(path: str, dtype=None, device=None, quantize=None, group_size: int = kernels.DEFAULT_GROUP_SIZE,
              media: bool | None = None, mmproj: str | None = None):
    """A GGUF model file -> `Gemma4` in eval mode; see `weights.load` for dtype / quantize. The vision / audio
    towers come from `mmproj` (an mmproj GGUF), else from the one beside the model file; `media`: None: when
    there is one, True: there must be one, False: the text decoder alone."""
    from .. import memory
    from ..model import empty_model
    from ..quant import parse_quantize, quantize_model
    from . import _read_sparsely, resolve_device, resolve_dtype
    from .mmproj import MmprojFile, find_mmproj, media_config

    g = GGUFModel(path)
    towers = None
    if media is not False:
        mmproj = mmproj or find_mmproj(path)
        if mmproj is None and media:
            raise GGUFError(f"{path}: no mmproj GGUF beside it for the vision / audio towers; give one (--mmproj)")
        if mmproj is not None:
            towers = MmprojFile(mmproj)
            g.config = media_config(g, towers)
    elif mmproj is not None:
        raise ValueError("mmproj= with media=False: the towers would not be loaded")
    device = resolve_device(device)
    quantized = any(t.tensor_type not in FLOATS for t in g.tensors.values() if len(t.shape) > 1)
    bits = parse_quantize(quantize)
    if dtype is None and device.type == "cpu" and (bits or quantized) and not kernels.native_bf16():
        dtype = torch.float32  # as weights.load: fp32 activations for quantized kernels where bf16 is emulated
    dtype = resolve_dtype(dtype, g.config)
    model = empty_model(g.config, media=towers is not None)
    state, ple_rows, file_bits = load_state(g, model, dtype, device)
    if towers is not None:
        state.update(towers.state(model, dtype, device))
    if ple_rows is not None and state["language_model.embed_tokens_per_layer.weight"].dtype == torch.uint8:
        raw = state.pop("language_model.embed_tokens_per_layer.weight")
        model.language_model.embed_tokens_per_layer.weight = nn.Parameter(raw, requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.init_buffers(device)
    model.language_model.ple_rows = ple_rows
    model.requires_grad_(False)
    model.quantization = {"quant_method": "gguf", "bits": file_bits, "group_size": 32} if file_bits else None
    model.gguf, model.mmproj = g, towers and towers.path
    if bits:
        quantize_model(model, bits, group_size)  # the float weights left (a K-quant file's, dequantized)
    if device.type == "cpu" and memory.hugepages():
        memory.move_to_hugepages(model, keep=_read_sparsely(model))
    return model.eval()


def gguf_tokenizer(g):
    """The file's own vocabulary (a GGUFModel, or any GGUF path: a vocab-only file too) as our Tokenizer. None where
    the file has no tokenizer."""
    from ..tokenizer import _builtin

    field = (g if isinstance(g, GGUFModel) else _Fields(os.fspath(g))).field
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    if tokens is None:
        return None
    if field("tokenizer.ggml.model") != "gemma4" or merges is None:
        raise GGUFError(f"tokenizer model {field('tokenizer.ggml.model')!r} is not Gemma 4's BPE")
    builtin = _builtin()
    vocab = builtin.backend.get_vocab(with_added_tokens=True)
    if len(vocab) == len(tokens) and all(vocab.get(t) == i for i, t in enumerate(tokens)):
        return builtin  # every published Gemma 4 GGUF: the same vocabulary
    return tokenizer_from_vocab(tokens, merges, field("tokenizer.ggml.token_type") or [1] * len(tokens))


class _Fields:
    def __init__(self, path: str):
        self.fields = read_header(path)[0]

    def field(self, key: str, default=None):
        return self.fields.get(key, default)


def tokenizer_from_vocab(tokens: list[str], merges: list[str], types: list[int]):
    """Gemma 4's BPE (the built-in tokenizer.json's normalizer, pre-tokenizer and decoder) over another
    vocabulary: tokens by id, merges ("a b"), and token types (CONTROL and USER_DEFINED ones are added tokens)."""
    import json

    import tokenizers

    from ..tokenizer import Tokenizer, builtin_json

    spec = json.loads(builtin_json())
    known = {t["content"]: t for t in spec["added_tokens"]}
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    spec["model"]["vocab"] = {tok: i for i, tok in enumerate(tokens)}
    spec["model"]["merges"] = [m.split(" ", 1) for m in merges]
    spec["added_tokens"] = [
        dict(known.get(tok, plain), id=i, content=tok,
             special=types[i] == gguf.TokenType.CONTROL or known.get(tok, {}).get("special", False))
        for i, tok in enumerate(tokens) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


# ---- writing ------------------------------------------------------------------------------------------------

def _gguf_name(ours: str) -> str:
    name = ours.removeprefix("language_model.")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"blk.{m.group(1)}.{_OURS[m.group(2)]}"
    return {v: k for k, v in _GLOBAL.items()}[name]


def _export_type(name: str, dims: int, row: int, kind) -> GGML:
    """The converter's choice (conversion/base.py `prepare_tensors`): F32 for 1-D tensors, norms, the router
    and anything not named .weight; F16 where a quantized type does not divide the rows into blocks."""
    if dims <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return GGML.F32
    if kind in DIRECT and row % 32:
        return GGML.F16
    return kind


def _float_weights(model):
    """(our name, float tensor) for every text tensor; quantized ones dequantized (or, at group 32, kept as
    (qweight, scales, bits) so that Q4_0 / Q8_0 are written without a float round trip)."""
    from ..quant import QuantizedBank, QuantizedLinear

    text = model.language_model
    done = set()
    for mname, module in text.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedBank)):
            done.add(mname)
            key = f"{mname}.weight" if isinstance(module, QuantizedLinear) else mname
            yield "language_model." + key, (module.qweight, module.scales, module.bits, module.group_size)
    for name, t in text.state_dict().items():
        mname = name.rpartition(".")[0]
        if mname in done or name.startswith(tuple(f"{d}." for d in done)):
            continue
        yield "language_model." + name, t


def _tensor_bytes(value, kind: GGML) -> np.ndarray:
    """Our tensor (float, or quantized tuple) -> the array GGUFWriter stores for `kind`."""
    if isinstance(value, tuple):
        q, s, bits, gs = value
        if gs == 32 and DIRECT.get(kind) == bits:  # our format is the GGUF block format: join d and quants
            return _join_blocks(q, s, bits)
        lead = q.shape[:-1]
        flat_q, flat_s = q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1])
        value = kernels.dequantize(flat_q.cpu(), flat_s.cpu(), bits, gs).view(*lead, -1)
    w = value.detach().cpu()
    if kind in DIRECT:  # llama.cpp's own Q8_0 / Q4_0 rounding (gguf.quants), a few MB of rows at a time
        flat = w.reshape(-1, w.shape[-1])
        rows = max(1, (1 << 22) // w.shape[-1])
        parts = [gguf.quants.quantize(flat[i:i + rows].float().numpy(), kind) for i in range(0, len(flat), rows)]
        return np.concatenate(parts).reshape(*w.shape[:-1], -1)
    if kind == GGML.BF16:
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(*w.shape[:-1], -1)
    return w.to(torch.float16 if kind == GGML.F16 else torch.float32).numpy()


def _join_blocks(q: torch.Tensor, s: torch.Tensor, bits: int) -> np.ndarray:
    """Our (qweight, scales) at group 32 -> GGUF Q4_0 / Q8_0 blocks [..., N, blocks * (2 + 16 | 32)] uint8."""
    q, s = q.cpu(), s.cpu()
    per = 16 if bits == 4 else 32
    nb = s.shape[-1]
    blocks = torch.cat([s.contiguous().view(torch.uint8).view(*s.shape, 2),
                        q.contiguous().view(torch.uint8).view(*q.shape[:-1], nb, per)], dim=-1)
    return blocks.reshape(*q.shape[:-1], nb * (2 + per)).numpy()


def export_gguf(model, out: str, kind: str = "bf16", model_dir: str | None = None,
                chat_template: str | None = None, name: str | None = None) -> None:
    """Write the text model as a GGUF llama.cpp runs, in its converter's layout (metadata keys, tensor names and
    types; see _export_type). `kind`: f32, f16, bf16, q8_0 or q4_0 (q4_0: every tensor the converter would
    quantize, as `llama-quantize --pure` after it), rounded as llama.cpp rounds; weights already in Q4_0 / Q8_0 (a
    GGUF's, or our int4 / int8 at group 32) are written as they are. The tokenizer from `model_dir` (the
    checkpoint: its tokenizer.json, else the built-in one; its directory name gives general.name as in the
    converter), read as the converter reads it (gguf.LlamaHfVocab, gguf.SpecialVocab)."""
    if kind not in EXPORT_TYPES:
        raise ValueError(f"GGUF type must be one of {', '.join(EXPORT_TYPES)}, got {kind!r}")
    cfg = model.config.text
    ggml_kind, file_type = EXPORT_TYPES[kind]
    glob = [s for s in cfg.layers if not s.sliding]
    slid = [s for s in cfg.layers if s.sliding]
    if not glob or not slid:
        raise ValueError("export needs both sliding and global layers (every Gemma 4 model has them)")
    tmp = out + ".partial"
    try:
        _write(model, cfg, tmp, ggml_kind, file_type, glob, slid, model_dir, chat_template, name)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # nothing half-written
        raise
    os.replace(tmp, out)


def _write(model, cfg, tmp, ggml_kind, file_type, glob, slid, model_dir, chat_template, name) -> None:
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from ..tokenizer import builtin_json

    layers = cfg.layers
    w = gguf.GGUFWriter(tmp, ARCH)
    # Tensor infos first (shapes and types; the data is made and written one tensor at a time below, so that an
    # export never holds a second copy of the model), then the metadata the converter derives from them.
    head = [s for s in glob if not s.kv_shared] or glob
    rotated = int(head[0].head_dim * head[0].rope_fraction / 2)
    freqs = torch.tensor([1.0] * rotated + [1e30] * (head[0].head_dim // 2 - rotated), dtype=torch.float32)
    plan = [("rope_freqs.weight", freqs, GGML.F32)]
    w.add_tensor_info("rope_freqs.weight", (len(freqs),), np.dtype(np.float32), 4 * len(freqs))
    for ours, value in _float_weights(model):
        gname = _gguf_name(ours)
        shape = (*value[0].shape[:-1], value[1].shape[-1] * value[3]) if isinstance(value, tuple) \
            else tuple(value.shape)
        kind = _export_type(gname, len(shape), shape[-1], ggml_kind)
        plan.append((gname, value, kind))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(shape)) * size // block
        if kind in (GGML.F32, GGML.F16):
            w.add_tensor_info(gname, shape, np.dtype(np.float16 if kind == GGML.F16 else np.float32), n_bytes)
        else:  # stored as bytes per row
            w.add_tensor_info(gname, gguf.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8), n_bytes,
                              raw_dtype=kind)
    total, shared, expert, _ = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, Path(model_dir) if model_dir else None, name, total)
    if meta.name is None:
        meta.name = "Gemma 4"
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, cfg.num_experts)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    widths = [s.intermediate_size for s in layers]
    w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    w.add_head_count(cfg.num_heads)
    kv = [s.num_kv_heads for s in layers]
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_rope_freq_base(glob[0].rope_theta)
    w.add_rope_freq_base_swa(slid[0].rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
    w.add_key_length(glob[0].head_dim)
    w.add_value_length(glob[0].head_dim)
    w.add_file_type(file_type)
    if cfg.final_logit_softcap:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
    w.add_sliding_window(cfg.sliding_window)
    w.add_shared_kv_layers(sum(s.kv_shared for s in layers))
    w.add_embedding_length_per_layer_input(cfg.ple_dim)
    w.add_sliding_window_pattern([s.sliding for s in layers])
    w.add_key_length_swa(slid[0].head_dim)
    w.add_value_length_swa(slid[0].head_dim)
    if cfg.num_experts:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_rope_dimension_count(glob[0].head_dim)
    w.add_rope_dimension_count_swa(int(slid[0].head_dim * slid[0].rope_fraction))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory() as vocab_dir:
        src = os.path.join(model_dir, "tokenizer.json") if model_dir else None
        if src and os.path.isfile(src):
            shutil.copy(src, vocab_dir)
        else:
            with open(os.path.join(vocab_dir, "tokenizer.json"), "wb") as f:
                f.write(builtin_json())
        tc_src = os.path.join(model_dir, "tokenizer_config.json") if model_dir else None
        tc = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
        if tc_src and os.path.isfile(tc_src):
            with open(tc_src, encoding="utf-8") as f:
                tc = json.load(f)
        if chat_template is not None:
            tc["chat_template"] = chat_template
        with open(os.path.join(vocab_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f)
        _write_vocab(w, vocab_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, value, t_kind in plan:
        w.write_tensor_data(_tensor_bytes(value, t_kind))
    w.close()


def _write_vocab(w, vocab_dir: str) -> None:
    """The tokenizer as llama.cpp's converter writes Gemma 4's (conversion/gemma.py Gemma4Model.set_vocab)."""
    from pathlib import Path

    vocab = gguf.LlamaHfVocab(Path(vocab_dir))
    visible = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
               '<|"|>'}
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in visible else toktype)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(Path(vocab_dir), load_merges=True).add_to_gguf(w)
    w.add_add_space_prefix(False)
    if not any(gguf.Keys.Tokenizer.ADD_BOS in kv for kv in w.kv_data):
        w.add_add_bos_token(True)
