"""Load a published Gemma 4 checkpoint (safetensors, single file or sharded) into `model.Gemma4`.

The model is built on the meta device and each tensor is read once, converted to the target dtype and
assigned: no second full copy. Nothing is ever unpickled. Names are matched exactly; the only tensors
we skip are the media towers when they are not built (`media=False`, or a file without them such as a
saved quantized decoder), a tied `lm_head.weight`, and the unused K/V weights that published files may
still carry on KV-shared layers. Anything else missing, unexpected or mis-shaped is an error naming the tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct

import torch
from safetensors import safe_open
from torch import nn

from .. import kernels, memory
from ..config import ModelConfig, load_config
from ..kernels import DEFAULT_GROUP_SIZE
from ..model import Gemma4, empty_model

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TOWERS = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
_SHARED_KV_UNUSED = re.compile(r"language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the config."""


def open_safetensors(file: str):
    """safe_open, with a truncated or corrupt file as one CheckpointError (safetensors raises its own error type,
    which the CLI printed as a traceback)."""
    from safetensors import SafetensorError

    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); a truncated or corrupt "
                              f"download?") from None


def resolve_checkpoint(path_or_id: str | os.PathLike, config_only: bool = False) -> str:
    """A local directory, or a Hugging Face hub id looked up in the local hub cache first (then downloaded;
    `config_only`: just the JSON files, not gigabytes of weights)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path) or path.endswith(".gguf") and os.path.isfile(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; give the checkpoint directory (with config.json) or a .gguf file")
    hub = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?", path)
    if hub and not path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        repo, quant = hub.groups()
        patterns = ["*.json"] if config_only else ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        if quant:  # a GGUF repo, as llama.cpp's `-hf owner/name:Q4_0`: that quant's file and the f16 mmproj
            patterns = [f"*{q}.gguf" for q in {quant, quant.upper(), quant.lower()}] + ["mmproj*[!bB][fF]16.gguf"]
        error = None
        for local in (True, False):  # the local cache first
            try:
                snapshot = snapshot_download(repo, allow_patterns=patterns, local_files_only=local)
            except Exception as e:
                error = error or e
                continue
            found = _quant_file(snapshot, quant) if quant else snapshot
            if found:
                return found
        if quant and not isinstance(error, Exception):
            raise FileNotFoundError(f"{path}: the repository has no GGUF file ending in {quant}.gguf")
        raise FileNotFoundError(f"{path}: not a local directory, and the hub id could not be found in the "
                                f"local cache or downloaded ({type(error).__name__}: {error})") from None
    raise FileNotFoundError(f"no checkpoint directory at {path}")


def _quant_file(snapshot: str, quant: str) -> str | None:
    """The model GGUF of this quant in a downloaded repository (the mmproj sits beside it)."""
    found = sorted(n for n in os.listdir(snapshot) if n.lower().endswith(f"{quant.lower()}.gguf")
                   and not n.startswith("mmproj"))
    if len(found) > 1:
        raise FileNotFoundError(f"{snapshot}: several GGUF files end in {quant}.gguf ({', '.join(found)})")
    return os.path.join(snapshot, found[0]) if found else None


def safetensors_files(ckpt: str) -> list[str]:
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(ckpt, n))]
        if missing:
            raise CheckpointError(f"{ckpt}: shard(s) {missing} named in model.safetensors.index.json are missing")
        return [os.path.join(ckpt, n) for n in names]
    single = os.path.join(ckpt, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(ckpt)):
        raise CheckpointError(f"{ckpt}: only pickle weights found; gemma4 loads safetensors only (never unpickles)")
    raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


def our_name(key: str, config: ModelConfig) -> str:
    """Checkpoint key -> our parameter name (`model.language_model.x` / text-only `model.x` -> `language_model.x`)."""
    if key.startswith("model.language_model."):
        return key[len("model."):]
    if key.startswith("model."):
        rest = key[len("model."):]
        return rest if rest.startswith(_TOWERS) else "language_model." + rest
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    return key


def resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.text.dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of bfloat16, float16, float32, float64")
    return _DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """None -> cuda if there is a GPU, else cpu; a GPU that is not there is a clear error, not a torch assert."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: {torch.cuda.device_count()} CUDA device(s) available")
    return dev


