"""26B-A4B at full size with int4 weights: decode tok/s and peak RSS on this machine.

    python benchmarks/bench_moe_int4.py [--checkpoint ckpt/26b-a4b-int4] [--prompt-len 128] [--steps 16]

25B parameters do not fit in 24 GB at bf16, so the random checkpoint is written directly in gemma4's
int4 format (random packed weights and plausible scales; ~14 GB of disk), then loaded (memory-mapped)
and run. A decode step reads the dense weights plus top-8 of 128 experts per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "tests", "data", "configs", "gemma-4-26b-a4b", "config.json")


def make_checkpoint(out: str, bits: int = 4, group_size: int = 32) -> None:
    from safetensors.torch import save_file

    from gemma4.config import parse_config
    from gemma4.model import empty_model
    from gemma4.quant import QUANT_METHOD, quantize_structure

    with open(CONFIG) as f:
        text = dict(json.load(f)["text_config"], model_type="gemma4_text")
    text["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size}
    config = parse_config({k: v for k, v in text.items() if k != "quantization_config"})
    model = empty_model(config)
    with torch.device("meta"):
        quantize_structure(model.language_model, bits, group_size, torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    print(f"writing a random int{bits} 26B-A4B checkpoint to {out}...", file=sys.stderr)
    for name, meta in model.language_model.state_dict().items():
        if name.endswith("qweight"):
            t = torch.randint(-128 if meta.dtype == torch.int8 else 0, 128 if meta.dtype == torch.int8 else 256,
                              meta.shape, dtype=meta.dtype, generator=gen)
        elif name.endswith("scales"):  # weights of std 0.02: absmax over a group of 32 is ~0.05
            t = torch.full(meta.shape, 0.05 / (7 if bits == 4 else 127), dtype=torch.float16)
        elif "norm" in name or name.endswith(("layer_scalar", "scale")):
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard["model." + name] = t
        size += t.nbytes
        if size > 2e9:
            flush()
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(text, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "..", "ckpt", "26b-a4b-int4"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        make_checkpoint(args.checkpoint)

    from bench_generate import engine_steps

    import gemma4
    from gemma4.engine.engine import Engine

    t = time.perf_counter()
    model = gemma4.load(args.checkpoint, device="cpu")  # fp32 activations (a quantized model on a CPU)
    load = time.perf_counter() - t
    ids = torch.randint(3, 262144, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    times, t = [], time.perf_counter()
    for _ in engine_steps(Engine(model, max_step_tokens=max(512, len(ids))), ids, args.steps + 1):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB, as bench_generate
    print(f"\n26B-A4B full size, int4 (random weights), {args.threads} threads\n")
    print("| load s | prefill tok/s | decode tok/s (median) | peak RSS GB |\n|---|---|---|---|")
    print(f"| {load:.1f} | {args.prompt_len / times[0]:.1f} | {1 / statistics.median(times[1:]):.2f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
