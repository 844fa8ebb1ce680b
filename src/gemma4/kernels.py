"""Weight-only int4 / int8 quantization and the matrix x few-rows kernels used for decoding.

Format (group-wise, symmetric, along K = the input dim), for a weight W [N, K]:
  scales   float16 [N, K // group_size]   one scale per output row and group of `group_size` weights
  qweight  int8:  int8  [N, K]            q in [-127, 127]
           int4:  uint8 [N, K // 2]       q in [-8, 7]; per 32-block of K, byte j holds (q[j] + 8) in the low
                                          nibble and (q[j + 16] + 8) in the high nibble (llama.cpp's Q4_0
                                          order), so the kernel unpacks 32 weights with one AND and one shift.
  W[n, k] ~= scales[n, k // group_size] * q[n, k]

Why our own kernel: on the 2-core AVX2 CPUs we target, PyTorch's packed int8/int4 kernels stream weights at
~11 and ~3 GB/s, below a plain bf16 F.linear (~18 GB/s), while a decode step is purely weight-bandwidth bound.
csrc/qgemv.cpp (llama.cpp's Q4_0 x Q8_0 scheme) is compiled on first use; without a compiler or AVX2 we fall
back to dequantize + F.linear, which is exact but slower.
"""
import os
import platform
import warnings

import torch
import torch.nn.functional as F

MAX_KERNEL_ROWS = 16  # up to here the product is weight-bandwidth bound (decode); beyond, compute bound (prefill)

_build = None  # None: not tried yet; True: op registered; str: why it is unavailable


def _check_format(bits, group_size):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (the kernel's block), got {group_size!r}")


def quantize(w, bits, group_size=32):
    """w [N, K] float -> (qweight, scales); see the module docstring for the format."""
    _check_format(bits, group_size)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a 2-D floating point weight [N, K], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"K={K} (the input dim) is not a multiple of group_size={group_size}")
    g = w.detach().float().reshape(N, K // group_size, group_size)
    amax = g.abs().amax(-1, keepdim=True)
    if bits == 8:
        d = amax / 127
    else:
        # Q4_0's choice: the largest-magnitude weight maps exactly to -8, which uses the asymmetric int4 range
        # fully (absmax / 7 wastes the -8 level): relative RMS error 0.116 vs 0.126 on Gaussian weights, group 32.
        d = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True)) / -8
    d = d.half().float()  # quantize against the scale actually stored
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    q = torch.where(d == 0, 0.0, g / d).round_().clamp_(lo, hi).to(torch.int8).reshape(N, K)
    scales = d.reshape(N, K // group_size).half()
    if bits == 8:
        return q, scales
    u = (q + 8).to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2).contiguous(), scales


def dequantize(qweight, scales, bits, group_size, dtype=torch.float32):
    """(qweight, scales) -> W [N, K] in `dtype`."""
    _check_format(bits, group_size)
    N = qweight.shape[0]
    if bits == 8:
        q = qweight.float()
    else:
        b = qweight.reshape(N, -1, 16)
        q = torch.cat([b & 0x0F, b >> 4], dim=-1).float().sub_(8)
    K = q.numel() // N if N else qweight.shape[1] * (2 if bits == 4 else 1)
    w = q.reshape(N, K // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def kernel_available():
    """True when the C++ kernel is built and enabled (GEMMA4_NO_KERNELS=1 disables it)."""
    if os.environ.get("GEMMA4_NO_KERNELS", "") not in ("", "0"):
        return False
    global _build
    if _build is None:
        _build = _load()
        if _build is not True:
            warnings.warn(f"gemma4: int4/int8 CPU kernel unavailable ({_build}); quantized layers fall back to "
                          "dequantize + F.linear, so decoding will be several times slower", RuntimeWarning)
    return _build is True


def _load():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2, this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    from torch.utils import cpp_extension
    flags = ["/O2", "/arch:AVX2"] if os.name == "nt" else ["-O3", "-mavx2", "-mfma", "-mf16c"]
    try:
        # A plain library registering torch.ops.gemma4_kernels.qgemv: no pybind module, faster to compile.
        # torch caches the build in ~/.cache/torch_extensions and rebuilds only when the source changes.
        cpp_extension.load("gemma4_qgemv", [os.path.join(os.path.dirname(__file__), "csrc", "qgemv.cpp")],
                           extra_cflags=flags, is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, failed build, ...
        return f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    return True


def qmatmul(x, qweight, scales, bits, group_size):
    """x [..., K] (fp32/bf16/fp16) @ dequantize(qweight, scales).T -> [..., N] in x's dtype."""
    _check_format(bits, group_size)
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features but the quantized weight has K={K}")
    if K % group_size or scales.shape != (qweight.shape[0], K // group_size):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not match weight [N={qweight.shape[0]}, "
                         f"K={K}] with group_size={group_size}")
    x2 = x.reshape(-1, K)
    if 0 < x2.shape[0] <= MAX_KERNEL_ROWS and x.device.type == "cpu" and kernel_available():
        # The kernel quantizes activations to int8 per 32-block itself; it takes fp32 (a K-vector, cheap).
        out = torch.ops.gemma4_kernels.qgemv(x2.float().contiguous(), qweight, scales, bits, group_size)
    else:
        out = _dequant_matmul(x2, qweight, scales, bits, group_size)
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def _dequant_matmul(x2, qweight, scales, bits, group_size):
    # Prefill (many rows) is compute bound: an fp32 GEMM is ~7x faster than bf16 (emulated on AVX2 CPUs),
    # and dequantizing once costs little next to it.  Also the fallback when the kernel is unavailable.
    return F.linear(x2.float(), dequantize(qweight, scales, bits, group_size))
