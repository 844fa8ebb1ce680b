"""Device and CPU-feature dispatch for the model's three hot operations: projections (`linear`), RMSNorm
(`rms_norm`) and attention (`attention`). Model code calls these and reads as the architecture; which kernel
runs (our C++ kernels on a CPU, built for its instruction set; PyTorch's bf16 GEMM where the CPU has native bf16;
a blocked fp32 GEMM where bf16 is emulated; or plain PyTorch) is decided here only, from the features
gemma4.hardware detected.

Every choice keeps the reference's numbers: products sum in fp32 and round once to the activation dtype.
Our kernels have no backward: `needs_autograd` routes anything autograd must see to PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels

_KERNEL_FLOATS = (torch.float32, torch.bfloat16)  # what the CPU kernels (norm, attention, gelu) take


def needs_autograd(*tensors) -> bool:
    """True when a backward will run through this op (fine-tuning): then only differentiable PyTorch ops."""
    if not torch.is_grad_enabled():  # (inference: the common case, answered first)
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T. On a CPU, bf16 products take the path the CPU is fast at (hardware.py chooses):
      - a few rows (decode steps) go to our kernel, which reads the bf16 weights once for all of them: up to 64
        rows where bf16 arithmetic is emulated (PyTorch's bf16 GEMM there is ~6x slower than fp32, and 8 rows
        cost it 7x one row), up to 2 where the CPU multiplies bf16 natively (oneDNN's GEMM then reads the
        weight once for any number of rows, at the same speed from 3 rows on: benchmarks/bench_kernels.py);
      - more rows: PyTorch's bf16 GEMM where bf16 is native (AMX / AVX-512 BF16), else fp32 GEMMs over
        blocks of the weight converted to fp32 (`_fp32_product`)."""
    if needs_autograd(x) and not w.requires_grad:  # fine-tuning through a frozen weight
        return frozen_product(x, lambda x: linear(x, w), lambda n0, n1, k0, k1, dtype: w[n0:n1, k0:k1], w.shape,
                              views=True)
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel():
        rows = x.numel() // x.shape[-1]
        if needs_autograd(x, w):
            return F.linear(x.float(), w.float()).to(x.dtype)
        if rows <= kernels.bf16_kernel_rows() and w.dim() == 2 and kernels.kernel_available():
            return kernels.gemv_bf16(x, w)
        if rows >= 16 and not kernels.native_bf16():
            return _fp32_product(x, w)
    return F.linear(x, w)


class _FrozenProduct(torch.autograd.Function):
    """y = x @ W.T through a weight that does not train (LoRA's base, plain or quantized): the forward takes the
    inference path (the kernels), the backward computes grad_x = grad_y @ W from W itself, a block at a time
    (dequantized per block when quantized). Autograd through F.linear(x.float(), w.float()) would keep an
    fp32 copy of every weight for the backward: 2x a bf16 model's size, 8x an int4 one's."""

    @staticmethod
    def forward(ctx, x, product, block, shape, align, views):
        ctx.block, ctx.shape, ctx.align, ctx.views = block, shape, align, views
        return product(x)

    @staticmethod
    def backward(ctx, grad):
        g = frozen_grad(grad.reshape(-1, grad.shape[-1]), ctx.block, ctx.shape, ctx.align, ctx.views)
        return g.view(*grad.shape[:-1], -1), None, None, None, None, None


FROZEN_BLOCK_BYTES = 8 << 20  # the weight made per step of a blocked frozen_grad


