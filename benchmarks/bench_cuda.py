"""GPU generation speed and memory: gemma4 vs the reference (transformers), same checkpoint, one run.

    python benchmarks/bench_cuda.py --checkpoint /tmp/e2b-text     # made there if missing (random E2B text)

Each engine runs in its own process. Prints load time, prefill tok/s (512 and 2,048 tokens), decode tok/s
(median step; ours eager and with the CUDA-graph step, and a batch of 8), peak GPU memory, and the decode
limit: bytes of weights one step reads / the GPU's measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import make_checkpoint, prompt_ids  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def copy_bandwidth() -> float:
    """Bytes/s the GPU moves in a device-to-device copy, reads and writes counted (as a decode step reads)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    _, s = timed(lambda: [b.copy_(a) for _ in range(10)])
    return 2 * a.numel() * 10 / s


def worker_reference(args) -> dict:
    from transformers import Gemma4ForCausalLM

    model, load = timed(lambda: Gemma4ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16,
                                                                  device_map="cuda").eval())
    res = dict(engine="transformers bf16 (eager, dynamic cache)", load_s=load)
    with torch.no_grad():
        for n, key in ((512, "prefill_512"), (2048, "prefill_2048")):
            ids = torch.tensor([prompt_ids(n)], device="cuda")
            model(input_ids=ids[:, :16], logits_to_keep=1)  # warm-up
            out, s = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
            res[key] = n / s
        past, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(args.steps):
            out, s = timed(lambda: model(input_ids=token, past_key_values=past, use_cache=True))
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps.append(s)
    res.update(decode_tok_s=1 / statistics.median(steps[4:]), peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    return res


def worker_ours(args) -> dict:
    from bench_generate import decode_reads

    import gemma4
    from gemma4.engine.engine import Engine
    from gemma4.engine.kv import kv_bytes
    from gemma4.engine.sample import SamplingParams

    model, load = timed(lambda: gemma4.load(args.checkpoint, dtype="bfloat16", device="cuda"))
    res = dict(engine="gemma4 bf16", load_s=load)
    engines = {}

    def run(prompts, new, graph, compile=False):
        """Seconds per token of request 0 (the first: its prefill), all prompts in one engine at once."""
        key = (graph, compile)
        if key not in engines:  # one engine per mode, kept: its graphs are captured once
            engines[key] = Engine(model, kv_memory=8 << 30, stop_ids=(), cuda_graphs=graph, compile=compile)
        engine = engines[key]
        for i, p in enumerate(prompts):
            engine.add(f"r{i}", p, SamplingParams(max_new_tokens=new))
        times, t = [], time.perf_counter()
        while engine.has_work():
            for ev in engine.step():
                if ev.request_id == "r0" and ev.token_id is not None:
                    torch.cuda.synchronize()
                    now = time.perf_counter()
                    times.append(now - t)
                    t = now
        return times

    run([prompt_ids(16)], 4, True)  # warm-up (kernels, allocator)
    for n in (512, 2048):  # a fresh prompt each time (the prefix cache would serve a repeated one)
        res[f"prefill_{n}"] = n / min(run([[3 + i] + prompt_ids(n - 1)], 1, False)[0] for i in range(3))
    run([prompt_ids(512)], 8, True)  # graphs of the measured buckets captured
    res["decode_tok_s_eager"] = 1 / statistics.median(run([prompt_ids(512)], args.steps, False)[5:])
    res["decode_tok_s"] = 1 / statistics.median(run([prompt_ids(512)], args.steps, True)[5:])
    batch = [prompt_ids(512 + i) for i in range(8)]
    res["decode_tok_s_batch8_eager"] = 8 / statistics.median(run(batch, args.steps, False)[5:])
    run(batch, 8, True)
    res["decode_tok_s_batch8"] = 8 / statistics.median(run(batch, args.steps, True)[5:])
    if args.compile:
        t = time.perf_counter()
        run([prompt_ids(512)], 8, True, compile=True)  # compiled once (dynamic shapes), graphs captured
        res["compile_s"] = time.perf_counter() - t
        res["decode_tok_s_compiled"] = 1 / statistics.median(run([prompt_ids(512)], args.steps, True, True)[5:])
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["kv_bytes"] = kv_bytes(model.config.text, 512 + args.steps, 2)
    res["decode_bytes"] = sum(b for b, _, _ in decode_reads(model))
    res["copy_gb_s"] = copy_bandwidth() / 1e9
    return res


def profile(args) -> None:
    """Kernels of one eager engine decode step, by total GPU time (where a graphed step spends its time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import gemma4
    from gemma4.engine.engine import Engine
    from gemma4.engine.sample import SamplingParams

    model = gemma4.load(args.checkpoint, dtype="bfloat16", device="cuda")
    for compiled in (False, True) if args.compile else (False,):
        engine = Engine(model, kv_memory=4 << 30, stop_ids=(), cuda_graphs=False, compile=compiled)
        engine.add("p", prompt_ids(512), SamplingParams(max_new_tokens=100))
        for _ in range(4):  # the prefill, then decode steps (compiled on the first)
            engine.step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        engine.abort("p")
        engine.step()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        print(f"{'compiled' if compiled else 'eager'} step: {sum(e.count for e in events)} kernels, "
              f"{sum(e.self_device_time_total for e in events) / 1e3:.2f} ms of GPU time")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
            print(f"  {e.self_device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/e2b-text")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the graphed step (minutes)")
    ap.add_argument("--profile", action="store_true", help="print the kernels of one decode step and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    if args.worker:
        print(json.dumps((worker_ours if args.worker == "ours" else worker_reference)(args)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA device")
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        make_checkpoint(args.checkpoint, device="cuda")
    rows = []
    for kind in ["ours"] + ([] if args.skip_reference else ["reference"]):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--checkpoint", args.checkpoint,
                              "--steps", str(args.steps)] + (["--compile"] if args.compile else []),
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{kind} worker failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nE2B text, random weights, {torch.cuda.get_device_name()}, decode after a 512-token prompt, "
          f"median of {args.steps} steps\n")
    head = ("engine", "load s", "prefill tok/s (512)", "prefill tok/s (2048)", "decode tok/s",
            "CUDA graph", "graph + compile", "batch 8 eager tok/s", "batch 8 graphed tok/s", "peak GPU GB")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = (r["engine"], f"{r['load_s']:.1f}", f"{r['prefill_512']:.0f}", f"{r['prefill_2048']:.0f}",
                 f"{r.get('decode_tok_s_eager', r['decode_tok_s']):.1f}",
                 f"{r['decode_tok_s'] if 'decode_tok_s_eager' in r else float('nan'):.1f}",
                 f"{r.get('decode_tok_s_compiled', float('nan')):.1f}",
                 f"{r.get('decode_tok_s_batch8_eager', float('nan')):.1f}",
                 f"{r.get('decode_tok_s_batch8', float('nan')):.1f}", f"{r['peak_gb']:.2f}")
        print("| " + " | ".join(cells) + " |")
    ours = rows[0] if rows and rows[0]["engine"].startswith("gemma4") else None
    if ours:
        limit = ours["copy_gb_s"] * 1e9 / ours["decode_bytes"]
        best = max(ours["decode_tok_s"], ours.get("decode_tok_s_compiled", 0))
        print(f"\ndecode reads {ours['decode_bytes'] / 1e9:.2f} GB of weights a step; copy bandwidth "
              f"{ours['copy_gb_s']:.0f} GB/s -> limit {limit:.0f} tok/s; ours {best:.1f} ({best / limit:.0%}); "
              f"KV {ours['kv_bytes'] / 1e6:.1f} MB" + (f"; torch.compile took {ours['compile_s']:.0f} s"
                                                     if "compile_s" in ours else ""))


if __name__ == "__main__":
    main()
