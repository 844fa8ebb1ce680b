"""The fine-tuning loop: AdamW over the LoRA weights, linear warm-up then cosine decay, gradient accumulation,
gradient checkpointing, validation loss, checkpoints every N steps that a run resumes from, a tqdm bar with the
loss and tokens/s. Deterministic for a given seed (data order, adapter init, dropout).

The loss is the mean cross-entropy over the learned tokens of each optimizer step (all its micro-batches together,
so accumulation gives the same gradient as one large batch). Logits are made a chunk of learned tokens at a time
under checkpointing: a 512-token sequence's full logits over the 262K vocabulary would be 0.5 GB in fp32, twice.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..memory import return_freed_heap
from .data import IGNORE, Example, batches, collate
from .lora import LoRAConfig, apply_lora, load_adapter, lora_parameters, save_adapter

LOSS_BYTES = 128 << 20  # fp32 logits made at once (Gemma 4's 262K vocabulary: 128 tokens; three such live)


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps (None: `epochs` over the data)
    epochs: float = 1.0
    lr: float = 1e-4
    warmup: int = 0  # steps of linear warm-up from 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * this
    weight_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_tokens: int = 2048  # padded tokens per micro-batch (length-bucketed; one example at least)
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = True
    eval_every: int = 0  # steps between validation losses (0: only at the end, when there is a validation set)
    save_every: int = 0  # steps between checkpoints (0: only the final adapter)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("grad_accum", "batch_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.epochs > 0 or not self.lr > 0:
            raise ValueError(f"epochs and lr must be positive, got {self.epochs!r}, {self.lr!r}")
        for name in ("warmup", "eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning rate factor for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def head_weight(text):
    """(block(n0, n1, k0, k1, dtype) -> LM head weight block, its shape, whether blocks are views) for
    ops.frozen_grad."""
    head = text.lm_head if hasattr(text, "lm_head") else text.embed_tokens
    if hasattr(head, "qweight"):
        from ..quant import dequantized_block

        shape = (head.qweight.shape[0], head.scales.shape[1] * head.group_size)
        return (lambda n0, n1, k0, k1, dtype: dequantized_block(head.qweight, head.scales, head.bits,
                                                                head.group_size, n0, n1, k0, k1, dtype)), shape, False
    return (lambda n0, n1, k0, k1, dtype: head.weight[n0:n1, k0:k1]), tuple(head.weight.shape), True


class HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of softcapped LM-head logits, fused (as Liger's fused linear cross-entropy): the
    forward makes the logits a chunk of tokens at a time and right away the gradient of the loss with respect to
    the hidden states, [N, E], which is all the backward needs. No [N, vocab] tensor lives past its chunk, and
    nothing is computed twice (autograd over the chunks would keep, or with checkpointing recompute, the
    logits: 262K of them per token, and their softcap's and softmax's elementwise passes)."""

    @staticmethod
    def forward(ctx, hidden, labels, text):
        from .. import ops

        cap = text.cfg.final_logit_softcap
        block, shape, views = head_weight(text)
        chunk = max(16, LOSS_BYTES // (4 * shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        # Every [c, V] step in place in two fp32 buffers made once: a fresh tensor per step was a new mapping
        # each (2 GB, 525k page faults a 512-token E2B step, a third of the loss's time)
        bufs = torch.empty(2 if cap else 1, min(chunk, len(labels)), shape[0], dtype=torch.float32,
                           device=hidden.device)
        for s in range(0, len(labels), chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            z = text.head(h)  # [c, V] raw logits, in hidden's dtype
            logits = bufs[0][:len(y)].copy_(z)
            t = None
            if cap:
                t = logits.div_(cap).tanh_()  # bufs[0] is t = tanh(z / cap) now
                logits = torch.mul(t, cap, out=bufs[1][:len(y)])
            picked = logits.gather(1, y[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(top).exp_()  # exp(logits - max), in place of the logits
            norm = p.sum(dim=-1, keepdim=True)
            total += (top + norm.log() - picked).sum()  # logsumexp - the label's logit
            p.div_(norm)  # softmax
            p[torch.arange(len(y), device=y.device), y] -= 1.0  # d loss / d logits
            if cap:
                p.mul_(t.mul_(t).neg_().add_(1.0))  # through the softcap: d (cap tanh(z / cap)) / dz = 1 - t^2
            grad[s:s + chunk] = ops.frozen_grad(z.copy_(p), block, shape, views=views)  # z's memory holds p
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def batch_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's learned tokens, their number)."""
    dev = model.device
    ids, mask, labels = batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["labels"].to(dev)
    media = None
    if batch["media"]:
        with torch.no_grad():  # the towers are frozen
            media = model.encode_media(batch["media"])
    with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):  # bf16 products on a GPU
        hidden = model.hidden(ids, mask, media=media)
    learned = labels != IGNORE
    h, y = hidden[learned], labels[learned]  # [N, E], [N]: logits only where there is a loss
    text = model.language_model
    if torch.is_grad_enabled():
        if h.device.type == "cpu":
            return_freed_heap()  # the decoder's freed buffers, before the loss's 128 MB logit chunks
        total = HeadLoss.apply(h, y, text)
    else:
        chunk = max(16, LOSS_BYTES // (4 * text.cfg.vocab_size))
        total = sum((F.cross_entropy(text.logits(h[s:s + chunk]).float(), y[s:s + chunk], reduction="sum")
                     for s in range(0, len(y), chunk)), torch.zeros((), device=h.device))
    return total, len(y)


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_tokens: int, pad_id: int) -> float:
    """Mean cross-entropy per learned token over `examples`."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in batches(examples, batch_tokens, seed=0):
        loss, n = batch_loss(model, collate([examples[i] for i in idx], pad_id))
        total, count = total + loss.item(), count + n
    model.train(was)
    return total / max(1, count)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def latest_checkpoint(out: str) -> str | None:
    found = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[-1])
                   if p.rsplit("-", 1)[-1].isdigit() else -1)
    found = [p for p in found if os.path.isfile(os.path.join(p, "trainer_state.pt"))]
    return found[-1] if found else None


class Trainer:
    """Fine-tunes `llm.model` (a gemma4.LLM's, plain or quantized) with LoRA; `out` receives checkpoints and the
    final adapter (PEFT's format). `resume`: continue from the latest checkpoint in `out`."""

    def __init__(self, llm, lora: LoRAConfig, train: TrainConfig, out: str, adapter: str | None = None):
        self.llm, self.model, self.cfg, self.out = llm, llm.model, train, out
        torch.manual_seed(train.seed)  # the adapter's init
        if adapter is not None:  # continue training a saved adapter
            load_adapter(self.model, adapter)
            for p in lora_parameters(self.model):
                p.requires_grad_(True)
        else:
            apply_lora(self.model, lora)
        self.model.language_model.checkpointing = train.gradient_checkpointing
        self.params = lora_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict] = []

    def _schedule(self, n_batches: int) -> int:
        if self.cfg.steps is not None:
            return self.cfg.steps
        return max(1, math.ceil(self.cfg.epochs * n_batches / self.cfg.grad_accum))

    def save(self, path: str, state: bool) -> None:
        """The adapter at `path` (+ the optimizer, RNG and progress when `state`: a checkpoint-N directory, written
        under a temporary name and renamed, so a crash mid-save leaves the previous checkpoint whole)."""
        if not state:  # the final adapter, beside the checkpoints (each file written whole, then renamed)
            save_adapter(self.model, path, base_model_name_or_path=self.llm.checkpoint)
            return
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.model, tmp, base_model_name_or_path=self.llm.checkpoint)
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch, "rng": _rng_state(), "history": self.history,
                    "train_config": asdict(self.cfg)}, os.path.join(tmp, "trainer_state.pt"))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)

    def resume(self, path: str) -> None:
        from safetensors.torch import load_file

        from .lora import adapter_state, set_adapter_state

        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        ours = adapter_state(self.model)
        saved = load_file(os.path.join(path, "adapter_model.safetensors"))
        if set(saved) != set(ours):
            raise ValueError(f"{path}: the checkpoint's adapter does not match this run's LoRA settings")
        set_adapter_state(self.model, saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = state["history"]
        _set_rng_state(state["rng"])

    def train(self, examples: list[Example], valid: list[Example] | None = None) -> dict:
        cfg, pad = self.cfg, self.llm.tokenizer.pad_id
        if not examples:
            raise ValueError("the training set is empty")
        order = batches(examples, cfg.batch_tokens, cfg.seed + self.epoch)
        total = self._schedule(len(order))
        self.model.train()
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        t0, tokens_seen = time.perf_counter(), 0
        while self.step < total:
            self.optimizer.zero_grad(set_to_none=True)
            parts = []
            for _ in range(cfg.grad_accum):
                if self.batch_in_epoch >= len(order):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    order = batches(examples, cfg.batch_tokens, cfg.seed + self.epoch)
                parts.append(collate([examples[i] for i in order[self.batch_in_epoch]], pad))
                self.batch_in_epoch += 1
            n_learned = sum(int((p["labels"] != IGNORE).sum()) for p in parts)
            loss_sum = 0.0
            for p in parts:  # each micro-batch's gradient scaled to the step's mean
                loss, _ = batch_loss(self.model, p)
                return_freed_heap()  # the forward's freed buffers, before the backward's (RSS peaked on both)
                (loss / n_learned).backward()
                loss_sum += loss.item()
                tokens_seen += int(p["attention_mask"].sum())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_at(self.step, total, cfg)
            self.optimizer.step()
            return_freed_heap()  # a step's activations go back to the system: the peak stays one step's
            self.step += 1
            record = {"step": self.step, "loss": loss_sum / n_learned, "lr": self.optimizer.param_groups[0]["lr"],
                      "tokens_per_s": tokens_seen / (time.perf_counter() - t0)}
            if valid and cfg.eval_every and self.step % cfg.eval_every == 0:
                record["valid_loss"] = evaluate(self.model, valid, cfg.batch_tokens, pad)
            self.history.append(record)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})
                bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                self.save(os.path.join(self.out, f"checkpoint-{self.step}"), state=True)
        if bar is not None:
            bar.close()
        self.model.eval()
        result = {"steps": self.step, "loss": self.history[-1]["loss"] if self.history else None}
        if valid:
            result["valid_loss"] = evaluate(self.model, valid, cfg.batch_tokens, pad)
        self.save(self.out, state=False)
        with open(os.path.join(self.out, "train_history.json"), "w", encoding="utf-8") as f:
            json.dump({"history": self.history, **result}, f, indent=1)
        return result
