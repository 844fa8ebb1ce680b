"""Generation speed and memory: gemma4 vs the reference (transformers), same checkpoint, same prompt, one run.

    python benchmarks/bench_generate.py                      # full-size random E2B (text), made if missing
    python benchmarks/bench_generate.py --checkpoint DIR --prompt-len 512 --long-prompt 2048 --steps 32
    python benchmarks/bench_generate.py --quantize "" --skip-reference --baseline /tmp/old  # vs another commit
    python benchmarks/bench_generate.py --no-compile --quantize int4 --llama-cpp /tmp/llama/.../vendor/llama.cpp

Each engine runs in its own process (clean peak RSS), one after the other. Prints a table: load time (with a
first 8-token call, which pages in weights that both engines map from the file: the page cache is warm for
whichever runs second: a cold 512-token prefill ran at 38 tok/s, the 2,048-token one after it at 108),
prefill tok/s (the best of two distinct prompts), decode tok/s (median step), peak RSS, K/V cache bytes; the
decode bandwidth limit of each weight format (bytes a decode step reads / the read speed of the engine's own
matrix-vector kernels over those weights) and our fraction of it; our prefill GFLOP/s next to the machine's fp32
matmul peak.
Needs transformers (the reference) and, to make the checkpoint, about 10 GB of disk.

--llama-cpp DIR adds llama.cpp's rows (BF16, Q8_0, Q4_0): DIR is a llama.cpp source tree with llama-bench and
llama-quantize built (../shared/tools/llama_cpp.sh build makes one from the llama-cpp-python sdist); the
checkpoint is converted once by that tree's own convert_hf_to_gguf.py (GGUFs kept in CHECKPOINT-gguf/) and
measured by `llama-bench -t THREADS -p PROMPT_LEN -n STEPS`.
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

HERE = os.path.dirname(os.path.abspath(__file__))
E2B_CONFIG = os.path.join(HERE, "..", "tests", "data", "configs", "gemma-4-e2b", "config.json")


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 262144, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry over the driver's peak through fork)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kib * 1024 / 1e9


def make_checkpoint(out: str, device: str = "cpu") -> None:
    """Full-size random E2B text model (Gemma4ForCausalLM, bf16), written by the reference (its random
    initialization takes minutes on a CPU, seconds on a GPU)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    with open(E2B_CONFIG) as f:
        text = json.load(f)["text_config"]
    print(f"writing a random full-size E2B text checkpoint to {out} (a few minutes)...", file=sys.stderr)
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(Gemma4TextConfig(**text), dtype=torch.bfloat16)
    model.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 106, 50], "bos_token_id": 2, "pad_token_id": 0}, f)


# ---------------------------------------------------------------- workers (one process each)

def worker_reference(args) -> dict:
    from transformers import Gemma4ForCausalLM

    t = time.perf_counter()
    model = Gemma4ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt_ids(8)]))  # first call: weights paged in (counted as load)
    load = time.perf_counter() - t
    ids = torch.tensor([prompt_ids(args.prompt_len)])
    steps = []
    with torch.no_grad():
        t = time.perf_counter()  # prefill: the best of two prompts (the first call of a size is slower)
        model(input_ids=torch.tensor([prompt_ids(args.prompt_len, seed=1)]), use_cache=True, logits_to_keep=1)
        first, t = time.perf_counter() - t, time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = min(first, time.perf_counter() - t)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(args.steps):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
    kv = sum(t.nbytes for layer in past.layers for t in (layer.keys, layer.values) if t is not None)
    return dict(engine="transformers bf16", load_s=load, prefill_tok_s=args.prompt_len / prefill,
                decode_tok_s=1 / statistics.median(steps), rss_gb=peak_rss_gb(), kv_bytes=kv)


def decode_reads(model) -> list[tuple[int, object, int]]:
    """(bytes, product, input width) for every weight one decode step reads: each projection, and the tied
    embedding table as the LM head (MoE experts: only top-k run; the PLE table: one row)."""
    from gemma4.ops import linear as matmul
    from gemma4.quant import QuantizedLinear

    text, reads = model.language_model, []
    for m in text.modules():
        if isinstance(m, QuantizedLinear):  # the quantized tied table is one too
            reads.append((m.qweight.nbytes + m.scales.nbytes, m, m.scales.shape[1] * m.group_size))
        elif isinstance(m, torch.nn.Linear):
            reads.append((m.weight.nbytes, m, m.in_features))
    if isinstance(text.embed_tokens, torch.nn.Embedding):  # the LM head, through the engine's own product
        w = text.embed_tokens.weight
        reads.append((w.nbytes, lambda x: matmul(x, w), w.shape[1]))
    return reads


