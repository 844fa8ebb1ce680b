"""Weight-only int4 / int8 quantization (gemma4.kernels) and its decode kernels (csrc/qgemv.cpp)."""
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from gemma4 import hardware, kernels
from gemma4.kernels import dequantize, qmatmul, quantize

# (bits, group_size) -> bound on the relative RMS error of dequantize(quantize(w)) for Gaussian w.
# Measured: int4 0.0827 / 0.0911 / 0.0980, int8 0.0053 / 0.0059 / 0.0065.
ROUNDTRIP = {(4, 32): 0.085, (4, 64): 0.094, (4, 128): 0.101,
             (8, 32): 0.0055, (8, 64): 0.0061, (8, 128): 0.0067}

# (K, N): K from one block to the E2B MLP width (odd block counts exercise the unpaired int4 block);
# N not a multiple of 8; N * K large enough at 1536 x 1000 for the kernel to split rows across threads.
SHAPES = [(32, 37), (64, 37), (96, 13), (1536, 300), (1536, 1000), (6144, 101)]
# Group sizes: one scale per 32-block, and 2, 3 (the scalar path), 4 and 8 blocks per scale.
CASES = [(bits, gs, K, N) for bits in (4, 8) for gs in (32, 64, 96, 128, 256) for K, N in SHAPES if K % gs == 0]