def load(path: str | os.PathLike, dtype=None, device=None, quantize: str | None = None,
         group_size: int = DEFAULT_GROUP_SIZE, media: bool | None = None, mmproj: str | os.PathLike | None = None
         ) -> Gemma4:
    """Load a checkpoint directory or hub id -> `Gemma4` in eval mode.

    `media`: build and load the vision / audio towers the config describes. None (default): when the files
    hold them; True: they must be there; False: the text decoder alone (their tensors are skipped).
    Quantization applies to the text decoder only; the towers stay in `dtype`. A GGUF model's towers are an
    mmproj GGUF: `mmproj`, else the `mmproj*.gguf` beside the model file.

    `dtype` None: the checkpoint's; float32 for a quantized model on a CPU (see below).
    Tensors already in the target dtype are read memory-mapped from the file; on a CPU with transparent huge
    pages the weights then move to an anonymous huge-page mapping (`memory.move_to_hugepages`; GEMMA4_HUGEPAGES=0
    keeps them mapped from the file, shared with other processes). The PLE table always
    stays in its stored dtype, memory-mapped: it is only ever looked up, a row per token, so most of its
    2.3B (E2B) parameters are never read into memory. `quantize`: "int8" / "int4" weight-only, done here;
    a checkpoint saved quantized (config.json `quantization_config`) loads as such.
    """
    from .gguf import find_gguf, load_gguf

    ckpt = resolve_checkpoint(path)
    if find_gguf(ckpt):
        return load_gguf(find_gguf(ckpt), dtype=dtype, device=device, quantize=quantize, group_size=group_size,
                         media=media, mmproj=mmproj)
    if mmproj is not None:
        raise ValueError(f"mmproj= is for GGUF models; {ckpt} is a checkpoint directory (its towers are in it)")
    config = load_config(ckpt)
    device = resolve_device(device)
    saved_quant = _saved_quantization(ckpt)
    if dtype is None and device.type == "cpu" and (quantize is not None or saved_quant) \
            and not kernels.native_bf16():
        # A quantized model's float tensors are only norms and scalars (the PLE table keeps its own dtype),
        # and its kernels take fp32 activations at the speed of bf16 ones; a CPU without native bf16 emulates
        # bf16 GEMMs (prefill) and elementwise ops. E2B int4 decode: 9.4 -> 10.6 tok/s eager, 8 -> 15 tok/s
        # compiled (torch.compile's bf16 CPU code is slow). The K/V cache follows the activations (fp32: twice
        # the bytes per token). Where bf16 is native, bf16 activations make prefill a bf16 GEMM over weights
        # dequantized to bf16 (README "CPU paths").
        dtype = torch.float32
    dtype = resolve_dtype(dtype, config)
    if quantize is not None and saved_quant:
        raise ValueError(f"{ckpt} is already quantized ({saved_quant['bits']}-bit); load it without quantize=")
    from ..quant import parse_quantize

    bits = parse_quantize(quantize)
    files = safetensors_files(ckpt)
    if media is None:
        media = _has_towers(files, config)
    model = empty_model(config, media=bool(media))
    if saved_quant:
        from ..quant import quantize_structure

        quantize_structure(model.language_model, saved_quant["bits"], saved_quant["group_size"], dtype)
    # Weights quantized here are read in their stored dtype (memory-mapped, quantized one by one): converting
    # them first would hold a full float copy (9 GB of fp32 for E2B); the rest is cast after quantizing.
    read_dtype = resolve_dtype(None, config) if bits else dtype
    wanted = model.state_dict()  # parameters and persistent buffers (layer_scalar, quantized weights)
    shared = {s.index for s in config.text.layers if s.kv_shared}
    state: dict[str, torch.Tensor] = {}
    ple_rows = None
    from tqdm import tqdm

    # A progress bar on a terminal (tqdm's disable=None: not when stderr is a file or pipe).
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), desc="loading", unit="B", unit_scale=True,
               disable=None, leave=False)
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                bar.update(_tensor_bytes(f, key))
                name = our_name(key, config)
                if name.startswith(_TOWERS) and not media:
                    continue  # a text-only load: the towers are not built
                m = _SHARED_KV_UNUSED.match(name)
                if m and int(m.group(1)) in shared:
                    continue  # published files keep K/V weights that KV-shared layers never use
                if name == "language_model.lm_head.weight" and config.text.tie_word_embeddings:
                    continue  # tied to the embedding
                if name not in wanted:
                    raise CheckpointError(f"{os.path.basename(file)}: unexpected tensor {key!r} for this config")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(wanted[name].shape):
                    raise CheckpointError(f"{os.path.basename(file)}: tensor {key!r} has shape {shape}, "
                                          f"the config needs {tuple(wanted[name].shape)}")
                mapped = _mapped_tensor(file, key) if name.endswith("embed_tokens_per_layer.weight") \
                    and device.type == "cpu" and _CAN_PREAD else None
                if mapped is not None:
                    state[name], ple_rows = mapped
                    continue
                t = f.get_tensor(key)
                state[name] = t.to(device=device, dtype=None if _keeps_stored_dtype(name, t) else read_dtype)
    bar.close()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{ckpt}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the model holds the tensors now: each is freed as it moves to huge pages (below)
    model.init_buffers(device)
    if ple_rows is not None:
        model.language_model.ple_rows = ple_rows
    model.requires_grad_(False)
    model.quantization = saved_quant
    if bits:
        from ..quant import QuantizedLinear, quantize_model

        quantize_model(model, bits, group_size)
        if dtype != read_dtype:  # what stayed float (norms, scalars, the router, the towers) -> dtype
            for name, t in model.state_dict().items():  # persistent tensors: not the fp32 RoPE tables
                if not _keeps_stored_dtype(name, t) and t.dtype != dtype:
                    module_name, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    cast = t.to(dtype)
                    setattr(module, attr, nn.Parameter(cast, requires_grad=False)
                            if isinstance(getattr(module, attr), nn.Parameter) else cast)
            for module in model.modules():
                if isinstance(module, QuantizedLinear):
                    module.dtype = dtype  # what its embedding lookups dequantize to
    if device.type == "cpu" and memory.hugepages():  # decode streams every weight: no TLB miss per 4 kB
        memory.move_to_hugepages(model, keep=_read_sparsely(model))
    return model.eval()