def read_speed(model) -> tuple[int, float]:
    """(bytes, seconds) of one pass of the engine's own one-row products over the decode weights: the
    bandwidth "a reader as good as the engine's" gets on this machine."""
    reads = decode_reads(model)
    xs = {n: torch.randn(1, n, dtype=model.dtype) for _, _, n in reads}

    def one_pass():
        for _, product, n in reads:
            product(xs[n])

    one_pass()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    return sum(b for b, _, _ in reads), min(times)


def prefill_flops_per_token(cfg, prompt_len: int) -> float:
    """Matmul FLOPs per prompt token (KV-shared layers run on the last token only: not counted)."""
    E, H = cfg.hidden_size, cfg.num_heads
    flops = 2 * E * cfg.num_layers * cfg.ple_dim  # PLE model projection
    for s in cfg.layers:
        if s.kv_shared:
            continue
        kv = s.num_kv_heads * s.head_dim * (1 if s.k_eq_v else 2)
        params = E * H * s.head_dim * 2 + E * kv + 3 * E * s.intermediate_size + 2 * E * cfg.ple_dim
        keys = min(prompt_len, cfg.sliding_window) if s.sliding else prompt_len
        flops += 2 * params + 2 * 2 * H * s.head_dim * keys / (1 if s.sliding else 2)  # causal: half
    return flops


def fp32_peak_gflops() -> float:
    a, b = torch.randn(2048, 1536), torch.randn(6144, 1536)
    torch.nn.functional.linear(a, b)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = max(best, 2 * 2048 * 1536 * 6144 / (time.perf_counter() - t) / 1e9)
    return best


def engine_steps(engine, prompt: list[int], new: int):
    """Greedy generation of `new` tokens for one prompt through the engine (no stop token): yield once per
    token, as it comes."""
    from gemma4.engine.sample import SamplingParams

    rid = f"bench-{id(prompt)}-{len(prompt)}-{new}"
    engine.add(rid, prompt, SamplingParams(max_new_tokens=new, stop_token_ids=()))
    while engine.has_work():
        for ev in engine.step():
            if ev.request_id == rid and ev.token_id is not None:
                yield ev.token_id


def worker_ours(args) -> dict:
    import gemma4
    from gemma4.engine.engine import Engine
    from gemma4.engine.kv import cache_dtype, kv_bytes

    t = time.perf_counter()
    model = gemma4.load(args.checkpoint, device="cpu")  # bf16; fp32 activations for a quantized one
    engine = Engine(model, max_step_tokens=args.chunk, compile=args.compile)
    for _ in engine_steps(engine, prompt_ids(8), 2):
        pass  # first call: weights paged in from the file, kernels built (counted as load)
    load = time.perf_counter() - t
    result = dict(engine="gemma4 " + (f"int{model.quantization['bits']}" if model.quantization else "bf16")
                  + (" compiled" if args.compile else ""), load_s=load)
    for n, key in ((args.prompt_len, ""), (args.long_prompt, "_long")):
        if not n:
            continue
        if not key and args.compile:  # compile (a minute or two) outside the timed run
            t0 = time.perf_counter()
            for _ in engine_steps(engine, prompt_ids(8), 3):
                pass
            result["compile_s"] = time.perf_counter() - t0
        t = time.perf_counter()  # prefill: the best of two prompts (the first call of a size is slower)
        for _ in engine_steps(engine, prompt_ids(n, seed=1), 1):
            first = time.perf_counter() - t
        times, t = [], time.perf_counter()
        for _ in engine_steps(engine, prompt_ids(n), 1 + (args.steps if not key else 0)):
            now = time.perf_counter()
            times.append(now - t)
            t = now
        prefill = min(first, times[0])
        result[f"prefill_tok_s{key}"] = n / prefill
        result[f"prefill_gflops{key}"] = n * prefill_flops_per_token(model.config.text, n) / prefill / 1e9
        if not key:
            result["decode_tok_s"] = 1 / statistics.median(times[1:])
            result["rss_gb"] = peak_rss_gb()  # the reference's workload (this prompt); the long one adds its own
    result["kv_bytes"] = kv_bytes(model.config.text, args.prompt_len + args.steps, cache_dtype(model).itemsize)
    result["rss_gb_long"] = peak_rss_gb()
    nbytes, seconds = read_speed(model)
    result.update(decode_bytes=nbytes, read_gb_s=nbytes / seconds / 1e9, limit_tok_s=1 / seconds)
    result["fp32_peak_gflops"] = fp32_peak_gflops()
    return result


