"""Weight-only int4 / int8 quantization and the matrix x few-rows kernels used for decoding.

Format (group-wise, symmetric, along K = the input dim), for a weight W [N, K]:
  scales   float16 [N, K // group_size]   one scale per output row and group of `group_size` weights
  qweight  int8:  int8  [N, K]            q in [-127, 127]
           int4:  uint8 [N, K // 2]       q in [-8, 7]; per 32-block of K, byte j holds (q[j] + 8) in the low
                                          nibble and (q[j + 16] + 8) in the high nibble (llama.cpp's Q4_0
                                          order), so the kernel unpacks 32 weights with one AND and one shift.
  W[n, k] ~= scales[n, k // group_size] * q[n, k]

Why our own kernel: on 2-core laptop-class CPUs, PyTorch's packed int8/int4 kernels stream weights at ~11 and
~3 GB/s, below a plain bf16 F.linear (~18 GB/s), while a decode step is purely weight-bandwidth bound.
csrc/ (llama.cpp's Q4_0 x Q8_0 scheme) is compiled on first use for the best instruction set this CPU has
(gemma4.hardware: AVX2, AVX-512 VNNI / BF16, ARM NEON / dotprod); without a compiler or any of those we fall
back to dequantize + F.linear, which is exact but slower, and say so once.
"""
import logging
import os
import re
import threading
import warnings

import torch

from . import hardware

# Weights per scale by default: 4.25 bits per int4 weight (as mlx-lm's default) instead of Q4_0's 4.5 at group
# 32. E2B's int4 weights: 1.28 -> 1.21 GB, the difference that brings its peak RSS near 1.5 GB; decode is as fast
# (the kernel's time per weight row is the same); relative RMS error on Gaussian weights 0.083 -> 0.090.
DEFAULT_GROUP_SIZE = 64
MAX_KERNEL_ROWS = 16  # decode-sized products (1 token, or a few drafted ones) go to the kernel; prefill to a GEMM
# bf16 weights on CPUs that emulate bf16: up to 64 rows go to gemv_bf16. The fp32 GEMM path converts each weight
# block to fp32 first (~1.3 ns a weight), and measured 2-4x slower than the kernel at 16-64 rows and about even at
# 128 (E2B shapes); with the limit at 16, a step of 16 decodes (the engine's default max_seqs) took 4.8 s, not ~1.3.
MAX_BF16_KERNEL_ROWS = 64
# Where bf16 is native, PyTorch's GEMM (oneDNN, AMX) reads the weight once for any number of rows: from 3 rows on
# it is as fast as the tiled kernel or faster (benchmarks/bench_kernels.py --rows 1 2 3 4). The avx512_bf16
# build's 512-bit path (dot_bf16_rows) reads weights in huge pages at one row's speed up to 8 rows, where oneDNN
# took 1.4x one row's time: a 5-row verification step of speculative decoding.
NATIVE_BF16_KERNEL_ROWS = 2
NATIVE_BF16_KERNEL_ROWS_512 = 8
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bytes of packed weight dequantized at a time for prefill: to fp32 where bf16 is emulated (-> 4 MB from int4),
# to bf16 where it is native (-> 8 MB): oneDNN's bf16 GEMM over 682-row slices ran an E2B int4 prefill at 0.8x
# the bf16 model's, over 2,730-row ones at 0.95x.
_DEQUANT_SLICE = 1 << 19
_DEQUANT_SLICE_BF16 = 1 << 21

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
    """(qweight, scales) -> W [N, K] in `dtype` (written into `out`, a contiguous fp32 or bf16 [N, K], if given;
    bf16 rounds each weight to nearest even)."""
    N, K = _check_weight(qweight, scales, bits, group_size)
    if out is not None and not (out.dtype in (torch.float32, torch.bfloat16) and out.is_contiguous()
                                and out.shape == (N, K)):
        raise ValueError(f"out must be a contiguous float32 or bfloat16 [{N}, {K}] tensor, got {out.dtype} "
                         f"{list(out.shape)}")
    if qweight.device.type == "cpu" and kernel_available():  # ~10x faster than the PyTorch ops below
        if out is not None:
            _ops().dequant_into(qweight.contiguous(), scales.contiguous(), bits, group_size, out)
            return out
        w = _ops().dequant(qweight.contiguous(), scales.contiguous(), bits, group_size)
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