# The kernel rounds activations to int8 per 32-block (step amax/127, ~0.017 sigma for a Gaussian block),
# ~0.5% relative RMS on the output; small outputs (37 values) fluctuate up to 0.8% (measured).
KERNEL_RTOL = 0.012


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def q8_emulation(x, wd):
    """What the kernel computes: x rounded per 32-block to int8 with scale amax/127, then an exact product."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) * (1 / 127)
    q = (xb * torch.where(d > 0, 1 / d, 0)).round()
    return (q * d).reshape(x.shape).double() @ wd.double().T


@pytest.fixture(scope="module")
def kernel():
    if not kernels.kernel_available():
        pytest.skip(f"int4/int8 kernel unavailable: {kernels.unavailable_reason()}")


X86_ISAS = [name for name, _, _ in hardware.ISAS if not name.startswith("neon")]


@pytest.fixture(params=X86_ISAS)
def isa(request):
    """Each kernel build this CPU can run, forced in turn (the others are skipped, saying why)."""
    if request.param not in hardware.cpu().isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels (it runs: {hardware.cpu().isas()})")
    hardware.select(isa=request.param)
    try:
        if not kernels.kernel_available():
            pytest.skip(f"{request.param} kernels unavailable: {kernels.unavailable_reason()}")
        yield request.param
    finally:
        hardware.select()


@pytest.mark.parametrize("bits,group_size", sorted(ROUNDTRIP))
def test_roundtrip_error(bits, group_size):
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, bits, group_size)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.shape == (256, 4096 * bits // 8) and s.dtype == torch.float16 and s.shape == (256, 4096 // group_size)
    assert rel(dequantize(q, s, bits, group_size), w) < ROUNDTRIP[bits, group_size]
    # dtype argument; bf16 weights are accepted as input
    assert dequantize(q, s, bits, group_size, dtype=torch.bfloat16).dtype == torch.bfloat16
    q2, s2 = quantize(w.bfloat16(), bits, group_size)
    assert rel(dequantize(q2, s2, bits, group_size), w.bfloat16().float()) < ROUNDTRIP[bits, group_size]


def test_int4_layout():
    """Byte j of a 32-block: element j in the low nibble, element j + 16 in the high nibble, both offset by +8."""
    vals = torch.arange(64).remainder(16).sub(8).float().reshape(1, 64)  # -8..7 twice: exact with scale 1
    q, s = quantize(vals, 4, 32)
    assert s.tolist() == [[1.0, 1.0]]
    b = q.reshape(2, 16)
    v = vals.reshape(2, 32).to(torch.int64) + 8
    assert torch.equal(b & 0x0F, v[:, :16].to(torch.uint8)) and torch.equal(b >> 4, v[:, 16:].to(torch.uint8))
    assert torch.equal(dequantize(q, s, 4, 32), vals)


def test_zero_groups():
    w = torch.zeros(3, 64)
    w[1, 32:] = torch.randn(32)
    for bits in (4, 8):
        q, s = quantize(w, bits, 32)
        assert torch.isfinite(s.float()).all() and s[0].tolist() == [0.0, 0.0]
        assert torch.equal(dequantize(q, s, bits, 32)[0], w[0])


@pytest.mark.parametrize("bits,group_size,K,N", CASES)
def test_kernel(isa, bits, group_size, K, N):
    g = torch.Generator().manual_seed(K * N + bits)
    q, s = quantize(torch.randn(N, K, generator=g), bits, group_size)
    wd = dequantize(q, s, bits, group_size)
    for M in (1, 3, 16):
        x = torch.randn(M, K, generator=g)
        out = qmatmul(x, q, s, bits, group_size)
        assert out.dtype == torch.float32 and out.shape == (M, N)
        # Bit-level check of the integer arithmetic: only fp32 accumulation order differs (measured 3e-7).
        emu = q8_emulation(x, wd)
        assert (out.double() - emu).abs().max() <= 2e-6 * emu.abs().max()
        assert rel(out, x @ wd.T) < KERNEL_RTOL
        for dtype in (torch.bfloat16, torch.float16):  # converted inside the kernel; output in x's dtype
            xl = x.to(dtype)
            out = qmatmul(xl, q, s, bits, group_size)
            assert out.dtype == dtype
            assert rel(out, xl.float() @ wd.T) < KERNEL_RTOL + 2 ** -8


@pytest.mark.parametrize("bits", [4, 8])
def test_fallback_is_exact(bits, monkeypatch, no_kernels):
    """GEMMA4_NO_KERNELS=1: dequantize + fp32 F.linear (where bf16 is emulated), equal to the reference up to
    fp32 rounding."""
    monkeypatch.setattr(hardware, "_chosen", {"native_bf16": False})
    monkeypatch.setattr(kernels, "_native", None)
    assert not kernels.kernel_available()
    q, s = quantize(torch.randn(300, 1536), bits, 64)
    wd = dequantize(q, s, bits, 64)
    for x in (torch.randn(1, 1536), torch.randn(2, 3, 1536).bfloat16()):
        out = qmatmul(x, q, s, bits, 64)
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], 300)
        torch.testing.assert_close(out, (x.float() @ wd.T).to(x.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_dequantize_kernel_is_exact(isa, bits, group_size, monkeypatch):
    q, s = quantize(torch.randn(37, 384), bits, group_size)
    fast = dequantize(q, s, bits, group_size)
    into = torch.full((37, 384), float("nan"))  # prefill's reused buffer
    assert dequantize(q, s, bits, group_size, out=into) is into and torch.equal(into, fast)
    into16 = torch.full((37, 384), float("nan"), dtype=torch.bfloat16)  # native-bf16 prefill's buffer
    assert dequantize(q, s, bits, group_size, out=into16) is into16 and torch.equal(into16, fast.bfloat16())
    for bad in (torch.empty(37, 383), torch.empty(37, 384, dtype=torch.float64), torch.empty(384, 37).t()):
        with pytest.raises(RuntimeError, match="out must be a contiguous float32 or bfloat16 \\[37, 384\\]"):
            kernels._ops().dequant_into(q, s, bits, group_size, bad)
    monkeypatch.setenv("GEMMA4_NO_KERNELS", "1")
    kernels.reset()  # resolved once: the isa fixture's select() resolves again at teardown
    assert torch.equal(fast, dequantize(q, s, bits, group_size))  # q * fp16 scale is exact in fp32
    into.fill_(float("nan"))
    assert dequantize(q, s, bits, group_size, out=into) is into and torch.equal(into, fast)
    into16.fill_(float("nan"))
    assert dequantize(q, s, bits, group_size, out=into16) is into16 and torch.equal(into16, fast.bfloat16())
    for bad in (torch.empty(1, 384), torch.empty(37, 384, dtype=torch.float64), torch.empty(384, 37).t()):
        with pytest.raises(ValueError, match="out must be a contiguous float32 or bfloat16 \\[37, 384\\] tensor"):
            dequantize(q, s, bits, group_size, out=bad)  # both paths: checked before either runs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("slice_bytes", [1 << 19, 1000])
def test_many_rows_use_dequantized_gemm(bits, slice_bytes, monkeypatch):
    """More than 16 rows (prefill) go through the fp32 GEMM, by weight slices: exact, unlike the kernel's ~0.5%."""
    for name in ("_DEQUANT_SLICE", "_DEQUANT_SLICE_BF16"):  # 1000: slices of 7 / 3 rows, a ragged last one
        monkeypatch.setattr(kernels, name, slice_bytes)
    q, s = quantize(torch.randn(64, 256), bits, 32)
    wd = dequantize(q, s, bits, 32)
    x = torch.randn(3, 7, 256)  # 21 rows after flattening
    out = qmatmul(x, q, s, bits, 32)
    assert out.shape == (3, 7, 64)
    # (fp32 GEMMs over slices vs the whole: BLAS blocking changes the summation order by the thread count)
    torch.testing.assert_close(out, x @ wd.T, rtol=1e-4, atol=1e-4)
    assert qmatmul(torch.randn(0, 256), q, s, bits, 32).shape == (0, 64)
    x = torch.randn(1, 256, dtype=torch.float64)  # not a kernel dtype: the GEMM, in float64 out
    assert qmatmul(x, q, s, bits, 32).dtype == torch.float64


