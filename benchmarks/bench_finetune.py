"""LoRA / QLoRA fine-tuning speed and memory: ours (bf16 base, int4 base) against transformers + PEFT (bf16 base)
with the same settings, full-size E2B (random weights), 512-token sequences, on this machine.

    python benchmarks/bench_finetune.py                     # ckpt/e2b-text, made if missing
    python benchmarks/bench_finetune.py --steps 4 --seq 512 --rank 16

Settings for every run: LoRA rank 16 (alpha 32) on q, k, v, o, gate, up and down projections of every layer,
AdamW, one 512-token sequence per step with the loss on every token, gradient checkpointing per layer. Each run
is its own process (peak RSS = its ru_maxrss, loading included); tokens/s over the steps after the first. Our
QLoRA loads a saved int4 checkpoint (CHECKPOINT-int4, written by `gemma4 quantize` if missing). transformers +
PEFT has no CPU QLoRA (bitsandbytes' 4-bit layers need a GPU), so our int4 base is compared with its bf16 one.
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
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(args, quantize):
    import gemma4
    from gemma4.train.data import Example
    from gemma4.train.lora import LoRAConfig
    from gemma4.train.trainer import Trainer, TrainConfig

    from gemma4 import hardware

    # QLoRA from a saved int4 checkpoint (`gemma4 quantize`, made once by main()), its activations in bf16 where
    # the CPU multiplies bf16 natively, as `gemma4 finetune` chooses
    path = args.checkpoint + "-int4" if quantize else args.checkpoint
    dtype = "bfloat16" if quantize and hardware.native_bf16() else None
    t = time.perf_counter()
    llm = gemma4.LLM(path, dtype=dtype)
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    examples = [Example([2] + torch.randint(3, 262144, (args.seq - 1,), generator=g).tolist(), [False] + [True] *
                        (args.seq - 1)) for _ in range(args.steps)]
    trainer = Trainer(llm, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=tuple(MODULES)),
                      TrainConfig(steps=args.steps, lr=1e-4, batch_tokens=args.seq, progress=False), "/tmp/bench-ft")
    times = []
    real = trainer.optimizer.step

    def step(*a, **k):  # time each optimizer step (forward + backward happened just before)
        out = real(*a, **k)
        times.append(time.perf_counter())
        return out

    trainer.optimizer.step = step
    t0 = time.perf_counter()
    trainer.train(examples)
    times = [t0] + times
    per_step = [b - a for a, b in zip(times, times[1:])]
    return {"load_s": load_s, "step_s": per_step, "loss": trainer.history[-1]["loss"],
            "trainable": sum(p.numel() for p in trainer.params)}


def reference(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=MODULES))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times, loss = [time.perf_counter()], None
    for _ in range(args.steps):
        ids = torch.cat([torch.tensor([[2]]), torch.randint(3, 262144, (1, args.seq - 1), generator=g)], 1)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter())
    per_step = [b - a for a, b in zip(times, times[1:])]
    return {"load_s": load_s, "step_s": per_step, "loss": loss.item(), "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "..", "ckpt", "e2b-text"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="ours-bf16,ours-int4,transformers-bf16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = reference(args) if args.worker == "transformers-bf16" else \
            ours(args, "int4" if args.worker == "ours-int4" else None)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        sys.path.insert(0, HERE)
        from bench_generate import make_checkpoint

        make_checkpoint(args.checkpoint)
    if "ours-int4" in args.runs and not os.path.isfile(os.path.join(args.checkpoint + "-int4", "config.json")):
        subprocess.run([sys.executable, "-m", "gemma4.cli", "quantize", "--model", args.checkpoint, "--to", "int4",
                        "--out", args.checkpoint + "-int4"], check=True)
    rows = {}
    for run in args.runs.split(","):
        cmd = [sys.executable, __file__, "--worker", run, "--checkpoint", args.checkpoint, "--steps", str(args.steps),
               "--seq", str(args.seq), "--rank", str(args.rank), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{run} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows[run] = json.loads(out.stdout.strip().splitlines()[-1])
    from gemma4 import hardware

    print(f"\nE2B (random weights) LoRA rank {args.rank}, {args.seq}-token sequences, {args.steps} steps, "
          f"{args.threads} threads; CPU: {hardware.cpu().name}\n")
    print("| run | load s | s / step (after the first) | tokens/s | peak RSS GB | trainable M | last loss |\n"
          "|---|---|---|---|---|---|---|")
    for run, r in rows.items():
        later = r["step_s"][1:] or r["step_s"]
        best = min(later)
        print(f"| {run} | {r['load_s']:.1f} | {best:.2f} | {args.seq / best:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['trainable'] / 1e6:.2f} | {r['loss']:.3f} |")
    if "transformers-bf16" in rows:
        ref = args.seq / min(rows["transformers-bf16"]["step_s"][1:] or rows["transformers-bf16"]["step_s"])
        for run in ("ours-bf16", "ours-int4"):
            if run in rows:
                r = rows[run]
                print(f"{run}: {args.seq / min(r['step_s'][1:] or r['step_s']) / ref:.2f}x transformers + PEFT's "
                      f"tokens/s")


if __name__ == "__main__":
    main()