def kernel_available(op: str = "qgemv") -> bool:
    """True when the C++ kernels for this CPU (hardware.isa()) are enabled (GEMMA4_NO_KERNELS=1 disables them),
    built (on the first call) and include `op` (RMSNorm, decode attention and gelu_mul are x86 only). Read on
    every projection: resolved once (`reset` forgets it)."""
    ns = _resolve()[1]
    return ns is not None and (op == "qgemv" or hasattr(ns, op))


def unavailable_reason() -> str | None:
    """Why the kernels are not used (None when they are)."""
    return _resolve()[2]


def _ops():
    """The ops of the build in use: torch.ops.gemma4_<isa>."""
    return _resolve()[1]


def bf16_kernel_rows() -> int:
    """Up to how many rows a bf16 product goes to gemv_bf16 (see ops.linear)."""
    if not native_bf16():
        return MAX_BF16_KERNEL_ROWS
    return NATIVE_BF16_KERNEL_ROWS_512 if _resolve()[0] == "avx512_bf16" else NATIVE_BF16_KERNEL_ROWS


def native_bf16() -> bool:
    """hardware.native_bf16(), resolved once (read on every projection, also inside compiled code)."""
    global _native
    if _native is None:
        _native = hardware.native_bf16()
    return _native


_native = None
_current = None  # (isa, its ops or None, why not): resolved on first use, reset by hardware.select
_builds: dict = {}  # isa -> True (ops registered) or why the build failed


def _resolve():
    global _current
    if _current is None:
        isa = hardware.isa()
        if os.environ.get("GEMMA4_NO_KERNELS", "") not in ("", "0"):
            _current = (isa, None, "disabled by GEMMA4_NO_KERNELS")
        elif isa is None:
            _current = (None, None, f"no kernel build for this CPU ({hardware.cpu().arch}: needs AVX2 or ARM NEON)")
        else:
            if isa not in _builds:
                _builds[isa] = _load(isa)
                if _builds[isa] is not True:
                    warnings.warn(f"gemma4: CPU kernels ({isa}) unavailable ({_builds[isa]}); quantized layers fall "
                                  "back to dequantize + F.linear, so decoding will be several times slower",
                                  RuntimeWarning)
            ok = _builds[isa] is True
            _current = (isa, getattr(torch.ops, f"gemma4_{isa}") if ok else None, None if ok else _builds[isa])
    return _current


def reset() -> None:
    """Forget the resolved build and bf16 GEMM (hardware.select or GEMMA4_NO_KERNELS changed the choice)."""
    global _current, _native
    _current = _native = None


