"""Weight-only int8 / int4 quantization (gpt-fast style: swap the projections for quantized ones).

Group-wise symmetric scales along the input dimension (gemma4.kernels has the format and the kernels).
Quantized: every decoder projection, the tied embedding / LM head (the largest read of a decode step),
the PLE model projection and the MoE experts. Kept in float: norms, scalars, the router (tiny, and it
decides which experts run) and the PLE table (looked up one row per token, memory-mapped).

A quantized model saves as a safetensors checkpoint (`save_quantized`): each quantized weight `W` is
stored as `W.qweight` + `W.scales`, and config.json gets a `quantization_config`; `weights.load` reads it back.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from . import kernels, ops
from .model.text import Experts, Linear, TextModel

QUANT_METHOD = "gemma4-weight-only"


def quantized_product(x, qweight, scales, bits: int, group_size: int) -> torch.Tensor:
    """x @ W.T for a quantized W; differentiable in x (QLoRA), W dequantized a block at a time in the backward."""
    if not ops.needs_autograd(x):
        return kernels.qmatmul(x, qweight, scales, bits, group_size)
    return ops.frozen_product(x, lambda x: kernels.qmatmul(x, qweight, scales, bits, group_size),
                              lambda n0, n1, k0, k1, dtype: dequantized_block(qweight, scales, bits, group_size,
                                                                              n0, n1, k0, k1, dtype),
                              (qweight.shape[0], scales.shape[1] * group_size), align=group_size)


def dequantized_block(qweight, scales, bits: int, group_size: int, n0: int, n1: int, k0: int, k1: int, dtype):
    """W[n0:n1, k0:k1] (k0, k1 multiples of group_size) dequantized: bf16 for bf16 (written as bf16 directly),
    else fp32; on a CPU into a buffer reused by the next call (a fresh one per block is a new mapping to fault
    in)."""
    dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    per_byte = 2 if bits == 4 else 1
    q = qweight[n0:n1, k0 // per_byte:k1 // per_byte]
    s = scales[n0:n1, k0 // group_size:k1 // group_size]
    if qweight.device.type == "cpu":
        out = kernels.scratch("frozen grad", (n1 - n0) * (k1 - k0), dtype).view(n1 - n0, k1 - k0)
    else:
        out = torch.empty(n1 - n0, k1 - k0, dtype=dtype, device=qweight.device)
    return kernels.dequantize(q, s, bits, group_size, dtype, out=out)


class QuantizedLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        packed, qtype = (in_features // 2, torch.uint8) if bits == 4 else (in_features, torch.int8)
        self.register_buffer("qweight", torch.empty(out_features, packed, dtype=qtype))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_product(x, self.qweight, self.scales, self.bits, self.group_size)

    def set_weight(self, w: torch.Tensor) -> None:
        self.qweight, self.scales = kernels.quantize(w, self.bits, self.group_size)


class QuantizedEmbedding(QuantizedLinear):
    """The tied embedding table: looked up row by row, and used whole as the LM head."""

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        q, s = self.qweight[ids.flatten()], self.scales[ids.flatten()]
        rows = kernels.dequantize(q, s, self.bits, self.group_size, self.dtype)
        return rows.view(*ids.shape, -1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)


class QuantizedBank(nn.Module):
    """A bank of expert weights [n, out, in], each expert quantized like a QuantizedLinear."""

    def __init__(self, n: int, out_features: int, in_features: int, bits: int, group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        packed, qtype = (in_features // 2, torch.uint8) if bits == 4 else (in_features, torch.int8)
        self.register_buffer("qweight", torch.empty(n, out_features, packed, dtype=qtype))
        self.register_buffer("scales", torch.empty(n, out_features, in_features // group_size, dtype=torch.float16))

    def matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return quantized_product(x, self.qweight[e], self.scales[e], self.bits, self.group_size)

    def set_weight(self, w: torch.Tensor) -> None:
        pairs = [kernels.quantize(w[e], self.bits, self.group_size) for e in range(w.shape[0])]
        self.qweight = torch.stack([q for q, _ in pairs])
        self.scales = torch.stack([s for _, s in pairs])


def parse_quantize(quantize) -> int | None:
    """"int8" / "int4" (or 8 / 4, or None) -> bits; anything else is a clear error."""
    bits = {None: None, "int8": 8, "int4": 4, 8: 8, 4: 4}.get(quantize, -1)
    if bits == -1:
        raise ValueError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
    return bits


def check_quantization(bits, group_size) -> None:
    if bits not in (4, 8):
        raise ValueError(f"quantization must be int8 or int4, got {bits!r} bits")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32, got {group_size!r}")


def quantize_structure(text: TextModel, bits: int, group_size: int, dtype: torch.dtype) -> dict:
    """Swap the quantizable weights of `text` for empty quantized modules; returns {id(new module): the float
    weight it replaces}, so that `quantize_model` can fill them (and `weights.load` load them, on meta)."""
    check_quantization(bits, group_size)
    originals = {}
    for parent in list(text.modules()):
        for child_name, child in list(parent.named_children()):
            # A weight whose input width is not a multiple of the group size stays in float (as llama.cpp
            # falls back for odd shapes); every published Gemma 4 width is a multiple of 32.
            if isinstance(child, Linear) and child.in_features % group_size == 0:
                q = QuantizedLinear(child.out_features, child.in_features, bits, group_size, dtype)
                originals[id(q)] = child.weight
                setattr(parent, child_name, q)
            elif isinstance(child, Experts):
                for bank_name in ("gate_up_proj", "down_proj"):
                    w = getattr(child, bank_name)
                    if w.shape[-1] % group_size:
                        continue
                    bank = QuantizedBank(*w.shape, bits, group_size)
                    originals[id(bank)] = w
                    delattr(child, bank_name)
                    setattr(child, bank_name, bank)
    if not hasattr(text, "lm_head") and text.cfg.hidden_size % group_size == 0:  # tied table = LM head
        w = text.embed_tokens.weight
        table = QuantizedEmbedding(w.shape[0], w.shape[1], bits, group_size, dtype)
        originals[id(table)] = w
        text.embed_tokens = table
    return originals


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int = kernels.DEFAULT_GROUP_SIZE):
    """Quantize a loaded float `Gemma4` in place (weights are quantized one matrix at a time)."""
    text = model.language_model
    from tqdm import tqdm

    originals = quantize_structure(text, bits, group_size, model.dtype)
    todo = [m for m in text.modules() if id(m) in originals]
    for module in tqdm(todo, desc=f"quantizing to int{bits}", unit="matrix", disable=None, leave=False):
        module.set_weight(originals.pop(id(module)).float())
    model.quantization = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size}
    return model


def save_quantized(model, src_checkpoint: str, out: str) -> None:
    """Write a quantized model as a checkpoint: config.json (+ quantization_config), the tokenizer and
    other small files of `src_checkpoint`, and model.safetensors with the quantized tensors."""
    from safetensors.torch import save_file

    if not getattr(model, "quantization", None):
        raise ValueError("save_quantized needs a quantized model (gemma4.LLM(path, quantize=...))")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src_checkpoint):
        if not name.endswith(".safetensors") and name not in ("model.safetensors.index.json", "config.json"):
            src = os.path.join(src_checkpoint, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out, name))
    with open(os.path.join(src_checkpoint, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = model.quantization
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    prefix = "model.language_model." if model.config.architecture == "Gemma4ForConditionalGeneration" else "model."
    state = {prefix + k: v.contiguous() for k, v in model.language_model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