# ---------------------------------------------------------------- driver

def run_worker(kind: str, args, checkpoint: str, compile: bool = False, long_prompt: int = 0,
               tree: str | None = None) -> dict:
    """One worker process. `tree`: a checkout of another commit, whose own benchmark and package run instead
    (a baseline measured in the same run)."""
    script = os.path.join(tree, "benchmarks", "bench_generate.py") if tree else __file__
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if tree:
        env["PYTHONPATH"] = os.path.join(tree, "src")
    cmd = [sys.executable, script, "--worker", kind, "--checkpoint", checkpoint, "--prompt-len",
           str(args.prompt_len), "--long-prompt", str(long_prompt), "--steps", str(args.steps),
           "--chunk", str(args.chunk)] + (["--compile"] if compile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if tree:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        result["engine"] += f" (baseline {commit.stdout.strip() or tree})"
    return result


def llama_cpp_rows(tree: str, checkpoint: str, args) -> list[dict]:
    """llama.cpp on the same weights, converted by its own converter: one row per GGUF type."""
    import shutil
    import tempfile

    bench, quantize = (os.path.join(tree, "build", "bin", b) for b in ("llama-bench", "llama-quantize"))
    if not (os.access(bench, os.X_OK) and os.access(quantize, os.X_OK)):
        raise SystemExit(f"--llama-cpp {tree}: no build/bin/llama-bench and llama-quantize there "
                         "(../shared/tools/llama_cpp.sh build)")
    out_dir = checkpoint.rstrip("/") + "-gguf"
    os.makedirs(out_dir, exist_ok=True)
    bf16 = os.path.join(out_dir, "model-bf16.gguf")
    if not os.path.isfile(bf16):
        with tempfile.TemporaryDirectory() as hf:  # the checkpoint + tokenizer.json, which the converter needs
            for name in os.listdir(checkpoint):
                os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(hf, name))
            if not os.path.exists(os.path.join(hf, "tokenizer.json")):
                import gzip

                import gemma4
                src = os.path.join(os.path.dirname(gemma4.__file__), "data", "tokenizer.json.gz")
                with gzip.open(src) as f, open(os.path.join(hf, "tokenizer.json"), "wb") as g:
                    shutil.copyfileobj(f, g)
            print(f"converting {checkpoint} with llama.cpp's converter -> {bf16}", file=sys.stderr)
            subprocess.run([sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), hf, "--outtype", "bf16",
                            "--outfile", bf16], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": os.path.join(tree, "gguf-py")})
    rows = []
    for kind in ("BF16", "Q8_0", "Q4_0"):
        path = bf16 if kind == "BF16" else os.path.join(out_dir, f"model-{kind.lower()}.gguf")
        if not os.path.isfile(path):
            subprocess.run([quantize, bf16, path, kind, str(args.threads)], check=True, capture_output=True)
        cmd = [bench, "-m", path, "-t", str(args.threads), "-p", str(args.prompt_len), "-n", str(args.steps),
               "-r", "2", "-o", "json"]
        out, note = subprocess.run(cmd, capture_output=True, text=True), ""
        if out.returncode:  # a GGML_NATIVE build on a VM may die in its AMX / repacked weight path: without it
            print(f"llama-bench failed on {kind} (exit {out.returncode}); again with --repack 0", file=sys.stderr)
            out, note = subprocess.run(cmd + ["--repack", "0"], capture_output=True, text=True), " (--repack 0)"
        if out.returncode:
            print(f"llama-bench failed on {kind} (exit {out.returncode}): {out.stderr[-500:]}", file=sys.stderr)
            continue
        runs = json.loads(out.stdout)
        rows.append(dict(engine=f"llama.cpp {kind}{note}",
                         prefill_tok_s=next(r["avg_ts"] for r in runs if r["n_prompt"] and not r["n_gen"]),
                         decode_tok_s=next(r["avg_ts"] for r in runs if r["n_gen"] and not r["n_prompt"])))
    return rows