def frozen_grad(g: torch.Tensor, block, shape, align: int = 64, views: bool = False) -> torch.Tensor:
    """grad_y [M, N] @ W [N, K] -> grad_x [M, K] in g's dtype, W read through block(n0, n1, k0, k1, dtype) ->
    W[n0:n1, k0:k1] (see frozen_product; column cuts at multiples of `align`)."""
    N, K = shape
    # bf16 gradients where the device multiplies bf16 natively (a GPU; AMX / AVX-512 BF16): grad_y @ W in bf16
    # with fp32 sums, as F.linear's own backward; elsewhere fp32 products (emulated bf16 is ~6x slower)
    native = g.dtype == torch.bfloat16 and (g.device.type != "cpu" or kernels.native_bf16())
    dtype = torch.bfloat16 if native else torch.float32
    if native and views:  # the weight itself, in one product
        return g @ block(0, N, 0, K, dtype)
    g2, size = g.to(dtype), FROZEN_BLOCK_BYTES // (2 if native else 4)  # weight elements per block
    if K > N:  # a wide input (down_proj): blocks of whole columns, each product final, written where it belongs
        # (row blocks summed into an fp32 [M, K] were 3.5 s of a 12 s QLoRA step of E2B, whose down_proj is 12288
        # wide: fresh [M, K] temporaries per block, each a new mapping to fault in)
        cols = max(align, size // N // align * align)
        cols = -(-K // (-(-K // cols) * align)) * align  # equal slices (GEMMs on a ragged last one ran slower)
        out = torch.empty(len(g), K, dtype=dtype, device=g.device)
        for k0 in range(0, K, cols):
            k1 = min(K, k0 + cols)
            torch.mm(g2, block(0, N, k0, k1, dtype).to(dtype), out=out[:, k0:k1])
        return out.to(g.dtype)
    rows = max(64, size // K)  # a tall weight (the LM head, an MLP's gate): row blocks summed in fp32 [M, K]
    out = torch.zeros(len(g), K, dtype=torch.float32, device=g.device)
    for n0 in range(0, N, rows):
        w = block(n0, min(N, n0 + rows), 0, K, dtype).to(dtype)
        if dtype == torch.float32:
            out.addmm_(g2[:, n0:n0 + len(w)], w)
        else:
            out.add_(g2[:, n0:n0 + len(w)] @ w)
    return out.to(g.dtype)


def frozen_product(x: torch.Tensor, product, block, shape, align: int = 64, views: bool = False) -> torch.Tensor:
    """product(x) = x @ W.T, differentiable in x only; W [N, K] = `shape` is read for the backward through
    block(n0, n1, k0, k1, dtype) -> W[n0:n1, k0:k1] in any float dtype (`dtype` is the product's: a quantized
    weight is dequantized straight to it), column cuts at multiples of `align`; `views`: the blocks are views of
    the stored weight (free), else made per call. See _FrozenProduct."""
    return _FrozenProduct.apply(x, product, block, shape, align, views)


def _fp32_product(x: torch.Tensor, w: torch.Tensor, block_bytes: int = 3 << 20, depth: int = 2048) -> torch.Tensor:
    """x @ w.T by fp32 GEMMs over blocks of weight rows (~3 MB as fp32), rounded to x's dtype. Bounds a bf16
    prefill's peak memory: no whole fp32 copy of a weight, and inputs wider than `depth` are taken `depth`
    columns at a time, summed in fp32 (the same sum in another order). The fp32 input and weight block live in
    buffers kept for reuse (kernels.scratch); only the result is new."""
    N, K = w.shape
    x2, width = x.reshape(-1, K), min(K, depth)
    block = min(N, max(64, min(512, block_bytes // (4 * width)) // 64 * 64))
    if K <= depth:
        x32 = kernels.scratch("input", x2.numel()).view(x2.shape).copy_(x2)  # [M, K] fp32
        out = kernels.blocked_product(x32, N, block, lambda buf, n: buf.copy_(w[n:n + len(buf)]), x.dtype)
        return out.view(*x.shape[:-1], N)
    wbuf = kernels.scratch("weights", block * width).view(block, width)
    acc = x2.new_zeros(len(x2), N, dtype=torch.float32)  # [M, N] fp32 sums over the column chunks
    for k in range(0, K, depth):
        cols = min(depth, K - k)
        xk = kernels.scratch("input", len(x2) * cols).view(len(x2), cols).copy_(x2[:, k:k + cols])
        for n in range(0, N, block):
            rows = min(block, N - n)
            acc[:, n:n + rows].addmm_(xk, wbuf[:rows, :cols].copy_(w[n:n + rows, k:k + cols]).t())
    return acc.to(x.dtype).view(*x.shape[:-1], N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference's x.float() * pow(mean(x^2) + eps, -0.5) * weight.float(), rounded to x's dtype.
    F.rms_norm computes exactly that in six ATen ops; on a CPU our kernel does it in one (a decode step runs
    ~250 norms). Compiled code fuses F.rms_norm itself."""
    if x.device.type == "cpu" and x.dtype in _KERNEL_FLOATS and (weight is None or weight.dtype in _KERNEL_FLOATS) \
            and not needs_autograd(x, weight) and not torch.compiler.is_compiling() \
            and kernels.kernel_available("rms_norm"):
        return kernels.rms_norm(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, the gated MLPs' activation, in place in `gate` (always a projection's fresh
    output) unless autograd records it. On a CPU our kernel does it in one pass, with the gelu rounded to the
    dtype as ATen's two ops round it; ATen's tanh gelu alone was 16% of a bf16 E2B prefill."""
    if gate.device.type == "cpu" and gate.dtype in _KERNEL_FLOATS and gate.dtype == up.dtype \
            and gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous() \
            and not needs_autograd(gate, up) and not torch.compiler.is_compiling() \
            and kernels.kernel_available("gelu_mul"):
        return kernels.gelu_mul(gate, up)
    if needs_autograd(gate, up):
        return F.gelu(gate, approximate="tanh") * up
    # In place: one prompt-sized [T, intermediate] tensor fewer at the peak of a prefill.
    return torch.ops.aten.gelu_(gate, approximate="tanh").mul_(up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v without a 1/sqrt(D) scale (Gemma 4's q_norm / k_norm fix the logit scale): q [B, H, T, D]
    over k, v [B, K, S, D], mask [B, 1, T, S] (True = attend) -> [B, H, T, D]."""
    if q.shape[2] <= 4:  # decode: CPU's flash-attention kernel costs ~1.5 ms a call whatever the size
        return small_query_attention(q, k, v, mask)
    return prefill_attention(q, k, v, mask)


def small_query_attention(q, k, v, mask):
    """Attention for a few queries: the query heads of a KV head are stacked as rows (no copy of K/V per query
    head), computed in (at least) fp32: CPUs emulate bf16, and a bf16 probs @ v is ~7x slower than upcasting.
    On a CPU the kernel does it in one pass over K/V (40 us instead of 190-230 for E2B's sliding layers)."""
    B, H, T, D = q.shape
    K, out_dtype = k.shape[1], q.dtype
    if q.device.type == "cpu" and all(t.dtype in _KERNEL_FLOATS for t in (q, k, v)) and not needs_autograd(q, k, v) \
            and D % 8 == 0 and k.stride(-1) == 1 and v.stride(-1) == 1 and kernels.kernel_available("decode_attention"):
        return kernels.decode_attention(q, k, v, mask)
    # (a GPU has native bf16: upcasting there only adds copies and fp32 GEMMs, 1 ms of a 6 ms E2B step)
    dtype = torch.promote_types(q.dtype, torch.float32) if q.device.type == "cpu" else q.dtype
    q, k, v = q.reshape(B, K, H // K * T, D).to(dtype), k.to(dtype), v.to(dtype)
    scores = (q @ k.transpose(-1, -2)).view(B, K, H // K, T, -1)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, T, S]
    probs = torch.softmax(scores, dim=-1).view(B, K, H // K * T, -1)
    return (probs @ v).view(B, H, T, D).to(out_dtype)


def prefill_attention(q, k, v, mask, block: int = 256):
    """SDPA (no scale) of q [B, H, T, D] over k, v [B, K, S, D] with mask [B, 1, T, S]. On a CPU, by blocks of
    256 queries over just the keys each block may see: the CPU kernel computes every masked score, and a
    sliding layer's 2,048-token prompt sees 768 of the 2,048 keys per block, a causal one half. Masked keys
    weigh exactly 0 either way. (A GPU's kernels are fast enough; the key range would cost a device sync.)"""
    k, v = k.to(q.dtype), v.to(q.dtype)  # a bf16 cache under fp32 activations (engine.kv.cache_dtype)
    gqa = k.shape[1] != q.shape[1]
    T = q.shape[2]
    if q.device.type != "cpu" or T <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=gqa)
    out = []
    for t0 in range(0, T, block):
        m = mask[:, :, t0:t0 + block]
        seen = m.any(dim=(0, 1, 2)).nonzero()  # keys that some query of the block sees
        lo, hi = (seen[0].item(), seen[-1].item() + 1) if len(seen) else (0, k.shape[2])
        out.append(F.scaled_dot_product_attention(q[:, :, t0:t0 + block], k[:, :, lo:hi], v[:, :, lo:hi],
                                                  attn_mask=m[..., lo:hi], scale=1.0, enable_gqa=gqa))
    return torch.cat(out, dim=2)