def test_leading_dims(kernel):
    q, s = quantize(torch.randn(40, 128), 4, 32)
    x = torch.randn(2, 1, 128, dtype=torch.bfloat16)
    out = qmatmul(x, q, s, 4, 32)
    assert out.shape == (2, 1, 40) and out.dtype == torch.bfloat16
    assert rel(out, x.float() @ dequantize(q, s, 4, 32).T) < KERNEL_RTOL + 2 ** -8


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("GEMMA4_NO_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_builds", {})
    monkeypatch.setattr(kernels, "_current", None)
    monkeypatch.setattr(kernels, "_load", lambda isa: "build failed: no compiler")
    q, s = quantize(torch.randn(8, 64), 8, 32)
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="no compiler.*slower"):
        out = qmatmul(x, q, s, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        qmatmul(x, q, s, 8, 32)
    torch.testing.assert_close(out, x @ dequantize(q, s, 8, 32).T)


@pytest.mark.parametrize("call,message", [
    (lambda: quantize(torch.randn(4, 64), 3), "bits must be 4 or 8"),
    (lambda: quantize(torch.randn(4, 64), 4, 48), "multiple of 32"),
    (lambda: quantize(torch.randn(4, 64), 4, 0), "multiple of 32"),
    (lambda: quantize(torch.randn(4, 96), 4, 64), "K=96 .* not a multiple of group_size=64"),
    (lambda: quantize(torch.randn(64), 4), "2-D"),
    (lambda: quantize(torch.randn(2, 4, 64), 8), "2-D"),
    (lambda: quantize(torch.ones(4, 64, dtype=torch.int32), 8), "floating point"),
    (lambda: dequantize(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2).half(), 5, 32), "bits"),
    (lambda: dequantize(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 2).half(), 4, 32), "uint8"),
    (lambda: qmatmul(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2).half(), 8, 32),
     "int8"),
    (lambda: qmatmul(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), 4, 32),
     "scales must be float16"),
    (lambda: qmatmul(torch.randn(1, 32), *quantize(torch.randn(4, 64), 4, 32), 4, 32), "32 input features .* K=64"),
    (lambda: qmatmul(torch.randn(1, 64), quantize(torch.randn(4, 64), 4)[0], torch.ones(4, 1).half(), 4, 32),
     r"scales must be float16 \[N, K // group_size\] = \[4, 2\]"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# (M rows of x, K, N): one row (bf16 x, 4 accumulators); 2+ rows (x in tiles of <= 4 rows over pairs of
# weight rows: 5 rows are tiles of 2 and 3, 9 of 3 x 3, 11 of 3, 4 and 4; an odd N leaves one weight row
# alone; the avx512_bf16 build takes 2-8 rows as they are, one weight row a pass, 32 values a step, then 128);
# K not a multiple of 16 or 32 (the scalar tails; tiles then start off 32-byte alignment); threads split N.
BF16_CASES = [(1, 16, 5), (1, 40, 3), (2, 1536, 7), (3, 1536, 300), (4, 1536, 1001), (5, 48, 9),
              (6, 1000, 13), (7, 168, 3), (8, 6144, 101), (9, 40, 17), (11, 1536, 64), (16, 72, 33)]


@pytest.mark.parametrize("M,K,N", BF16_CASES)
def test_bf16_kernel(isa, M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    out = kernels._ops().gemv_bf16(x, w)
    exact = x.double() @ w.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    # fp32 accumulation, one rounding to bf16: within half a bf16 step (2^-9 relative) plus summation error
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4 * K ** 0.5).all()


@pytest.fixture(params=[False, True], ids=["emulated-bf16", "native-bf16"])
def bf16_gemm(request):
    """Prefill's bf16 product forced to the fp32 blocks (emulated bf16) or to PyTorch's bf16 GEMM (native): both
    are correct on any CPU, only their speed depends on it."""
    hardware.select(native_bf16=request.param)
    yield request.param
    hardware.select()


def test_bf16_matmul_routes_decode_rows_to_the_kernel(kernel, monkeypatch):
    from gemma4.ops import linear as matmul

    monkeypatch.setattr(hardware, "_chosen", {"native_bf16": False})  # bf16 emulated; restored after the test
    monkeypatch.setattr(kernels, "_native", None)

    w, calls = torch.randn(64, 128).bfloat16(), []
    real = kernels.gemv_bf16
    monkeypatch.setattr(kernels, "gemv_bf16", lambda x, w: calls.append(x.shape) or real(x, w))
    for shape in [(1, 1, 128), (2, 3, 128), (16, 128), (4, 16, 128), (65, 128), (1, 128)]:
        x = torch.randn(shape).bfloat16()
        out = matmul(x, w)
        assert out.shape == (*shape[:-1], 64) and out.dtype == torch.bfloat16
        assert rel(out, x.float() @ w.float().T) < 2 ** -8
    # up to 64 rows: the kernel (16 decodes a step were 3.5x slower through the fp32 GEMM); 65: the fp32 GEMM
    assert calls == [(1, 1, 128), (2, 3, 128), (16, 128), (4, 16, 128), (1, 128)]
    assert matmul(torch.randn(1, 128), w.float()).dtype == torch.float32  # fp32: plain F.linear
    x = torch.randn(2, 128).bfloat16().requires_grad_()
    out = matmul(x, w)  # a frozen weight under autograd (LoRA's base): the kernel forward, ops.frozen_grad backward
    out.float().sum().backward()
    assert len(calls) == 6 and torch.allclose(x.grad.float(), w.float().sum(0).expand(2, -1), rtol=2 ** -7)
    trained = w.clone().requires_grad_()
    matmul(torch.randn(2, 128).bfloat16().requires_grad_(), trained).float().sum().backward()
    assert len(calls) == 6 and trained.grad is not None  # a weight that trains: never the kernel
    # bf16 GEMM native: the kernel takes 1-2 rows (1-8 in the avx512_bf16 build), PyTorch's GEMM the rest
    hardware._chosen["native_bf16"] = True
    kernels._native = None
    calls.clear()
    shapes = [(1, 1, 128), (2, 128), (3, 128), (8, 128), (9, 128), (4, 16, 128)]
    for shape in shapes:
        matmul(torch.randn(shape).bfloat16(), w)
    most = 8 if kernels._resolve()[0] == "avx512_bf16" else 2
    assert kernels.bf16_kernel_rows() == most
    assert calls == [s for s in shapes if torch.Size(s).numel() // 128 <= most]


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_prefill_product_on_either_bf16_gemm(bf16_gemm, bits):
    """Prefill-sized products (40 rows) of bf16 activations: within bf16 rounding of the exact product, whichever
    GEMM runs; quantized weights are dequantized to bf16 blocks for the native GEMM (one more rounding each)."""
    from gemma4.ops import linear as matmul

    g = torch.Generator().manual_seed(40 + (bits or 0))
    x, w = torch.randn(40, 640, generator=g).bfloat16(), torch.randn(300, 640, generator=g)
    if bits is None:
        w = w.bfloat16()
        out, wd = matmul(x, w), w.double()
    else:
        q, s = quantize(w, bits, 64)
        out, wd = qmatmul(x, q, s, bits, 64), dequantize(q, s, bits, 64).double()
    exact, magnitude = x.double() @ wd.T, x.double().abs() @ wd.abs().T
    assert out.dtype == torch.bfloat16 and out.shape == (40, 300)
    # one rounding of the output (half a bf16 step, 2^-9) and fp32 sums; with weights rounded to bf16, at most
    # 2^-9 of each |x w| more
    weights = 2 ** -9 if bits and bf16_gemm else 1e-6
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + magnitude * weights).all()



@pytest.mark.parametrize("M,K,N,depth,block_bytes", [
    (16, 128, 64, 2048, 3 << 20),  # one GEMM
    (20, 4200, 70, 2048, 3 << 20),  # E2B-like wide input: 2048 + 2048 + 104 columns
    (17, 640, 200, 256, 64 * 4 * 256),  # 256-column chunks, 64-row blocks (200 = 3 x 64 + 8)
])
def test_bf16_many_rows_fp32_product(M, K, N, depth, block_bytes):
    """Prefill's bf16 product: fp32 GEMMs over weight blocks and input chunks, one rounding to bf16."""
    from gemma4.ops import _fp32_product

    g = torch.Generator().manual_seed(K + N)
    x, w = torch.randn(2, M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    out = _fp32_product(x, w, block_bytes=block_bytes, depth=depth)
    exact = x.double() @ w.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (2, M, N)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5 * K ** 0.5).all()


def test_prefill_buffers_are_reused_in_and_out_of_inference_mode():
    """kernels.scratch keeps its buffers per thread; one made under inference_mode is still writable after."""
    import threading

    from gemma4.ops import _fp32_product

    x, w, results = torch.randn(20, 128).bfloat16(), torch.randn(64, 128).bfloat16(), []

    def run():  # a new thread: no buffers yet
        with torch.inference_mode():
            results.append(_fp32_product(x, w))
        with torch.no_grad():
            results.append(_fp32_product(x, w))
        results.append(kernels.scratch("weights", 10).data_ptr() == kernels.scratch("weights", 5).data_ptr())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(results) == 3 and torch.equal(results[0], results[1]) and results[2]


def test_bf16_many_rows_product_trains():
    """With autograd on, the product takes no reused buffers (they would be overwritten under the graph)."""
    from gemma4.ops import linear as matmul

    x, w = torch.randn(32, 96).bfloat16().requires_grad_(), torch.randn(40, 96).bfloat16().requires_grad_()
    matmul(x, w).float().square().sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (xd @ wd.T).square().sum().backward()
    assert rel(x.grad, xd.grad) < 2 ** -6 and rel(w.grad, wd.grad) < 2 ** -6

@pytest.mark.parametrize("x,w,message", [
    (torch.randn(1, 64), torch.randn(4, 64).bfloat16(), "x must be a contiguous 2-D bfloat16"),
    (torch.randn(1, 64).bfloat16(), torch.randn(4, 64), "w must be a contiguous 2-D bfloat16"),
    (torch.randn(1, 64).bfloat16(), torch.randn(4, 32).bfloat16(), "x has 64 features, the weight 32"),
    (torch.randn(1, 64).bfloat16(), torch.randn(64, 4).bfloat16().T, "w must be a contiguous"),
])
def test_bf16_kernel_bad_inputs(kernel, x, w, message):
    with pytest.raises(RuntimeError, match=message):
        kernels._ops().gemv_bf16(x, w)


# (shape of x, dtype, with a weight): rows of 256 / 512 / 1536 (Gemma 4's head dims and E2B's width), a width
# that is not a multiple of 8 (the scalar tail), many rows (split over threads), bf16 and fp32, v_norm's no-weight.
NORM_CASES = [((1, 1, 1536), torch.bfloat16, True), ((1, 8, 256), torch.bfloat16, True),
              ((1, 1, 512), torch.bfloat16, False), ((512, 35, 256), torch.bfloat16, True),
              ((3, 7, 13), torch.float32, True), ((2, 5, 1536), torch.float32, False), ((4096, 40), torch.float32, True)]


@pytest.mark.parametrize("shape,dtype,with_weight", NORM_CASES)
def test_rms_norm_kernel_matches_the_reference(kernel, shape, dtype, with_weight):
    """Against transformers' Gemma4RMSNorm: fp32 within 3 ulp (the sum of squares is taken in another
    order); bf16 identical but for rare 1-ulp roundings of values that fall on a bf16 midpoint."""
    Gemma4RMSNorm = pytest.importorskip("transformers.models.gemma4.modeling_gemma4").Gemma4RMSNorm
    g = torch.Generator().manual_seed(shape[-1] * len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    ref = Gemma4RMSNorm(shape[-1], eps=1e-6, with_scale=with_weight).to(dtype)
    if with_weight:
        ref.weight.data = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    with torch.no_grad():
        expected = ref(x)
    out = kernels.rms_norm(x, ref.weight if with_weight else None, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=3 * 2 ** -23, atol=1e-7)
    else:
        assert (out != expected).float().mean() < 1e-3
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7).all()


def test_rms_norm_routes_to_the_kernel(kernel, monkeypatch):
    """CPU fp32/bf16 without autograd: the kernel; a tensor that needs gradients or a dtype it does not take:
    F.rms_norm (a training step gets gradients, fp16 still works)."""
    from gemma4.model.text import RMSNorm

    calls = []
    real = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: calls.append(x.dtype) or real(x, w, eps))
    norm = RMSNorm(64, 1e-6).requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = norm.to(dtype)(torch.randn(2, 64).to(dtype))
        assert out.dtype == dtype
    x = torch.randn(2, 64, requires_grad=True)
    norm.float()(x).sum().backward()
    assert calls == [torch.float32, torch.bfloat16] and x.grad is not None


