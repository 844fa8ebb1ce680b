"""LoRA on Gemma 4, in the module-swap style of gemma4.quant: a projection (plain or quantized: QLoRA) is wrapped
by a LoRALinear that adds scale * B(A(dropout(x))); the 26B-A4B expert banks get one A/B pair per expert
(LoRABank, as mlx-lm's LoRASwitchLinear). The base stays frozen, and its backward never keeps a float copy of a
weight (ops.frozen_product).

Adapters are read and written in PEFT's format (adapter_config.json + adapter_model.safetensors, keys such as
`base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight`), so that peft.PeftModel loads
ours on transformers' Gemma 4 and we load PEFT's. Expert banks follow PEFT's `target_parameters` layout (its
ParamWrapper): lora_A [experts * r, in] with expert e at rows e*r..e*r+r-1, lora_B [out, r * experts] with
expert e at columns j*experts + e; with both banks targeted PEFT nests the wrappers, and the first bank's keys
gain a `base_layer.` (told apart here by their shapes).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_BANKS = ("experts.gate_up_proj", "experts.down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that cannot apply to this model (another base, unknown modules, a bad file)."""


@dataclass
class LoRAConfig:
    r: int = 16  # rank of each update
    alpha: float = 32.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on the adapter's input, training only
    target_modules: tuple = TEXT_MODULES  # projection names (the last part of a module path, or a path suffix)
    target_parameters: tuple = EXPERT_BANKS  # MoE expert banks (PEFT's target_parameters); where a layer has them
    layers: tuple | None = None  # decoder layer indices to adapt (None: all)
    towers: bool = False  # also the vision / audio towers' projections of those names (frozen by default)
    rslora: bool = False
    extra: dict = field(default_factory=dict)  # other adapter_config.json keys, kept when re-saved

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules, self.target_parameters = tuple(self.target_modules), tuple(self.target_parameters)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """base(x) + (scaling * dropout(x) @ A.T) @ B.T, A [r, in] and B [out, r] trained in fp32 (B starts at zero, so
    a new adapter changes nothing). `base` is a Linear or a gemma4.quant.QuantizedLinear, frozen."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scaling = base, scaling
        out_features, in_features = _shape(base)
        dev = _device(base)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, config: LoRAConfig) -> LoRALinear:
        for p in base.parameters():
            p.requires_grad_(False)
        return cls(base, config.r, config.scaling, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # In the activations' dtype, as autocast would (A and B train in fp32, their gradients arrive through the
        # cast): with a bf16 base, fp32 copies of x and an fp32 [..., out] product were 20% of a training step.
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype)) * self.scaling
        # y + h @ B.T as one addmm: a separate [..., out] product and sum were two fresh tensors per projection
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]),
                           self.lora_B.to(x.dtype).t()).view(y.shape)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A [out, in] in fp32: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class LoRABank(nn.Module):
    """An expert bank [experts, out, in] (a float tensor or gemma4.quant.QuantizedBank) with an A/B pair per
    expert: A [experts, r, in], B [experts, out, r]. Experts.forward calls matmul(x, e) for each chosen expert."""

    def __init__(self, bank, r: int, scaling: float):
        super().__init__()
        n, out_features, in_features = _bank_shape(bank)
        if isinstance(bank, nn.Module):
            self.base = bank
        else:
            self.register_buffer("weight", bank.detach(), persistent=False)  # frozen: not a parameter
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(n, r, in_features, device=bank.device if not isinstance(
            bank, nn.Module) else _device(bank)))
        self.lora_B = nn.Parameter(torch.zeros(n, out_features, r, device=self.lora_A.device))
        for e in range(n):  # PEFT initialises its [experts * r, in] matrix as one Linear (fan_in = in)
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))

    @property
    def shape(self):
        return torch.Size((self.lora_A.shape[0], self.lora_B.shape[1], self.lora_A.shape[2]))

    def matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        from .. import ops

        y = self.base.matmul(x, e) if hasattr(self, "base") else ops.linear(x, self.weight[e])
        h = F.linear(x, self.lora_A[e].to(x.dtype)) * self.scaling
        return y + F.linear(h, self.lora_B[e].to(x.dtype))

    def delta(self) -> torch.Tensor:
        return torch.einsum("eor,eri->eoi", self.lora_B.float(), self.lora_A.float()) * self.scaling


def _shape(base) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    return base.qweight.shape[0], base.scales.shape[1] * base.group_size  # QuantizedLinear


def _bank_shape(bank) -> tuple[int, int, int]:
    if isinstance(bank, nn.Module):  # QuantizedBank
        return bank.qweight.shape[0], bank.qweight.shape[1], bank.scales.shape[2] * bank.group_size
    return tuple(bank.shape)


def _device(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()])).device


def _is_projection(module) -> bool:
    from ..quant import QuantizedLinear

    return isinstance(module, (nn.Linear, QuantizedLinear)) and not hasattr(module, "lookup")


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _layer_of(path: str) -> int | None:
    m = re.search(r"language_model\.layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """Freeze `model` (a gemma4.model.Gemma4) and wrap its target projections and expert banks with LoRA, in
    place. Returns {module path: LoRALinear / LoRABank}. A target that names nothing in this model is an error
    (as PEFT's), and so is a model that already has adapters."""
    from ..model.text import Experts

    if any(isinstance(m, (LoRALinear, LoRABank)) for m in model.modules()):
        raise AdapterError("this model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    scopes = ("language_model.",) + (("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
                                     if config.towers else ())
    wanted_layers = None if config.layers is None else set(config.layers)
    if wanted_layers is not None:
        n = model.config.text.num_layers
        bad = sorted(i for i in wanted_layers if not 0 <= i < n)
        if bad:
            raise AdapterError(f"layers {bad} do not exist: the model has layers 0..{n - 1}")
    wrapped, used = {}, set()
    for path, module in list(model.named_modules()):
        if not path.startswith(scopes):
            continue
        layer = _layer_of(path)
        if wanted_layers is not None and layer is not None and layer not in wanted_layers:
            continue
        if _is_projection(module):
            target = next((t for t in config.target_modules if _matches(path, t)), None)
            if target is not None:
                used.add(target)
                wrapped[path] = _swap(model, path, LoRALinear.from_base(module, config))
        elif isinstance(module, Experts):
            for name in ("gate_up_proj", "down_proj"):
                target = next((t for t in config.target_parameters if _matches(f"{path}.{name}", t)), None)
                if target is None:
                    continue
                used.add(target)
                bank = getattr(module, name)
                lora = LoRABank(bank, config.r, config.scaling)
                if not isinstance(bank, nn.Module):
                    delattr(module, name)
                setattr(module, name, lora)
                wrapped[f"{path}.{name}"] = lora
    unknown = [t for t in config.target_modules if t not in used]
    if unknown:
        raise AdapterError(f"target module(s) {unknown} match no projection of this model; its projections are "
                           f"named {sorted(_projection_names(model, scopes))}")
    if not wrapped:
        raise AdapterError("no module of this model matches the LoRA targets")
    model.lora_config = config
    return wrapped


def _projection_names(model, scopes) -> set:
    return {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if path.startswith(scopes)
            and _is_projection(m)}


def _swap(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
    return new


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, (LoRALinear, LoRABank))}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


