"""What this CPU can do, detected once at run time, and which path each product takes on it.

Two choices follow from the CPU's features (never from the machine this was written on):
  * the kernel build (`isa`): csrc/ is compiled once per instruction set, the best one this CPU has
    (AVX-512 with VNNI and BF16 dot products, AVX-512 with VNNI, AVX2, ARM NEON with or without dotprod);
  * prefill's bf16 GEMM (`native_bf16`): PyTorch's bf16 matmul (oneDNN, AMX) where the CPU multiplies bf16
    natively, else fp32 GEMMs over bf16 weights converted block by block (emulated bf16 is ~6x slower).
GEMMA4_ISA and GEMMA4_BF16_GEMM (or `select`) force either, for comparisons and tests; a choice the CPU cannot
run is a clear error. `gemma4 info --hardware` prints `describe()`.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass

import torch

# Kernel builds, best first: (name, CPU features it needs, compiler flags for GCC/Clang).
ISAS = (
    ("avx512_bf16", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                     "avx512_bf16"),
     ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
      "-mavx512bf16"]),
    ("avx512_vnni", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
     ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]),
    ("avx2", ("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    ("neon_dotprod", ("asimd", "asimddp"), ["-march=armv8.2-a+dotprod"]),
    ("neon", ("asimd",), ["-march=armv8-a"]),
)
ISA_FLAGS = {name: flags for name, _, flags in ISAS}
_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")  # x86 dot products / tiles; ARM's FEAT_BF16 ("bf16")
# Apple reports features through sysctl, under other names.
_SYSCTL = {"hw.optional.AdvSIMD": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
           "hw.optional.arm.FEAT_BF16": "bf16"}


@dataclass(frozen=True)
class CPU:
    arch: str  # platform.machine(), lower case: x86_64, aarch64, arm64
    name: str  # the model name the OS reports
    features: frozenset  # /proc/cpuinfo flags (x86) or Features (ARM), or their sysctl equivalents
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): what PyTorch's own kernels use
    onednn_bf16: bool  # PyTorch's oneDNN has a bf16 GEMM for this CPU (it checks avx512_core or better)

    def has(self, *features) -> bool:
        return all(f in self.features for f in features)

    def isas(self) -> list[str]:
        """The kernel builds this CPU can run, best first."""
        arm = self.arch in ("aarch64", "arm64")
        return [name for name, needs, _ in ISAS
                if (name.startswith("neon") == arm) and (self.has(*needs) or (name == "neon" and arm))]

    def native_bf16(self) -> bool:
        """The CPU multiplies bf16 natively and PyTorch's GEMM uses it."""
        return self.onednn_bf16 and any(f in self.features for f in _BF16_FEATURES)


@functools.cache
def cpu() -> CPU:
    """This machine's CPU (detected once)."""
    name, features = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name, features = parse_cpuinfo(f.read(), name)
    except OSError:  # macOS, Windows: ask sysctl (Apple silicon)
        features = {feature for key, feature in _SYSCTL.items() if _sysctl(key) == "1"}
        name = _sysctl("machdep.cpu.brand_string") or name
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return CPU(platform.machine().lower(), name, frozenset(features), torch.backends.cpu.get_cpu_capability(),
               onednn)


def parse_cpuinfo(text: str, name: str = "") -> tuple[str, set]:
    """/proc/cpuinfo -> (model name, features of the first processor): x86's "flags", ARM's "Features"."""
    features = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and features is None:
            features = set(value.split())
        elif key in ("model name", "cpu model") and value.strip() and not name:
            name = value.strip()
    return name, features or set()


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


_chosen: dict = {}  # what `select` forced: "isa", "native_bf16"


def select(isa: str | None = None, native_bf16: bool | None = None) -> None:
    """Force the kernel build and/or prefill's bf16 GEMM for this process (None: back to the detected best)."""
    from . import kernels

    if isa is not None:
        _check_isa(isa)
    kernels.reset()
    for key, value in (("isa", isa), ("native_bf16", native_bf16)):
        if value is None:
            _chosen.pop(key, None)
        else:
            _chosen[key] = value


def _check_isa(isa: str) -> str:
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown kernel ISA {isa!r}; one of {', '.join(ISA_FLAGS)}")
    if isa not in cpu().isas():
        raise ValueError(f"this CPU ({cpu().name or cpu().arch}) cannot run the {isa} kernels; it can run: "
                         + (", ".join(cpu().isas()) or "none"))
    return isa


def isa() -> str | None:
    """The kernel build in use: forced by `select` or GEMMA4_ISA, else the best this CPU runs (None: none)."""
    if "isa" in _chosen:
        return _chosen["isa"]
    forced = os.environ.get("GEMMA4_ISA", "")
    if forced:
        return _check_isa(forced)
    return next(iter(cpu().isas()), None)


def native_bf16() -> bool:
    """Whether prefill multiplies bf16 natively (PyTorch's bf16 GEMM) rather than through fp32 blocks."""
    if "native_bf16" in _chosen:
        return _chosen["native_bf16"]
    forced = os.environ.get("GEMMA4_BF16_GEMM", "")
    if forced not in ("", "native", "fp32"):
        raise ValueError(f"GEMMA4_BF16_GEMM must be 'native' or 'fp32', got {forced!r}")
    return cpu().native_bf16() if not forced else forced == "native"


def describe() -> dict:
    """What was detected and which path each product takes: `gemma4 info --hardware`."""
    from . import kernels, memory

    c, chosen = cpu(), isa()
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                         "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve") if f in c.features]
    built = kernels.kernel_available()
    why = kernels.unavailable_reason()
    bf16 = native_bf16()
    return {
        "cpu": c.name or "unknown", "arch": c.arch, "threads": torch.get_num_threads(),
        "features": shown, "torch_capability": c.torch_capability, "onednn_bf16": c.onednn_bf16,
        "kernel_isas": c.isas(), "kernel_isa": chosen, "kernels": "built" if built else why,
        "paths": {
            f"bf16 decode (<= {kernels.bf16_kernel_rows()} rows)":
                f"gemma4 kernel ({chosen})" if built else "PyTorch F.linear",
            "bf16 prefill": "PyTorch bf16 GEMM (native: oneDNN)" if bf16 else "fp32 GEMM over bf16 weight blocks",
            f"int4/int8 decode (<= {kernels.MAX_KERNEL_ROWS} rows)":
                f"gemma4 kernel ({chosen})" if built else "dequantize + F.linear",
            "int4/int8 prefill": "dequantize to bf16 blocks + bf16 GEMM" if bf16
                else "dequantize to fp32 blocks + fp32 GEMM",
            "norms, attention, gelu": f"gemma4 kernels ({chosen})"
                if kernels.kernel_available("rms_norm") else "PyTorch",
            "weights": "huge pages (transparent, madvise)" if memory.hugepages()
                else "memory-mapped from the checkpoint",
            "C heap": "pooled (bf16 native)" if memory.heap_pooled() else "large buffers unpooled",
        },
    }