@pytest.mark.parametrize("x,w,message", [
    (torch.randn(2, 64).half(), None, "x must be a contiguous float32 or bfloat16"),
    (torch.randn(64, 2).T, None, "x must be a contiguous"),
    (torch.randn(2, 64), torch.randn(32), "weight must be a contiguous 1-D float32 or bfloat16 CPU tensor of 64"),
    (torch.randn(2, 64), torch.randn(64).half(), "weight must be"),
])
def test_rms_norm_kernel_bad_inputs(kernel, x, w, message):
    with pytest.raises(RuntimeError, match=message):
        kernels._ops().rms_norm(x, w, 1e-6)


# (shape, dtype): an E2B prefill MLP, a decode step's double-wide MLP, a PLE gate, lengths that are not a multiple
# of the 8-lane vectors.
GELU_CASES = [((1, 512, 6144), torch.bfloat16), ((1, 1, 12288), torch.bfloat16), ((3, 256), torch.float32),
              ((2, 37), torch.bfloat16), ((5,), torch.float32)]


@pytest.mark.parametrize("shape,dtype", GELU_CASES)
def test_gelu_mul_kernel_matches_aten(kernel, shape, dtype):
    """gelu_tanh(gate) * up in place, against ATen's F.gelu(approximate="tanh") then *: bf16 identical but for
    values of x < -2.9, where 1 + tanh keeps only a few bits in either (|difference| < 2^-20); fp32 within a few
    ulp (another tanh). The edges: 0, -0, +-10, +-88 (exp saturates), -3e38."""
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    edges = torch.tensor([0.0, -0.0, 10.0, -10.0, 88.0, -88.0, -3e38])[:gate.numel()]
    gate.view(-1)[:len(edges)] = edges.to(dtype)
    expected = torch.nn.functional.gelu(gate, approximate="tanh") * up
    out = kernels.gelu_mul(gate.clone(), up)
    assert out.dtype == dtype and out.shape == gate.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=4 * 2 ** -23, atol=1e-6)
    else:
        differ = out != expected
        assert differ.float().mean() < 0.01 and (gate[differ] < -2.9).all()
        assert ((out.double() - expected.double()).abs() < 2 ** -20).all()
    assert torch.equal(out.view(-1)[:len(edges)], expected.view(-1)[:len(edges)])