# ---- PEFT's format ------------------------------------------------------------------------------------------

def _peft_path(model, path: str) -> str:
    """Our module path -> PEFT's key prefix: transformers' Gemma4ForConditionalGeneration keeps the decoder under
    model.language_model, Gemma4ForCausalLM (a text-only checkpoint) under model."""
    if model.config.architecture != "Gemma4ForConditionalGeneration" and path.startswith("language_model."):
        path = path[len("language_model."):]
    return "base_model.model.model." + path


def peft_key(model: nn.Module, path: str) -> str:
    """The PEFT key prefix of the LoRA module at our `path` (before `.lora_A.weight`)."""
    m = model.get_submodule(path)
    if isinstance(m, LoRALinear):
        return _peft_path(model, path)
    experts, bank = path.rsplit(".", 1)
    return _peft_path(model, experts) + (".base_layer" if bank == "gate_up_proj" and _has_both(model, experts) else "")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (fp32 as trained)."""
    state = {}
    for path, m in lora_modules(model).items():
        key = peft_key(model, path)
        if isinstance(m, LoRALinear):
            A, B = m.lora_A.detach(), m.lora_B.detach()
        else:  # [n, r, in] -> [n * r, in]; [n, out, r] -> [out, r * n] (column j * n + e)
            n, r, i = m.lora_A.shape
            A, B = m.lora_A.detach().reshape(n * r, i), m.lora_B.detach().permute(1, 2, 0).reshape(-1, r * n)
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = A.contiguous(), B.contiguous()
    return state


def set_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors under the keys `adapter_state` writes into the model's LoRA modules (a checkpoint resumed)."""
    for path, m in lora_modules(model).items():
        ab = {name: state[f"{peft_key(model, path)}.{name}.weight"] for name in ("lora_A", "lora_B")}
        (_load_pair if isinstance(m, LoRALinear) else _load_bank)(m, ab, path)