def _load(isa: str):
    """Build csrc/qgemv.cpp for `isa` (flags from hardware.ISA_FLAGS) and register its ops -> True or why not."""
    from torch.utils import cpp_extension
    # OpenMP: at::parallel_for is a header template that runs serially unless the extension itself is built
    # with OpenMP (it then shares torch's libgomp and its torch.set_num_threads setting).
    if os.name == "nt":
        flags = ["/O2", "/openmp"] + (["/arch:AVX512"] if isa.startswith("avx512") else ["/arch:AVX2"])
    else:
        flags = ["-O3", "-fopenmp"] + hardware.ISA_FLAGS[isa]
    flags.append(f"-DGEMMA4_OPS=gemma4_{isa}")
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # quiet: a failure is summed up in our one warning
    try:
        # A plain library registering torch.ops.gemma4_<isa>.*: no pybind module, faster to compile.
        # torch caches the build in ~/.cache/torch_extensions and rebuilds only when the sources change.
        csrc = os.path.join(os.path.dirname(__file__), "csrc")
        cpp_extension.load(f"gemma4_kernels_{isa}", [os.path.join(csrc, "qgemv.cpp")], extra_cflags=flags,
                           extra_ldflags=[] if os.name == "nt" else ["-fopenmp"], extra_include_paths=[csrc],
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, failed build, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = next((line for line in lines if re.search(r"error:|not found|no such file", line, re.I)), lines[0])
        return f"build failed: {cause[:200]}"
    finally:
        log.setLevel(level)
    # Shapes for torch.compile, which traces the ops without running them (the decode step can be compiled).
    ns, fake = f"gemma4_{isa}", torch.library.register_fake
    fake(f"{ns}::qgemv")(lambda x, qweight, scales, bits, group_size: x.new_empty(x.shape[0], qweight.shape[0]))
    fake(f"{ns}::dequant_into")(lambda qweight, scales, bits, group_size, out: None)
    fake(f"{ns}::gemv_bf16")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    if hasattr(getattr(torch.ops, ns), "rms_norm"):
        fake(f"{ns}::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
        fake(f"{ns}::decode_attention")(lambda q, k, v, mask: torch.empty_like(q))
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
        out = _ops().qgemv(x2.contiguous(), qweight.contiguous(), scales.contiguous(), bits, group_size)
    else:
        out = _dequant_matmul(x2, qweight, scales, bits, group_size).to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def gemv_bf16(x, w):
    """x [..., K] bf16 @ w [N, K].T (bf16, CPU, kernel available: see `model.text.matmul`) -> [..., N] bf16."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = _ops().gemv_bf16(x2, w.contiguous())
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w.shape[0])


def rms_norm(x, weight, eps):
    """Gemma's RMSNorm over the last dim of x (fp32/bf16 CPU; see `model.text.RMSNorm`) in one op."""
    return _ops().rms_norm(x.contiguous(), weight, eps)


def gelu_mul(gate, up):
    """gate = gelu_tanh(gate) * up in place (fp32/bf16 CPU, contiguous, one shape and dtype; see `ops.gelu_mul`)."""
    _ops().gelu_mul(gate, up)
    return gate


def decode_attention(q, k, v, mask):
    """softmax(q k^T masked) v without a 1/sqrt(D) scale, q [B, H, T, D] over k, v [B, K, S, D] (fp32/bf16 CPU,
    last dim contiguous) with mask [B, 1, T, S]; fp32 inside, out in q's dtype (see `model.text`). A row that
    sees no key gets zeros."""
    return _ops().decode_attention(q, k, v, mask)


def _dequant_matmul(x2, qweight, scales, bits, group_size):
    # Prefill (many rows) is compute bound: it runs as GEMMs over slices of the weight dequantized to bf16 where
    # the CPU multiplies bf16 natively (hardware.native_bf16), else to fp32 (bf16 is emulated: ~7x slower).
    # Slices into buffers kept for reuse: a whole copy of a large weight is a fresh mmap each call, whose page
    # faults alone cost more than the dequantization (17 ms for [6144, 1536]). Also the fallback when the kernel
    # is unavailable.
    N, K = _check_weight(qweight, scales, bits, group_size)
    in_bf16 = x2.dtype == torch.bfloat16 and native_bf16()
    rows = min(N, max(1, (_DEQUANT_SLICE_BF16 if in_bf16 else _DEQUANT_SLICE) // qweight.shape[1]))
    if in_bf16:  # slices of equal size (6144 rows: 3 x 2048, not 2730 + 2730 + 684, whose GEMM ran at half speed)
        slices = -(-N // rows)
        rows = min(N, -(-N // (slices * 64)) * 64)
    x = x2 if in_bf16 else x2.float()
    return blocked_product(x, N, rows, lambda buf, n: dequantize(
        qweight[n:n + len(buf)], scales[n:n + len(buf)], bits, group_size, out=buf))


def blocked_product(x, N, rows, fill, dtype=None):
    """x [M, K] (fp32, or bf16 on CPUs with native bf16) @ W.T -> [M, N] in `dtype` (default x's), for prefill's
    GEMMs over bf16 or quantized weights: W [N, K] is made `rows` rows at a time by fill(buf, n), which writes
    W[n:n + len(buf)] in x's dtype into buf and returns it. The weight block (and the product, where it is
    converted to `dtype`) live in buffers kept for reuse (`scratch`)."""
    M, K = x.shape
    w = scratch("weights", rows * K, x.dtype).view(rows, K)
    out = x.new_empty(M, N, dtype=dtype or x.dtype)
    product = scratch("product", M * rows, x.dtype) if out.dtype != x.dtype else None
    for n in range(0, N, rows):
        r = min(rows, N - n)
        if out.dtype == x.dtype:  # straight into the output's columns: a copy per slice was 7% of an int4 prefill
            torch.mm(x, fill(w[:r], n).t(), out=out[:, n:n + r])
        else:
            out[:, n:n + r] = torch.mm(x, fill(w[:r], n).t(), out=product[:M * r].view(M, r))
    return out


_scratch = threading.local()  # per thread: buffers of the prefill products, reused across calls


def scratch(name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n elements of a per-thread buffer kept for reuse (grown when too small): prefill's weight slices, inputs
    and products. Fresh ones each call were ~1 GB of new pages per 512-token E2B prefill, whose page faults
    cost 5-10% of it (where gemma4.memory.configure_heap maps every large buffer anew)."""
    key = f"{name}_{str(dtype).removeprefix('torch.')}"
    buf = getattr(_scratch, key, None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buf = torch.empty(n, dtype=dtype)
        setattr(_scratch, key, buf)
    return buf[:n]
