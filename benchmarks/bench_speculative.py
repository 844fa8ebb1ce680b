"""Speculative decoding with an MTP drafter: what a draft step and a verification cost next to a decode step,
and tok/s at forced acceptance (full-size E2B with random weights, and its drafter; bf16 and int4 targets).

    python benchmarks/bench_speculative.py                  # ckpt/e2b-text and ckpt/e2b-assistant, made if missing
    python benchmarks/bench_speculative.py --k 4 --quantize int4 --steps 48

Random weights draft nothing the target agrees with, so acceptance is forced (benchmark only, and labelled so):
the drafter runs as usual, and the verification keeps each draft with probability A as if the target had
chosen it (drawn evenly, see `forced`). A draft is kept only while every one before it was, so the share of
drafts kept is below A.
Prints, per target: plain decode tok/s; the cost of a draft step and of a k+1-token
verification relative to a decode step; tok/s and tokens per verification at A = 0, 0.5, 0.8, 1; and the
speed-up predicted from those costs at the per-position acceptance rates published for Gemma 4 (0.84, 0.60,
0.39, 0.27 for drafts 1-4).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DRAFTER_CONFIG = os.path.join(HERE, "..", "tests", "data", "configs", "gemma-4-e2b-assistant", "config.json")
PUBLISHED = (0.84, 0.60, 0.39, 0.27)  # Gemma 4's per-position acceptance rates, drafts 1-4


def make_drafter(out: str) -> None:
    """The published E2B drafter's shape with random weights (transformers builds it; a random token ordering)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    with open(DRAFTER_CONFIG) as f:
        cfg = json.load(f)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    model = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(**cfg)).to(torch.bfloat16)
    model.masked_embedding.token_ordering.copy_(torch.randperm(cfg["text_config"]["vocab_size"]))
    model.save_pretrained(out)