def _has_both(model, experts_path: str) -> bool:
    ex = model.get_submodule(experts_path)
    return isinstance(getattr(ex, "gate_up_proj", None), LoRABank) and isinstance(getattr(ex, "down_proj", None),
                                                                                   LoRABank)


def save_adapter(model: nn.Module, out: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) for the model's adapters. Written to
    temporary names first and renamed: an interrupted save never leaves half an adapter."""
    from safetensors.torch import save_file

    config: LoRAConfig = getattr(model, "lora_config", None)
    if config is None:
        raise AdapterError("this model has no LoRA adapters to save")
    os.makedirs(out, exist_ok=True)
    mods = lora_modules(model)
    modules = sorted({p.rsplit(".", 1)[-1] for p, m in mods.items() if isinstance(m, LoRALinear)})
    params = sorted({"experts." + p.rsplit(".", 1)[-1] for p, m in mods.items() if isinstance(m, LoRABank)})
    # PEFT nests its expert wrappers in the order of target_parameters: gate_up_proj first (the inner one).
    params = [p for p in EXPERT_BANKS if p in params]
    cfg = dict(config.extra)
    cfg.update({
        "peft_type": "LORA", "task_type": cfg.get("task_type"), "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "use_rslora": config.rslora, "bias": "none", "fan_in_fan_out": False,
        "target_modules": modules, "target_parameters": params or None, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_dora": False,
        "layers_to_transform": list(config.layers) if config.layers is not None else None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path or cfg.get("base_model_name_or_path"),
    })
    tmp_w, tmp_c = os.path.join(out, ADAPTER_WEIGHTS + ".tmp"), os.path.join(out, ADAPTER_CONFIG + ".tmp")
    save_file(adapter_state(model), tmp_w, metadata={"format": "pt"})
    with open(tmp_c, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp_w, os.path.join(out, ADAPTER_WEIGHTS))
    os.replace(tmp_c, os.path.join(out, ADAPTER_CONFIG))


def read_adapter(path: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter directory (PEFT's format) -> (config, tensors by PEFT key). Clear errors for a missing or
    corrupt file, or a config that is not a LoRA one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isdir(path):
        raise AdapterError(f"no adapter directory at {path}")
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise AdapterError(f"{path}: {os.path.basename(f)} is missing (an adapter in PEFT's format has "
                               f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: not a LoRA adapter (peft_type {raw.get('peft_type')!r})"
                           if isinstance(raw, dict) else f"{cfg_file}: not a JSON object")
    for unsupported in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if raw.get(unsupported):
            raise AdapterError(f"{cfg_file}: {unsupported} is not supported")
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        raise AdapterError(f"{cfg_file}: LoRA biases are not supported")
    modules = raw.get("target_modules") or []
    if isinstance(modules, str):  # PEFT also takes a regex; we read the module names off the tensors instead
        modules = []
    known = {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "target_parameters",
             "layers_to_transform"}
    config = LoRAConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                        rslora=bool(raw.get("use_rslora", False)), target_modules=tuple(modules),
                        target_parameters=tuple(raw.get("target_parameters") or ()),
                        layers=raw.get("layers_to_transform"),
                        extra={k: v for k, v in raw.items() if k not in known})
    try:
        tensors = load_file(w_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_file}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, config: LoRAConfig | None = None) -> dict:
    """Apply the adapter at `path` (PEFT's format) to `model`: wrap the modules it names and load its tensors.
    Every tensor must land on a module of the right shape, and every wrapped module must get its tensors."""
    config_read, tensors = read_adapter(path)
    config = config or config_read
    names = {}  # our module path -> {"lora_A": t, "lora_B": t}
    prefixes = ("base_model.model.model.", "base_model.model.")
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if not m or not key.startswith(prefixes):
            raise AdapterError(f"{path}: unexpected tensor {key!r} (not a LoRA A/B weight under base_model.model.)")
        inner = m.group(1)
        inner = inner[len(prefixes[0]):] if inner.startswith(prefixes[0]) else inner[len(prefixes[1]):]
        if not inner.startswith(("language_model.", "vision_tower.", "audio_tower.", "embed_vision.",
                                 "embed_audio.")):
            inner = "language_model." + inner  # a text-only (Gemma4ForCausalLM) adapter
        names.setdefault(inner, {})[m.group(2)] = t.float()
    modules = sorted({p.rsplit(".", 1)[-1] for p in names if not p.endswith((".experts", ".base_layer"))})
    banks = {p for p in names if p.endswith((".experts", ".experts.base_layer"))}
    towers = any(not p.startswith("language_model.") for p in names)
    layers = sorted({_layer_of(p) for p in names if _layer_of(p) is not None})
    config.target_modules = tuple(modules)
    config.target_parameters = EXPERT_BANKS if banks else ()
    config.towers = config.towers or towers
    if config.layers is None and layers and len(layers) < model.config.text.num_layers:
        config.layers = tuple(layers)
    try:
        wrapped = apply_lora(model, config) if modules or banks else {}
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    if not wrapped:
        raise AdapterError(f"{path}: the adapter has no tensors")
    filled = set()
    for inner, ab in names.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {inner} has {sorted(ab)} but needs both lora_A and lora_B")
        if inner.endswith((".experts", ".experts.base_layer")):
            experts = inner.removesuffix(".base_layer")
            bank = _which_bank(model, experts, ab, path)
            target = wrapped.get(f"{experts}.{bank}")
            _load_bank(target, ab, f"{path}: {inner}")
            filled.add(f"{experts}.{bank}")
        else:
            target = wrapped.get(inner)
            if target is None:
                raise AdapterError(f"{path}: the adapter adapts {inner}, which this model does not have")
            _load_pair(target, ab, f"{path}: {inner}")
            filled.add(inner)
    missing = sorted(set(wrapped) - filled)
    if missing:
        raise AdapterError(f"{path}: no tensors for {missing[:4]}{' ...' if len(missing) > 4 else ''} (the "
                           "adapter is for another model)")
    return wrapped


def _load_pair(target: LoRALinear, ab: dict, where: str) -> None:
    A, B = ab["lora_A"], ab["lora_B"]
    out_f, in_f = target.lora_B.shape[0], target.lora_A.shape[1]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
        raise AdapterError(f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit a [{out_f}, {in_f}]"
                           " projection (an adapter for another base model?)")
    if A.shape[0] != target.lora_A.shape[0]:
        raise AdapterError(f"{where}: rank {A.shape[0]}, but the adapter config says r = {target.lora_A.shape[0]}")
    with torch.no_grad():
        target.lora_A.copy_(A)
        target.lora_B.copy_(B)


def _which_bank(model, experts_path: str, ab: dict, where: str) -> str:
    """gate_up_proj or down_proj, from the tensors' shapes (PEFT's nesting order depends on how it was asked)."""
    try:
        ex = model.get_submodule(experts_path)
    except AttributeError:
        raise AdapterError(f"{where}: the adapter adapts {experts_path}, which this model does not have") from None
    for bank in ("gate_up_proj", "down_proj"):
        n, out_f, in_f = getattr(ex, bank).shape
        if ab["lora_A"].shape[-1] == in_f and ab["lora_B"].shape[0] == out_f:
            return bank
    raise AdapterError(f"{where}: {experts_path} lora_A {list(ab['lora_A'].shape)} / lora_B "
                       f"{list(ab['lora_B'].shape)} fit neither expert bank (an adapter for another base model?)")


def _load_bank(target: LoRABank, ab: dict, where: str) -> None:
    n, r, i = target.lora_A.shape
    o = target.lora_B.shape[1]
    A, B = ab["lora_A"], ab["lora_B"]
    if tuple(A.shape) != (n * r, i) or tuple(B.shape) != (o, r * n):
        raise AdapterError(f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)}, expected [{n * r}, {i}] / "
                           f"[{o}, {r * n}] for {n} experts at rank {r}")
    with torch.no_grad():
        target.lora_A.copy_(A.reshape(n, r, i))
        target.lora_B.copy_(B.reshape(o, r, n).permute(2, 0, 1))


def remove_lora(model: nn.Module) -> dict[str, tuple]:
    """Unwrap every LoRA module back to its base, in place; returns {path: (A, B, scaling)} of what was there
    (A [r, in], B [out, r]; for an expert bank A [n, r, in], B [n, out, r]), detached."""
    out = {}
    for path, m in lora_modules(model).items():
        out[path] = (m.lora_A.detach(), m.lora_B.detach(), m.scaling)
        if isinstance(m, LoRALinear):
            _swap(model, path, m.base)
        else:
            experts_path, bank = path.rsplit(".", 1)
            ex = model.get_submodule(experts_path)
            delattr(ex, bank)
            setattr(ex, bank, m.base if hasattr(m, "base") else nn.Parameter(m.weight, requires_grad=False))
    model.lora_config = None
    return out


# ---- serving several adapters at once -----------------------------------------------------------------------

class Routing:
    """Which adapter each row of the batch now running uses: `groups` {slot: row indices}, slot 0 (no adapter)
    left out. The engine's worker sets it around each forward; every served LoRA module reads it."""

    def __init__(self):
        self.groups: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # [B] slot per row

    def set(self, slots: list[int] | None, device) -> None:
        if not slots or not any(slots):
            self.groups, self.rows = {}, None
            return
        self.rows = torch.tensor(slots, device=device)
        self.groups = {s: torch.tensor([i for i, x in enumerate(slots) if x == s], device=device)
                       for s in sorted(set(slots)) if s}


