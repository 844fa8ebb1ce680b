"""A Q4_0 GGUF against our own int4 checkpoint, full-size E2B (random weights): load time, peak RSS and decode
tokens/s, each run its own process, on this machine.

    python benchmarks/bench_gguf.py                                  # ckpt/e2b-text; the int4 copy and GGUF made once
    python benchmarks/bench_gguf.py --checkpoint /work/ckpt/e2b-text --tokens 32

The GGUF (CHECKPOINT-q4_0.gguf) is written by `gemma4 export --type q4_0` from the model quantized to int4 at group 32
(its blocks go into the file unchanged; the PLE table is quantized by gguf.quants as llama.cpp rounds). The int4
checkpoint is `gemma4 quantize --to int4` (group 64, our default). Both decode through the same int4 kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run(path: str, tokens: int) -> dict:
    import gemma4

    t = time.perf_counter()
    llm = gemma4.LLM(path)
    load_s = time.perf_counter() - t
    prompt = [[2] + list(range(1000, 1031))]
    llm.generate(prompt, 4, temperature=0.0)  # warm-up
    t = time.perf_counter()
    out = llm.generate(prompt, tokens, temperature=0.0, stop_token_ids=[])[0]
    decode_s = time.perf_counter() - t
    return {"load_s": load_s, "tok_s": len(out.token_ids) / decode_s,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "..", "ckpt", "e2b-text"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run(args.worker, args.tokens)))
        return
    int4, q4_0 = args.checkpoint + "-int4", args.checkpoint + "-q4_0.gguf"
    gemma4_cli = [sys.executable, "-m", "gemma4.cli"]
    if not os.path.isdir(int4):
        subprocess.run(gemma4_cli + ["quantize", "--model", args.checkpoint, "--to", "int4", "--out", int4], check=True)
    if not os.path.isfile(q4_0):
        import gemma4
        from gemma4.weights.gguf import export_gguf

        llm = gemma4.LLM(args.checkpoint, quantize="int4", group_size=32, device="cpu")
        t = time.perf_counter()
        export_gguf(llm.model, q4_0, "q4_0", model_dir=args.checkpoint, chat_template=llm.chat_template)
        print(f"wrote {q4_0} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        del llm
    rows = {}
    for name, path in (("our int4 checkpoint", int4), ("Q4_0 GGUF", q4_0)):
        out = subprocess.run([sys.executable, __file__, "--worker", path, "--tokens", str(args.tokens),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nE2B (random weights), {args.tokens} decoded tokens after a 32-token prompt, {args.threads} threads; "
          f"CPU: {cpu}\n")
    print("| file | load s | decode tok/s | peak RSS GB |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['load_s']:.1f} | {r['tok_s']:.2f} | {r['rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