def test_gelu_mul_routes_to_the_kernel(kernel, monkeypatch):
    """The MLP's activation: the kernel on CPU fp32/bf16 without autograd (in place in the gate's projection),
    ATen where autograd records it or for fp16; the same values (within a few fp32 ulp) either way."""
    from gemma4.model.text import MLP

    calls = []
    real = kernels.gelu_mul
    monkeypatch.setattr(kernels, "gelu_mul", lambda gate, up: calls.append(gate.dtype) or real(gate, up))
    mlp = MLP(64, 128).requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, 64).to(dtype)
        with torch.no_grad():
            h = torch.nn.functional.gelu(mlp.gate_proj.to(dtype)(x), approximate="tanh") * mlp.up_proj.to(dtype)(x)
        torch.testing.assert_close(mlp.to(dtype)(x), mlp.down_proj(h))
    x = torch.randn(3, 64, requires_grad=True)
    mlp.float().requires_grad_(True)(x).sum().backward()
    assert calls == [torch.float32, torch.bfloat16] and x.grad is not None


@pytest.mark.parametrize("gate,up,message", [
    (torch.randn(4, 8).half(), torch.randn(4, 8).half(), "contiguous float32 or bfloat16"),
    (torch.randn(4, 8), torch.randn(4, 9), "of one shape and dtype"),
    (torch.randn(8, 4).T, torch.randn(4, 8), "contiguous"),
    (torch.randn(4, 8), torch.randn(4, 8).bfloat16(), "of one shape and dtype"),
])
def test_gelu_mul_kernel_bad_inputs(kernel, gate, up, message):
    with pytest.raises(RuntimeError, match=message):
        kernels._ops().gelu_mul(gate, up)