def quantized_copy(checkpoint: str, bits: str) -> str:
    """The checkpoint quantized with the default format (made again if an older copy has another group size)."""
    from gemma4.kernels import DEFAULT_GROUP_SIZE

    out = checkpoint.rstrip("/") + f"-{bits}"
    config = os.path.join(out, "config.json")
    if not os.path.isfile(config) or json.load(open(config))["quantization_config"]["group_size"] != DEFAULT_GROUP_SIZE:
        import gemma4

        print(f"quantizing {checkpoint} to {bits} -> {out}", file=sys.stderr)
        gemma4.LLM(checkpoint, dtype="bfloat16", device="cpu", quantize=bits).save_quantized(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "..", "ckpt", "e2b-text"))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--long-prompt", type=int, default=2048, help="ours only: the prefill target's prompt")
    ap.add_argument("--steps", type=int, default=32, help="decode steps (median reported)")
    ap.add_argument("--chunk", type=int, default=1024, help="our prefill chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="int8,int4", help="also run ours on these weight formats")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="eager decode only (compiling takes minutes)")
    ap.add_argument("--baseline", metavar="TREE",
                    help="also run the bf16 rows from this checkout of another commit (git worktree), each "
                         "right after ours")
    ap.add_argument("--rounds", type=int, default=1, help="with --baseline: alternate this many times, keep the "
                                                          "best decode of each")
    ap.add_argument("--llama-cpp", metavar="DIR", help="also run llama.cpp (a built source tree) on the same weights")
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps((worker_ours if args.worker == "ours" else worker_reference)(args)))
        return
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        make_checkpoint(args.checkpoint)
    rows = []
    for compile in (False,) if args.no_compile else (False, True):
        best = {}
        for _ in range(args.rounds if args.baseline else 1):
            for tree in (None, args.baseline) if args.baseline else (None,):
                r = run_worker("ours", args, args.checkpoint, compile, 0 if compile else args.long_prompt, tree)
                if r["engine"] not in best or r["decode_tok_s"] > best[r["engine"]]["decode_tok_s"]:
                    best[r["engine"]] = r
        rows += best.values()
    for bits in filter(None, args.quantize.split(",")):
        path = quantized_copy(args.checkpoint, bits)
        if bits == "int4" or args.no_compile:  # int4 eager: the default path, next to llama.cpp's Q4_0
            rows.append(run_worker("ours", args, path))
        if not args.no_compile:
            rows.append(run_worker("ours", args, path, compile=True))
    if not args.skip_reference:
        rows.append(run_worker("reference", args, args.checkpoint))
    if args.llama_cpp:
        rows += llama_cpp_rows(args.llama_cpp, args.checkpoint, args)

    from gemma4 import hardware

    print(f"\nE2B text, random weights, {args.threads} threads, prompt {args.prompt_len} tokens, "
          f"{args.steps} decode steps (median); CPU: {hardware.cpu().name} (kernels {hardware.isa()}, bf16 GEMM "
          f"{'native' if hardware.native_bf16() else 'emulated: fp32 blocks'})\n")
    head = ("engine", "load s", f"prefill tok/s ({args.prompt_len})", f"prefill tok/s ({args.long_prompt})",
            "decode tok/s", "peak RSS GB", f"peak RSS GB (+{args.long_prompt})", "KV MB")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = (r["engine"], f"{r['load_s']:.1f}" if "load_s" in r else "-", f"{r['prefill_tok_s']:.1f}",
                 f"{r['prefill_tok_s_long']:.1f}" if "prefill_tok_s_long" in r else "-",
                 f"{r['decode_tok_s']:.2f}", f"{r['rss_gb']:.3f}" if "rss_gb" in r else "-",
                 f"{r['rss_gb_long']:.3f}" if "prefill_tok_s_long" in r else "-",
                 f"{r['kv_bytes'] / 1e6:.1f}" if "kv_bytes" in r else "-")
        print("| " + " | ".join(cells) + " |")
    print("\n| weights | bytes read per decode step | kernel read speed | decode limit tok/s | ours | fraction |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        if "decode_bytes" in r:
            print(f"| {r['engine']} | {r['decode_bytes'] / 1e9:.2f} GB | {r['read_gb_s']:.1f} GB/s | "
                  f"{r['limit_tok_s']:.2f} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / r['limit_tok_s']:.0%} |")
    for r in rows:
        if "compile_s" in r:
            print(f"{r['engine']}: torch.compile of the decode step took {r['compile_s']:.0f} s (once per process)")
    ours = rows[0]
    print(f"\nprefill ({args.long_prompt} tokens): {ours.get('prefill_gflops_long', 0):.0f} GFLOP/s of matmul, "
          f"machine fp32 matmul peak {ours['fp32_peak_gflops']:.0f} GFLOP/s "
          f"({ours.get('prefill_gflops_long', 0) / ours['fp32_peak_gflops']:.0%})")


if __name__ == "__main__":
    main()
