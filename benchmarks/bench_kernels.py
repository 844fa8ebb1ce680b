"""Decode-step matmul throughput: our int4/int8 kernels vs bf16 F.linear and PyTorch's packed kernels.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1 8] [--group-size 64] [--quick] [--isa avx2 ...]

GB/s counts the bytes of weights each call must read (packed weights + scales), so it is comparable with the
machine's read bandwidth, measured first by an fp32 GEMV.  Every measurement cycles through distinct weight
matrices totalling > 200 MB, so the last-level cache cannot serve them.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from gemma4 import hardware, kernels

SHAPES = [(6144, 1536), (1536, 6144), (12288, 1536), (1536, 12288), (2048, 1536), (1536, 2048), (262144, 1536)]
MIN_BYTES = 200e6


def timed(fn, args_list, min_time=0.5, min_rounds=8):
    """Seconds per call: the best round, each round one call per argument tuple (a distinct weight set).

    The best round rather than the mean, because other processes on a small shared machine preempt one
    of the two threads now and then, and a preempted parallel region costs a whole scheduler slice.
    """
    for a in args_list:  # warm up: first touch, kernel build, thread pool
        fn(*a)
    best, rounds, start = float("inf"), 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        for a in args_list:
            fn(*a)
        best = min(best, (time.perf_counter() - t) / len(args_list))
        rounds += 1
    return best


def copies(nbytes):
    return max(2, int(MIN_BYTES // nbytes) + 1)


def ours(isa):
    """The ops of our kernel build for `isa` (built on first use)."""
    hardware.select(isa=isa)
    ops = kernels._ops()
    hardware.select()
    return ops


def make(method, N, K, gs):
    """(fn, weight-bytes per call, a function making one argument tuple minus x). "(ours ISA)" methods run
    that build of our kernels."""
    if method == "bf16 F.linear":
        return F.linear, N * K * 2, lambda: (torch.randn(N, K, dtype=torch.bfloat16),)
    if method.startswith("bf16 (ours"):
        return ours(method[method.index("(ours") + 6:-1]).gemv_bf16, N * K * 2, lambda: (torch.randn(N, K, dtype=torch.bfloat16),)
    if method.startswith(("int8 (ours", "int4 (ours")):
        bits, ops = (8 if method.startswith("int8") else 4), ours(method[method.index("(ours") + 6:-1])
        nbytes = N * K * bits // 8 + N * (K // gs) * 2

        def weights():
            q = torch.randint(-127, 128, (N, K), dtype=torch.int8) if bits == 8 else \
                torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
            return q, torch.rand(N, K // gs).mul_(0.01).half()
        return (lambda x, q, s: ops.qgemv(x, q, s, bits, gs)), nbytes, weights
    if method == "torch int8pack":
        return (torch.ops.aten._weight_int8pack_mm, N * K + N * 2,
                lambda: (torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, dtype=torch.bfloat16)))
    if method == "torch int4pack":
        def weights():
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 2)
            return w, gs, torch.rand(K // gs, N, 2, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu, N * K // 2 + (K // gs) * N * 4, weights
    raise KeyError(method)


def read_bandwidth():
    """GB/s of an fp32 GEMV over ~260 MB of weights (the reference for our kernels), and of a plain
    tensor.sum() over 256 MB (a simpler stream, usually faster: an upper reference)."""
    N, K = 6144, 1536
    ws = [torch.randn(N, K) for _ in range(copies(N * K * 4))]
    x = torch.randn(1, K)
    gemv = N * K * 4 / timed(F.linear, [(x, w) for w in ws]) / 1e9
    del ws
    big = torch.ones(64 << 20)
    return gemv, big.numel() * 4 / timed(torch.sum, [(big,)]) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["bf16 F.linear", "bf16 (ours)", "int8 (ours)", "int4 (ours)",
                                                       "torch int8pack", "torch int4pack"])
    p.add_argument("--quick", action="store_true", help="skip the [262144, 1536] embedding-sized shape")
    p.add_argument("--isa", nargs="+", default=[hardware.isa()],
                   help=f"our kernel builds to run (this CPU runs: {', '.join(hardware.cpu().isas())})")
    args = p.parse_args()
    args.methods = [m.replace("(ours)", f"(ours {isa})") for m in args.methods
                    for isa in (args.isa if "(ours)" in m else [None])]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {hardware.cpu().name}  threads={torch.get_num_threads()}  group_size={args.group_size}  "
          f"kernel builds: {', '.join(args.isa)}")
    bw, bw_sum = read_bandwidth()
    print(f"read bandwidth: fp32 GEMV over > 200 MB of weights {bw:.1f} GB/s  (tensor.sum over 256 MB {bw_sum:.1f} GB/s)\n")
    shapes = SHAPES[:-1] if args.quick else SHAPES
    print(f"{'shape [N, K]':>16} {'M':>3} | " + " | ".join(f"{m:>23}" for m in args.methods))
    print("-" * (23 + 24 * len(args.methods)))
    ours = {}  # method -> GB/s at M=1, per shape
    for N, K in shapes:
        results = {r: [] for r in args.rows}
        for method in args.methods:
            fn, nbytes, weights = make(method, N, K, args.group_size)
            ws = [weights() for _ in range(copies(nbytes))]
            for r in args.rows:
                x = torch.randn(r, K, dtype=torch.bfloat16)
                t = timed(fn, [(x, *w) for w in ws])
                results[r].append(f"{nbytes / t / 1e9:6.1f} GB/s {t * 1e3:7.3f} ms")
                if r == 1 and "ours" in method:
                    ours.setdefault(method, []).append(nbytes / t / 1e9)
            del ws
        for r in args.rows:
            print(f"{str([N, K]):>16} {r:>3} | " + " | ".join(f"{c:>23}" for c in results[r]))
    print("\nGB/s = bytes of weights + scales per call / time per call (best of >= 8 rounds).")
    for method, v in ours.items():
        print(f"{method} at M=1: {min(v) / bw:.0%} .. {max(v) / bw:.0%} of the fp32-GEMV read bandwidth "
              f"({min(v) / bw_sum:.0%} .. {max(v) / bw_sum:.0%} of tensor.sum's)")


if __name__ == "__main__":
    main()