def _tensor_bytes(f, key: str) -> int:
    """A safetensors entry's size in bytes, from its header."""
    sl = f.get_slice(key)
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8}.get(sl.get_dtype(), 2)


def _read_sparsely(model) -> list[torch.Tensor]:
    """Tensors a step reads only parts of, which stay memory-mapped so that only those parts become resident:
    the PLE table (a row per token) and the MoE experts (8 of 128 per token: an int4 26B-A4B decodes with
    3.7 GB resident of its 13 GB)."""
    from ..model.text import Experts

    text = model.language_model
    sparse = [text.embed_tokens_per_layer.weight] if hasattr(text, "embed_tokens_per_layer") else []
    for module in text.modules():
        if isinstance(module, Experts):
            sparse += [t for bank in (module.gate_up_proj, module.down_proj)
                       for t in ((bank.qweight, bank.scales) if isinstance(bank, nn.Module) else (bank,))]
    return sparse


_CAN_PREAD = hasattr(os, "preadv")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class FileRows:
    """Rows of a 2-D table read from its file with pread (`TextModel.per_layer_inputs`), for E2B/E4B's PLE
    table (4.7 GB): a lookup through a memory map keeps each row's pages resident, and the kernel maps 64 KB
    around each 18 KB row it reads (fault-around), so a 512-token prompt added 45 MB to the RSS (still 33 MB
    at the peak when the pages were dropped right after the lookup), and a long-running server would end up
    with the whole table resident. pread copies the rows from the page cache and maps nothing: 512 rows take
    ~8 ms here, one row ~17 us."""

    def __init__(self, file: str, offset: int, shape: tuple[int, int], dtype: torch.dtype,
                 row_bytes: int | None = None, decode=None):
        """`decode`: raw rows uint8 [n, row_bytes] -> float rows [n, shape[1]], for a quantized table (GGUF)."""
        self.file = open(file, "rb", buffering=0)  # closed with this object
        self.offset, self.shape, self.dtype, self.decode = offset, shape, dtype, decode
        self.row_bytes = row_bytes or shape[1] * dtype.itemsize

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        if flat and not 0 <= min(flat) <= max(flat) < self.shape[0]:
            raise IndexError(f"token id out of range for the {self.shape[0]}-row per-layer embedding table")
        buf = bytearray(len(flat) * self.row_bytes)
        view, n = memoryview(buf), self.row_bytes
        for i, token in enumerate(flat):
            if os.preadv(self.file.fileno(), [view[i * n:(i + 1) * n]], self.offset + token * n) != n:
                raise OSError(f"{self.file.name}: short read of the per-layer embedding table")
        if self.decode is not None:
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            return self.decode(raw.view(len(flat), n)).view(*ids.shape, self.shape[1])
        rows = torch.frombuffer(buf, dtype=self.dtype) if buf else torch.empty(0, dtype=self.dtype)
        return rows.view(*ids.shape, self.shape[1])