def first_difference(a: list[int], b: list[int]) -> int:
    """Tokens two continuations share before they part (their length if they never do)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def worker(args) -> dict:
    import gemma4
    import gemma4.engine.engine as engine_module
    import gemma4.engine.sample as sample_module
    from gemma4.engine.engine import Engine
    from gemma4.engine.sample import SamplingParams
    from gemma4.model.assistant import draft
    from gemma4.weights import load_assistant

    model = gemma4.load(args.checkpoint, device="cpu", quantize=args.worker if args.worker != "bf16" else None)
    drafter = load_assistant(args.drafter, dtype=model.dtype, device="cpu")
    prompt = torch.randint(3, 262144, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def generate(engine, n, ids=prompt):
        """Greedy tokens after the prompt, and tok/s of the steps after the first (prefill). Each measured run has
        an engine of its own: a prefix cached by an earlier run would change the prefill's row count, and with
        it the rounding of bf16 products."""
        engine.add("r", ids, SamplingParams(max_new_tokens=n, stop_token_ids=()))
        tokens, t0 = [], None
        while engine.has_work():
            for ev in engine.step():
                if ev.token_id is not None:
                    tokens.append(ev.token_id)
            if t0 is None:
                t0, first = time.perf_counter(), len(tokens)
        return tokens, (len(tokens) - first) / (time.perf_counter() - t0)

    generate(Engine(model, max_step_tokens=1024), 4, prompt[::-1])  # warm-up: weights, kernels
    result = dict(target=args.worker, k=args.k, forced={})
    engine_module_min_reach = engine_module.MIN_REACH
    real_sample = sample_module.Sampler.sample

    def forced(rate):
        """Greedy tokens and tok/s at fixed k with each draft kept with probability `rate` once the ones before it
        were (adaptivity off): the real drafter runs, and a benchmark-only substitution in the sampler keeps its
        draft as if the target had chosen it, else the target's own token decides. How many drafts a verification
        keeps, n with probability rate^n (1 - rate) (rate^k for all k), is drawn by inverting that distribution
        at a low-discrepancy sequence (golden ratio), so that a run of a few dozen verifications has the expected
        mean: independent draws (seed 0) kept 2.75 tokens per verification at 0.8 over 96 tokens, not 3.36.
        (Copying a plain run's tokens instead fails on random bf16 weights: products of k+1 rows round
        differently from one row's, and the top logits are that close.)"""
        state = {"verification": 0, "keep": None}  # drafts the current verification still keeps (None: new one)

        def kept_drafts() -> int:
            u = (0.5 + state["verification"] * 0.6180339887498949) % 1.0
            state["verification"] += 1
            n, below = 0, 1.0 - rate  # P(keep <= n)
            while n < args.k and u >= below:
                n += 1
                below += rate ** n * (1.0 - rate) if n < args.k else 1.0
            return n

        def sample(self, logits, draft=None):
            if draft is None:  # the row after the last draft, or a plain decode step
                state["keep"] = None
                return real_sample(self, logits, draft)
            if state["keep"] is None:
                state["keep"] = kept_drafts()
            if state["keep"] > 0:
                state["keep"] -= 1
                self.seen.add(draft)
                return draft, None, None
            state["keep"] = None  # rejected: the target's own token (random weights: never the draft)
            return real_sample(self, logits, draft)

        sample_module.Sampler.sample, engine_module.MIN_REACH = sample, 0.0
        engine = Engine(model, max_step_tokens=1024, drafter=drafter, num_draft_tokens=args.k)
        try:
            tokens, tok_s = generate(engine, args.steps)
        finally:
            sample_module.Sampler.sample, engine_module.MIN_REACH = real_sample, engine_module_min_reach
        drafted, accepted = engine.draft_stats["drafted"], engine.draft_stats["accepted"]
        kept = accepted / max(1, drafted)
        return tokens, {"tok_s": tok_s, "kept": kept, "per_verify": 1 + args.k * kept}

    # Rounds alternate every configuration; each keeps its best tok/s (the machine's read speed drifts).
    for _ in range(args.rounds):
        plain, tok_s = generate(Engine(model, max_step_tokens=1024), args.steps)
        result["plain_tok_s"] = max(tok_s, result.get("plain_tok_s", 0.0))
        # The product: adaptive draft length, the random drafter's drafts rejected (acceptance 0).
        engine = Engine(model, max_step_tokens=1024, drafter=drafter, num_draft_tokens=args.k)
        tokens, tok_s = generate(engine, args.steps)
        if tok_s > result.get("adaptive_a0", {}).get("tok_s", 0.0):
            result["adaptive_a0"] = dict(tok_s=tok_s, drafted=engine.draft_stats["drafted"],
                                         same=first_difference(tokens, plain))
        for rate in (0.0, 0.5, 0.8, 1.0):
            tokens, row = forced(rate)
            if row["tok_s"] > result["forced"].get(rate, {}).get("tok_s", 0.0):
                result["forced"][rate] = row
            if rate == 0.0:
                truth = tokens
    result["verified_vs_plain"] = first_difference(truth, plain)
    seq_worker = engine.worker
    text = model.language_model
    with torch.inference_mode():
        blocks = {kind: [pool.allocate() for _ in range(-(-(args.prompt_len + 16) // engine.block_size))]
                  for kind, pool in engine.pools.items()}
        seq_worker.forward_with_kv(prompt, 0, blocks)
        times = {"decode": [], "verify": [], "draft": []}
        for _ in range(5):
            t = time.perf_counter()
            _, hidden, kv = seq_worker.forward_with_kv(prompt[-1:], args.prompt_len - 1, blocks)
            times["decode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            seq_worker.forward_with_kv(prompt[-1:] + plain[:args.k], args.prompt_len - 1, blocks, every_token=True)
            times["verify"].append(time.perf_counter() - t)
            kv1 = {kind: (K, V, m[:, :, -1:]) for kind, (K, V, m) in kv.items()}
            t = time.perf_counter()
            draft(drafter, text.embed, torch.tensor([plain[0]]), hidden, torch.tensor([[args.prompt_len]]),
                       kv1, 1)
            times["draft"].append(time.perf_counter() - t)
    cost = {name: min(ts) for name, ts in times.items()}
    result.update(decode_s=cost["decode"], verify_s=cost["verify"], draft_s=cost["draft"])
    per_step = 1 + sum(PUBLISHED[:args.k])
    result["predicted_speedup"] = per_step * cost["decode"] / (cost["verify"] + args.k * cost["draft"])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "..", "ckpt", "e2b-text"))
    ap.add_argument("--drafter", default=os.path.join(HERE, "..", "ckpt", "e2b-assistant"))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=96, help="tokens generated per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure is its best")
    ap.add_argument("--k", type=int, default=4, help="drafts per step")
    ap.add_argument("--quantize", default="int4", help="also these targets ('' for bf16 only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        sys.path.insert(0, HERE)
        from bench_generate import make_checkpoint

        make_checkpoint(args.checkpoint)
    if not os.path.isfile(os.path.join(args.drafter, "config.json")):
        make_drafter(args.drafter)
    rows = []
    for target in ["bf16"] + [q for q in args.quantize.split(",") if q]:
        cmd = [sys.executable, __file__, "--worker", target, "--checkpoint", args.checkpoint, "--drafter",
               args.drafter, "--prompt-len", str(args.prompt_len), "--steps", str(args.steps), "--k", str(args.k),
               "--rounds", str(args.rounds),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{target} worker failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from gemma4 import hardware

    print(f"\nE2B + its drafter (random weights), {args.threads} threads, prompt {args.prompt_len}, {args.steps} "
          f"greedy tokens, k = {args.k}, best of {args.rounds} rounds; CPU: {hardware.cpu().name}\n")
    print("| target | plain tok/s | adaptive, acceptance 0 | draft step / decode | verify k+1 / decode | "
          "fixed k: A=0 | A=0.5 | A=0.8 | A=1 | predicted (published acceptance) |\n" + "|---" * 10 + "|")
    for r in rows:
        a0 = r["adaptive_a0"]
        forced = " | ".join(f"{f['tok_s']:.2f} ({f['tok_s'] / r['plain_tok_s']:.2f}x, {f['per_verify']:.2f} tok/verify)"
                            for f in r["forced"].values())
        print(f"| {r['target']} | {r['plain_tok_s']:.2f} | {a0['tok_s']:.2f} ({a0['tok_s'] / r['plain_tok_s']:.2f}x, "
              f"{a0['drafted']} drafts) | {r['draft_s'] / r['decode_s']:.3f} | {r['verify_s'] / r['decode_s']:.2f} | "
              f"{forced} | {r['predicted_speedup']:.2f}x |")
    print("\nA: the probability that each draft is replaced by the target's own next token (forced acceptance, "
          "benchmark only); a draft counts only after every earlier one was kept.")
    for r in rows:
        print(f"{r['target']}: of {args.steps} greedy tokens, the adaptive run shares {r['adaptive_a0']['same']} with "
              f"plain decoding, verification at fixed k {r['verified_vs_plain']} (then they part: bf16 rounding)")


if __name__ == "__main__":
    main()