# (B, H, K, T, S, D, K/V dtype, q dtype): E2B's sliding and global decode (530 keys: a last chunk of 18), 26B's
# 2 query heads per KV head with 3 new tokens, 32 rows per KV head (tiles of 8), a chunk shorter than 8 keys.
ATTENTION_CASES = [(1, 8, 1, 1, 512, 256, torch.float32, torch.float32),
                   (1, 8, 1, 1, 530, 512, torch.bfloat16, torch.bfloat16),
                   (2, 16, 8, 3, 300, 256, torch.bfloat16, torch.float32),
                   (1, 8, 1, 4, 129, 512, torch.float32, torch.float32),
                   (3, 4, 2, 1, 5, 16, torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("B,H,K,T,S,D,kv_dtype,q_dtype", ATTENTION_CASES)
def test_decode_attention_kernel(kernel, B, H, K, T, S, D, kv_dtype, q_dtype):
    """Against softmax(q k^T) v in float64 from the same rounded inputs, with a random mask; in a batch, the
    last row sees only its last key (every other chunk of keys adds nothing)."""
    g = torch.Generator().manual_seed(S + D)
    q = (torch.randn(B, H, T, D, generator=g) * D ** -0.25).to(q_dtype)
    k, v = (torch.randn(B, K, S, D, generator=g).to(kv_dtype) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3
    mask[..., 0] = True
    if B > 1:
        mask[-1], mask[-1, ..., -1] = False, True
    scores = q.double().reshape(B, K, H // K * T, D) @ k.double().transpose(-1, -2)
    scores = scores.view(B, K, H // K, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    expected = (scores.softmax(-1).view(B, K, -1, S) @ v.double()).view(B, H, T, D)
    out = kernels.decode_attention(q, k, v, mask)
    assert out.dtype == q_dtype and out.shape == (B, H, T, D)
    tol = 2e-6 if q_dtype == torch.float32 else 2 ** -8
    assert ((out.double() - expected).abs() <= tol * expected.abs() + 2e-6).all()


def test_decode_attention_kernel_strided_kv_and_no_key(kernel):
    """K/V as views of a larger cache (strided rows and heads) give the contiguous result; a row that sees
    no key gets zeros (SDPA would give NaN)."""
    cache = torch.randn(2, 3, 40, 64)
    q, mask = torch.randn(1, 4, 1, 64), torch.ones(1, 1, 1, 24, dtype=torch.bool)
    k, v = cache[:1, :2, 8:32], cache[1:, 1:, 10:34]
    torch.testing.assert_close(kernels.decode_attention(q, k, v, mask),
                               kernels.decode_attention(q, k.contiguous(), v.contiguous(), mask))
    assert kernels.decode_attention(q, k, v, torch.zeros_like(mask)).eq(0).all()


def test_small_query_attention_routes_to_the_kernel(kernel, monkeypatch):
    """fp32 / bf16 CPU without gradients: the kernel; float64 (the exactness tests) and autograd: ATen ops."""
    from gemma4.ops import small_query_attention

    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, kv = torch.randn(1, 4, 1, 32, dtype=dtype), torch.randn(1, 2, 9, 32, dtype=dtype)
        assert small_query_attention(q, kv, kv, mask).dtype == dtype
    q = torch.randn(1, 4, 1, 32, requires_grad=True)
    small_query_attention(q, kv.float(), kv.float(), mask).sum().backward()
    assert calls == [torch.float32, torch.bfloat16] and q.grad is not None


@pytest.mark.parametrize("q,kv,mask,message", [
    (torch.randn(1, 4, 1, 32).half(), torch.randn(1, 2, 9, 32), None, "must be float32 or bfloat16"),
    (torch.randn(1, 4, 1, 32), torch.randn(1, 3, 9, 32), None, "K dividing the 4 query heads"),
    (torch.randn(1, 4, 1, 12), torch.randn(1, 2, 9, 12), None, "multiple of 8"),
    (torch.randn(1, 4, 1, 32), torch.randn(1, 2, 32, 9).transpose(-1, -2), None, "contiguous in k and v"),
    (torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.ones(1, 1, 1, 9), "mask must be bool"),
    (torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.ones(1, 1, 2, 9, dtype=torch.bool), "mask must be"),
    (torch.randn(4, 1, 32), torch.randn(1, 2, 9, 32), None, r"q \[B, H, T, D\]"),
])
def test_decode_attention_kernel_bad_inputs(kernel, q, kv, mask, message):
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool) if mask is None else mask
    with pytest.raises(RuntimeError, match=message):
        kernels.decode_attention(q, kv, kv, mask)


# ---- ARM NEON builds, on this x86 machine: the kernels' torch-free core (csrc/gemv.h) cross-compiled and run
# under qemu-user, against the same references as the x86 builds above.
CROSS, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
CSRC = Path(kernels.__file__).parent / "csrc"
NEED_ARM = "needs the Debian packages g++-aarch64-linux-gnu and qemu-user (apt-get install ...)"


@pytest.fixture(scope="module", params=["neon", "neon_dotprod"])
def neon(request, tmp_path_factory):
    """(isa, run): run(op, xtype, M, N, K, group, **operands) -> the standalone binary's output array."""
    if not (CROSS and QEMU):
        pytest.skip(NEED_ARM)
    binary = tmp_path_factory.mktemp(request.param) / "standalone"
    subprocess.run([CROSS, "-O2", "-static", "-std=c++17", *hardware.ISA_FLAGS[request.param],
                    str(CSRC / "standalone.cpp"), "-o", str(binary)], check=True, capture_output=True)

    def run(op, xtype, M, N, K, group, out_dtype=torch.float32, **operands):
        work = tmp_path_factory.mktemp("operands")
        for name, t in operands.items():
            (work / f"{name}.bin").write_bytes(t.contiguous().view(torch.uint8).numpy().tobytes())
        done = subprocess.run([QEMU, str(binary), op, xtype, str(M), str(N), str(K), str(group), str(work)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        raw = torch.frombuffer(bytearray((work / "out.bin").read_bytes()), dtype=torch.uint8)
        return raw.view(out_dtype)
    return request.param, run


# (bits, group_size, K, N, M): odd and even block counts, 1-4 scales per group, rows in 1 or 2 tiles (9 = 4 + 5)
NEON_CASES = [(4, 32, 96, 37, 1), (4, 64, 1536, 300, 3), (4, 128, 384, 13, 9), (8, 32, 64, 37, 2),
              (8, 64, 1536, 101, 1), (8, 96, 288, 7, 9)]


@pytest.mark.parametrize("bits,group_size,K,N,M", NEON_CASES)
@pytest.mark.parametrize("xtype", ["f32", "bf16", "f16"])
def test_neon_quantized_kernel(neon, bits, group_size, K, N, M, xtype):
    _, run = neon
    g = torch.Generator().manual_seed(K * N + bits)
    q, s = quantize(torch.randn(N, K, generator=g), bits, group_size)
    wd = dequantize(q, s, bits, group_size)
    x = torch.randn(M, K, generator=g).to({"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[xtype])
    out = run(f"q{bits}", xtype, M, N, K, group_size, x=x, qweight=q, scales=s).view(M, N)
    emu = q8_emulation(x.float(), wd)  # the same integer arithmetic as the x86 kernels: fp32 order only differs
    assert (out.double() - emu).abs().max() <= 2e-6 * emu.abs().max()
    assert rel(out, x.float() @ wd.T) < KERNEL_RTOL


@pytest.mark.parametrize("M,K,N", [(1, 40, 3), (1, 1536, 300), (3, 1536, 7), (5, 48, 9), (9, 72, 33)])
def test_neon_bf16_kernel(neon, M, K, N):
    _, run = neon
    g = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    out = run("bf16", "bf16", M, N, K, 0, x=x, w=w).view(M, N)  # fp32 sums (the op rounds them to bf16)
    exact = x.double() @ w.double().T
    assert ((out.double() - exact).abs() <= 1e-5 * (x.double().abs() @ w.double().abs().T)).all()


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_neon_dequantize_is_exact(neon, bits, group_size):
    _, run = neon
    q, s = quantize(torch.randn(37, 384), bits, group_size)
    exact = dequantize(q, s, bits, group_size)
    assert torch.equal(run(f"dq{bits}", "f32", 0, 37, 384, group_size, qweight=q, scales=s).view(37, 384), exact)
    out16 = run(f"dq{bits}", "bf16", 0, 37, 384, group_size, torch.bfloat16, qweight=q, scales=s)
    assert torch.equal(out16.view(37, 384), exact.bfloat16())


@pytest.mark.parametrize("isa", ["neon", "neon_dotprod"])
def test_arm_build_of_the_torch_ops_compiles(isa):
    """The ops file as an ARM machine builds it (torch's headers are the same): only the products registered."""
    if not CROSS:
        pytest.skip(NEED_ARM)
    from torch.utils.cpp_extension import include_paths

    done = subprocess.run([CROSS, "-fsyntax-only", "-std=c++17", *hardware.ISA_FLAGS[isa], f"-DGEMMA4_OPS=gemma4_{isa}",
                           *(f"-I{p}" for p in include_paths()), str(CSRC / "qgemv.cpp")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("N,K", [(96, 672), (300, 128)])  # wide (down_proj: column blocks), tall (row blocks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_grad_in_blocks(bf16_gemm, monkeypatch, bits, N, K, dtype):
    """The backward of a frozen (LoRA base) weight: grad_y @ W a block of W at a time (dequantized per block when
    quantized) equals the whole product; through autograd too. Blocks made small so that every path cuts W."""
    from gemma4 import ops, quant

    monkeypatch.setattr(ops, "FROZEN_BLOCK_BYTES", 64 * 128 * 4)
    g = torch.Generator().manual_seed(N + K + (bits or 0))
    w, gy = torch.randn(N, K, generator=g) * 0.1, torch.randn(24, N, generator=g).to(dtype)
    if bits is None:
        w = w.to(dtype)
        wd, align, block = w.double(), 64, lambda n0, n1, k0, k1, dt: w[n0:n1, k0:k1]
    else:
        q, s = quantize(w, bits, 32)
        wd, align = dequantize(q, s, bits, 32).double(), 32
        block = lambda n0, n1, k0, k1, dt: quant.dequantized_block(q, s, bits, 32, n0, n1, k0, k1, dt)
    blocks = []
    out = ops.frozen_grad(gy, lambda *a: blocks.append(a[:4]) or block(*a), (N, K), align)
    assert out.dtype == dtype and out.shape == (24, K)
    cover = torch.zeros(N, K, dtype=torch.int)  # the blocks tile W exactly once, columns cut at `align`
    for n0, n1, k0, k1 in blocks:
        assert k0 % align == 0 and (k1 % align == 0 or k1 == K)
        cover[n0:n1, k0:k1] += 1
    assert len(blocks) > 1 and (cover == 1).all()
    exact, magnitude = gy.double() @ wd, gy.double().abs() @ wd.abs()
    bf16 = dtype == torch.bfloat16
    # native bf16: quantized weights dequantized to bf16, and each row block's product rounded to bf16 before
    # the fp32 sum (the CPU's bf16 GEMM has no fp32 output): at most 2^-9 of each |g w| more
    weights = 2 ** -9 if bf16 and bf16_gemm else 1e-6
    bound = exact.abs() * (2 ** -8 if bf16 else 1e-6) + magnitude * weights
    assert ((out.double() - exact).abs() <= bound).all()
    x = torch.randn(24, K, generator=g).to(dtype).requires_grad_()
    if bits is None:
        y = ops.linear(x, w)
    else:
        y = quant.quantized_product(x, q, s, bits, 32)
    y.backward(gy)
    assert ((x.grad.double() - exact).abs() <= bound).all()
