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
import logging
import os
import platform
import re
import threading
import warnings

import torch

# Weights per scale by default: 4.25 bits per int4 weight (as mlx-lm's default) instead of Q4_0's 4.5 at group
# 32. E2B's int4 weights: 1.28 -> 1.21 GB, the difference that brings its peak RSS near 1.5 GB; decode is as fast
# (the kernel's time per weight row is the same); relative RMS error on Gaussian weights 0.083 -> 0.090.
DEFAULT_GROUP_SIZE = 64
MAX_KERNEL_ROWS = 16  # decode-sized products (1 token, or a few drafted ones) go to the kernel; prefill to a GEMM
# bf16 weights: up to 64 rows go to gemv_bf16. The fp32 GEMM path converts each weight block to fp32 first (~1.3
# ns a weight here), and measured 2-4x slower than the kernel at 16-64 rows and about even at 128 (E2B shapes,
# 2026-11-23); with the limit at 16, a step of 16 decodes (the engine's default max_seqs) took 4.8 s, not ~1.3.
MAX_BF16_KERNEL_ROWS = 64
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEQUANT_SLICE = 1 << 19  # bytes of packed weight dequantized at a time for prefill (-> 4 MB fp32 from int4)

_build = None  # None: not tried yet; True: op registered; str: why it is unavailable