class ServedLoRALinear(nn.Module):
    """A projection with several adapters, each row of a batch through its own (or none): base(x) for all rows,
    plus scaling_s * (x_rows @ A_s.T) @ B_s.T added to the rows of adapter s, in fp32 as LoRALinear does."""

    def __init__(self, base: nn.Module, routing: Routing):
        super().__init__()
        self.base, self.routing = base, routing
        self.adapters: dict[int, tuple] = {}  # slot -> (A [r, in], B [out, r], scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, rows in self.routing.groups.items():
            ab = self.adapters.get(slot)
            if ab is not None:
                A, B, scaling = ab
                h = F.linear(x[rows], A.to(x.dtype)) * scaling
                y.index_add_(0, rows, F.linear(h, B.to(x.dtype)))
        return y


class ServedLoRABank(nn.Module):
    """An expert bank with several adapters: matmul(x, e, tokens, total) gets the chosen tokens' indices into the
    layer's flattened [B * T, E] input, whose batch rows say the adapter."""

    def __init__(self, bank, routing: Routing):
        super().__init__()
        if isinstance(bank, nn.Module):
            self.base = bank
        else:
            self.register_buffer("weight", bank.detach(), persistent=False)
        self.routing = routing
        self.adapters: dict[int, tuple] = {}  # slot -> (A [n, r, in], B [n, out, r], scaling)
        self.shape = _bank_shape(bank)

    def matmul(self, x: torch.Tensor, e: int, tokens=None, total: int | None = None) -> torch.Tensor:
        from .. import ops

        y = self.base.matmul(x, e) if hasattr(self, "base") else ops.linear(x, self.weight[e])
        rows = self.routing.rows
        if rows is None or tokens is None:
            return y
        slots = rows[tokens // (total // len(rows))]  # [n] the adapter of each chosen token
        for slot, (A, B, scaling) in self.adapters.items():
            sel = (slots == slot).nonzero().flatten()
            if len(sel):
                h = F.linear(x[sel], A[e].to(x.dtype)) * scaling
                y.index_add_(0, sel, F.linear(h, B[e].to(x.dtype)))
        return y


def serve_adapters(model: nn.Module, adapters: dict[str, str]) -> tuple[Routing, dict[str, int]]:
    """Load several adapters (name -> directory, PEFT's format) for serving side by side: each is checked and
    read as `load_adapter` does, then the union of the modules they adapt is wrapped once. Returns the routing
    the engine sets per forward and {name: slot} (slots from 1; 0 is the base model)."""
    routing, slots, found = Routing(), {}, {}
    for slot, (name, path) in enumerate(adapters.items(), 1):
        load_adapter(model, path)
        for p, ab in remove_lora(model).items():
            found.setdefault(p, {})[slot] = ab
        slots[name] = slot
    towers = sorted(p for p in found if not p.startswith("language_model."))
    if towers:
        raise AdapterError(f"adapters of the vision / audio towers ({towers[0]}, ...) cannot be served per request; "
                           "merge them into the checkpoint (gemma4 merge)")
    for p, per_slot in found.items():
        if p.endswith(("gate_up_proj", "down_proj")) and ".experts." in p + ".":
            experts_path, bank_name = p.rsplit(".", 1)
            ex = model.get_submodule(experts_path)
            bank = getattr(ex, bank_name)
            served = ServedLoRABank(bank, routing)
            if not isinstance(bank, nn.Module):
                delattr(ex, bank_name)
            setattr(ex, bank_name, served)
        else:
            served = _swap(model, p, ServedLoRALinear(model.get_submodule(p), routing))
        served.adapters.update(per_slot)
    return routing, slots


# ---- merging ------------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it, in place: W + scaling * B @ A, computed in fp32 and
    rounded once to the weight's dtype. The base must be in float (merge into the checkpoint, then quantize)."""
    from ..model.text import Experts

    for path, m in lora_modules(model).items():
        if isinstance(m, LoRALinear):
            if not isinstance(m.base, nn.Linear):
                raise AdapterError("merging needs the base weights in float; load the base without quantize")
            w = m.base.weight
            w.copy_((w.float() + m.delta().to(w.device)).to(w.dtype))
            _swap(model, path, m.base)
        else:
            if hasattr(m, "base"):
                raise AdapterError("merging needs the base weights in float; load the base without quantize")
            experts_path, bank = path.rsplit(".", 1)
            ex: Experts = model.get_submodule(experts_path)
            w = m.weight
            merged = (w.float() + m.delta().to(w.device)).to(w.dtype)
            delattr(ex, bank)
            setattr(ex, bank, nn.Parameter(merged, requires_grad=False))
    model.lora_config = None
    return model


def save_merged(model: nn.Module, src_checkpoint: str, out: str) -> None:
    """Write a merged model as a checkpoint in the published layout (config.json and the small files of
    `src_checkpoint`, model.safetensors with the text decoder's and towers' tensors under their published keys)."""
    import shutil

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src_checkpoint):
        src = os.path.join(src_checkpoint, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name != "model.safetensors.index.json" \
                and not name.startswith("adapter_"):
            shutil.copy(src, os.path.join(out, name))
    multimodal = model.config.architecture == "Gemma4ForConditionalGeneration"
    state = {}
    for k, v in model.state_dict().items():
        if k == "language_model.lm_head.weight":
            key = "lm_head.weight"
        elif k.startswith("language_model."):
            key = "model." + (k if multimodal else k[len("language_model."):])
        else:
            key = "model." + k
        state[key] = v.detach().contiguous()
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))


def is_adapter_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


__all__ = ["LoRAConfig", "LoRALinear", "LoRABank", "AdapterError", "apply_lora", "lora_parameters", "save_adapter",
           "read_adapter", "load_adapter", "merge_lora", "save_merged", "adapter_state", "set_adapter_state",
           "remove_lora", "serve_adapters", "Routing"]