def _mapped_tensor(file: str, key: str) -> tuple[torch.Tensor, FileRows] | None:
    """One tensor of a safetensors file through a memory map of its own (copy-on-write: never written), and
    a `FileRows` reader of it. None for another dtype."""
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(header_len))[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None or len(entry["shape"]) != 2:
            return None
        begin, end = entry["data_offsets"]
        start = 8 + header_len + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(fh.fileno(), end - begin + start - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    t = torch.frombuffer(pages, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start - aligned)
    return t.view(entry["shape"]), FileRows(file, start, tuple(entry["shape"]), dtype)


def _keeps_stored_dtype(name: str, t: torch.Tensor) -> bool:
    """Tensors that are not converted to the model dtype: integers (quantized weights), fp16 quantization
    scales, and the PLE table (looked up, memory-mapped)."""
    return not t.is_floating_point() or t.dtype == torch.float16 and name.endswith(".scales") \
        or name.endswith("embed_tokens_per_layer.weight")


def _has_towers(files: list[str], config: ModelConfig) -> bool:
    """Whether the checkpoint stores media-tower tensors (reads the safetensors headers only)."""
    if config.vision is None and config.audio is None:
        return False
    for file in files:
        with open_safetensors(file) as f:
            if any(our_name(k, config).startswith(_TOWERS) for k in f.keys()):
                return True
    return False


def _saved_quantization(ckpt: str) -> dict | None:
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        q = json.load(f).get("quantization_config")
    if q is None:
        return None
    from ..quant import QUANT_METHOD, check_quantization

    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"{ckpt}: quantization {method!r} is not supported (gemma4 reads float checkpoints "
                              f"and its own '{QUANT_METHOD}' int8/int4 ones)")
    check_quantization(q.get("bits"), q.get("group_size"))
    return q


def load_assistant(path: str | os.PathLike, dtype=None, device=None):
    """Load an MTP drafter checkpoint (`gemma4_assistant`: a directory or hub id) -> model.assistant.Assistant
    in eval mode. Its LM head is its tied embedding table (`lm_head.weight`, when stored, must equal it)."""
    from ..model.assistant import Assistant, parse_assistant_config

    ckpt = resolve_checkpoint(path)
    file = os.path.join(ckpt, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {ckpt}")
    try:
        with open(file, encoding="utf-8") as f:
            config = parse_assistant_config(json.load(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    device, dtype = resolve_device(device), resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Assistant(config)
    wanted, state = model.state_dict(), {}
    for file in safetensors_files(ckpt):
        with open_safetensors(file) as f:
            for key in f.keys():
                if key == "lm_head.weight":
                    continue  # tied to model.embed_tokens.weight
                if key not in wanted:
                    raise CheckpointError(f"{os.path.basename(file)}: unexpected tensor {key!r} for a drafter")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(wanted[key].shape):
                    raise CheckpointError(f"{os.path.basename(file)}: tensor {key!r} has shape {tuple(t.shape)}, "
                                          f"the config needs {tuple(wanted[key].shape)}")
                state[key] = t.to(device=device, dtype=None if not t.is_floating_point() else dtype)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{ckpt}: missing drafter tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)  # the RoPE tables (not in the checkpoint) were built on meta
    model.requires_grad_(False)
    if device.type == "cpu" and memory.hugepages():
        memory.move_to_hugepages(model)
    return model.eval()