def _check_format(bits, group_size):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (the kernel's block), got {group_size!r}")


def _check_weight(qweight, scales, bits, group_size):
    """-> (N, K) of the weight that (qweight, scales) encode."""
    _check_format(bits, group_size)
    want = torch.uint8 if bits == 4 else torch.int8
    if qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"qweight for bits={bits} must be a 2-D {want} tensor, got {qweight.dim()}-D {qweight.dtype}")
    N, K = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    if K % group_size or scales.dtype != torch.float16 or scales.shape != (N, K // group_size):
        raise ValueError(f"scales must be float16 [N, K // group_size] = [{N}, {K / group_size:g}] for a weight "
                         f"[{N}, {K}] with group_size={group_size}, got {scales.dtype} {list(scales.shape)}")
    return N, K


def quantize(w, bits, group_size=DEFAULT_GROUP_SIZE):
    """w [N, K] float -> (qweight, scales); see the module docstring for the format."""
    _check_format(bits, group_size)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("quantize expects a 2-D floating point weight [N, K], got "
                         + (f"{w.dim()}-D {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__))
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"K={K} (the input dim) is not a multiple of group_size={group_size}")
    q = torch.empty(N, K, dtype=torch.int8)
    scales = torch.empty(N, K // group_size, dtype=torch.float16)
    rows = max(1, (1 << 22) // max(K, 1))  # chunks bound the fp32 temporaries (an embedding has 400M weights)
    for i in range(0, N, rows):
        q[i:i + rows], scales[i:i + rows] = _quantize_groups(w[i:i + rows].detach(), bits, group_size)
    if bits == 8:
        return q, scales
    u = (q + 8).view(torch.uint8).reshape(N, K // 32, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2), scales


def _quantize_groups(w, bits, group_size):
    """w [n, K] -> (q int8 [n, K], scales fp16 [n, K // group_size])."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    if bits == 8:  # absmax / 127: the rounding error (~0.5% relative) is far below int4's
        d = (g.abs().amax(-1) / 127).half()
        q = _round(g, d, -127, 127)
    else:
        # Start from Q4_0's scale (the largest-magnitude weight maps to -8, using the asymmetric range fully;
        # absmax/7 wastes the -8 level) and from a 10% smaller one (less rounding error, that weight clipped);
        # refit each by least squares to its rounded q; keep the better per group.  Relative RMS error on
        # Gaussian weights, group 32: absmax/7 0.097, Q4_0 0.086, this 0.083 (group 128: 0.117, 0.103, 0.098).
        lo, hi = torch.aminmax(g, dim=-1)
        peak = torch.where(hi >= -lo, hi, lo)  # the signed largest-magnitude weight
        for shrink in (1.0, 1.1):
            qs = _round(g, (peak / (-8 * shrink)).half(), -8, 7)
            qg, qq = (qs * g).sum(-1), (qs * qs).sum(-1)
            ds = (qg / qq.clamp_min(1)).half()
            err = ds.float() * (ds.float() * qq - 2 * qg)  # |q*d - g|^2 - |g|^2
            if shrink == 1.0:
                q, d, best = qs, ds, err
            else:
                better = err < best
                q, d = torch.where(better.unsqueeze(-1), qs, q), torch.where(better, ds, d)
    return q.to(torch.int8).reshape(w.shape), d


def _round(g, d, lo, hi):
    """Groups g [n, G, group] / scales d [n, G] (fp16, as stored) -> rounded q, as float."""
    inv = torch.where(d == 0, 0.0, 1.0 / d.float()).unsqueeze(-1)
    return (g * inv).round_().clamp_(lo, hi)


def dequantize(qweight, scales, bits, group_size, dtype=torch.float32, out=None):
    """(qweight, scales) -> W [N, K] in `dtype` (written into `out`, a contiguous fp32 [N, K], if given)."""
    N, K = _check_weight(qweight, scales, bits, group_size)
    if out is not None and not (out.dtype == torch.float32 and out.is_contiguous() and out.shape == (N, K)):
        raise ValueError(f"out must be a contiguous float32 [{N}, {K}] tensor, got {out.dtype} {list(out.shape)}")
    if qweight.device.type == "cpu" and kernel_available():  # ~10x faster than the PyTorch ops below
        if out is not None:
            torch.ops.gemma4_kernels.dequant_into(qweight.contiguous(), scales.contiguous(), bits, group_size, out)
            return out
        w = torch.ops.gemma4_kernels.dequant(qweight.contiguous(), scales.contiguous(), bits, group_size)
        return w.to(dtype)
    if out is not None:
        return out.copy_(dequantize(qweight, scales, bits, group_size))
    if bits == 8:
        q = qweight.float()
    else:
        b = qweight.reshape(N, K // 32, 16)
        q = torch.cat([b & 0x0F, b >> 4], dim=-1).float().sub_(8)
    w = q.reshape(N, K // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def kernel_available():
    """True when the C++ kernel is enabled (GEMMA4_NO_KERNELS=1 disables it) and built (on the first call)."""
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
    # OpenMP: at::parallel_for is a header template that runs serially unless the extension itself is built
    # with OpenMP (it then shares torch's libgomp and its torch.set_num_threads setting).
    flags = ["/O2", "/arch:AVX2", "/openmp"] if os.name == "nt" else ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # quiet: a failure is summed up in our one warning
    try:
        # A plain library registering torch.ops.gemma4_kernels.qgemv: no pybind module, faster to compile.
        # torch caches the build in ~/.cache/torch_extensions and rebuilds only when the source changes.
        cpp_extension.load("gemma4_qgemv", [os.path.join(os.path.dirname(__file__), "csrc", "qgemv.cpp")],
                           extra_cflags=flags, extra_ldflags=[] if os.name == "nt" else ["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, failed build, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = next((line for line in lines if re.search(r"error:|not found|no such file", line, re.I)), lines[0])
        return f"build failed: {cause[:200]}"
    finally:
        log.setLevel(level)
    # Shapes for torch.compile, which traces the op without running it (the decode step can be compiled).
    torch.library.register_fake("gemma4_kernels::qgemv")(
        lambda x, qweight, scales, bits, group_size: x.new_empty(x.shape[0], qweight.shape[0]))
    torch.library.register_fake("gemma4_kernels::dequant_into")(lambda qweight, scales, bits, group_size, out: None)
    torch.library.register_fake("gemma4_kernels::gemv_bf16")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("gemma4_kernels::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("gemma4_kernels::decode_attention")(lambda q, k, v, mask: torch.empty_like(q))
    return True


def qmatmul(x, qweight, scales, bits, group_size):
    """x [..., K] (fp32/bf16/fp16) @ dequantize(qweight, scales).T -> [..., N] in x's dtype."""
    N, K = _check_weight(qweight, scales, bits, group_size)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features but the quantized weight has K={K}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if 0 < x2.shape[0] <= MAX_KERNEL_ROWS and x.dtype in _KERNEL_DTYPES and x.device.type == "cpu" \
            and kernel_available():
        # Takes fp32/bf16/fp16 and answers in the same dtype: a separate cast costs ~5 us per call in Python,
        # noticeable over the ~250 small matmuls of a decode step.
        out = torch.ops.gemma4_kernels.qgemv(x2.contiguous(), qweight.contiguous(), scales.contiguous(),
                                             bits, group_size)
    else:
        out = _dequant_matmul(x2, qweight, scales, bits, group_size).to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def gemv_bf16(x, w):
    """x [..., K] bf16 @ w [N, K].T (bf16, CPU, kernel available: see `model.text.matmul`) -> [..., N] bf16."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.gemma4_kernels.gemv_bf16(x2, w.contiguous())
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w.shape[0])


def rms_norm(x, weight, eps):
    """Gemma's RMSNorm over the last dim of x (fp32/bf16 CPU; see `model.text.RMSNorm`) in one op."""
    return torch.ops.gemma4_kernels.rms_norm(x.contiguous(), weight, eps)


def decode_attention(q, k, v, mask):
    """softmax(q k^T masked) v without a 1/sqrt(D) scale, q [B, H, T, D] over k, v [B, K, S, D] (fp32/bf16 CPU,
    last dim contiguous) with mask [B, 1, T, S]; fp32 inside, out in q's dtype (see `model.text`). A row that
    sees no key gets zeros."""
    return torch.ops.gemma4_kernels.decode_attention(q, k, v, mask)


def _dequant_matmul(x2, qweight, scales, bits, group_size):
    # Prefill (many rows) is compute bound: an fp32 GEMM is ~7x faster than bf16 (emulated on AVX2 CPUs).
    # The weight is dequantized in slices of ~4 MB: a whole fp32 copy of a large weight is a fresh mmap each
    # call, whose page faults alone cost more than the dequantization (17 ms for [6144, 1536]).
    # Also the fallback when the kernel is unavailable.
    N, K = _check_weight(qweight, scales, bits, group_size)
    rows = min(N, max(1, _DEQUANT_SLICE // qweight.shape[1]))
    return blocked_product(x2.float(), N, rows, lambda buf, n: dequantize(
        qweight[n:n + len(buf)], scales[n:n + len(buf)], bits, group_size, out=buf))


def blocked_product(x32, N, rows, fill, dtype=torch.float32):
    """x32 [M, K] fp32 @ W.T -> [M, N] in `dtype`, for prefill's fp32 GEMMs over bf16 or quantized weights:
    W [N, K] is made `rows` rows at a time by fill(buf, n), which writes W[n:n + len(buf)] as fp32 into buf
    and returns it. The weight block and its product live in buffers kept for reuse (`scratch`)."""
    M, K = x32.shape
    w, product = scratch("weights", rows * K).view(rows, K), scratch("product", M * rows)
    out = x32.new_empty(M, N, dtype=dtype)
    for n in range(0, N, rows):
        r = min(rows, N - n)
        out[:, n:n + r] = torch.mm(x32, fill(w[:r], n).t(), out=product[:M * r].view(M, r))
    return out


_scratch = threading.local()  # per thread: fp32 buffers of the prefill products, reused across calls


def scratch(name: str, n: int) -> torch.Tensor:
    """n fp32 elements of a per-thread buffer kept for reuse (grown when too small): prefill's fp32 weight
    slices, inputs and products. Fresh ones each call were ~1 GB of new pages per 512-token E2B prefill,
    whose page faults cost 5-10% of it (gemma4.memory.unpool_large_buffers maps every large buffer anew)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buf = torch.empty(n, dtype=torch.float32)
        setattr(_scratch, name, buf)
    return buf[:n]
