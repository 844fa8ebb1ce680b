"""The engine: continuous batching over a paged K/V cache, the one generation path (LLM, CLI and server).

    engine = Engine(model, kv_memory=2 << 30)
    engine.add("a", prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_work():
        for ev in engine.step(): ...        # TokenEvent(request_id, token_id, finish_reason, logprobs)

Requests join and leave between steps; each step is one batched forward over the running decodes plus
prompt chunks (engine/scheduler.py), run by the worker (engine/worker.py: compile, CUDA graphs). A failure
in one sequence (its sampler, its grammar, its forward) ends that sequence alone with finish reason "error";
the others go on. `AsyncEngine` runs the steps on a thread for the server: requests and cancellations reach
it through a queue (the event loop never waits for a step), and a request's tokens come back on its own
asyncio queue.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from ..model import Gemma4
from .blocks import BlockPool, Prefixes
from .kv import KINDS, block_bytes, cache_dtype
from .sample import DEFAULT_STOP_TOKEN_IDS, Sampler, SamplingParams, sample_rows
from .scheduler import Scheduler, Work
from .sequence import Sequence, Status
from .worker import Worker

log = logging.getLogger("gemma4.engine")

# Adaptive draft length: draft n tokens while the n-th would still be kept with probability >= MIN_REACH (drafts
# kept with probability a each: a^n); none below that, but one every PROBE_EVERY steps, to notice acceptance
# coming back. Verifying k drafts costs more than a decode step (E2B, k = 4: bf16 1.3x, int4 1.7x), so a sequence
# whose drafts are rejected must stop drafting: bench_speculative.py, acceptance 0.
MIN_REACH, PROBE_EVERY, ACCEPTANCE_WEIGHT = 0.2, 16, 0.3


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None: the request ended without a new token (cancelled, or failed)
    finish_reason: str | None  # "stop", "length", "cancelled", "error" or None (more to come)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: Exception | None = None  # what ended it, with finish_reason "error"
    queued: float | None = None  # on a request's first token: seconds from `add` to its first schedule
    prompt_logprobs: list | None = None  # on its first token, if asked: (logprob, top) of prompt tokens 1..


def default_kv_memory(model: Gemma4) -> int:
    """GPU: 90% of what is free after the weights; CPU: 2 GiB."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(free * 0.9)
    return 2 << 30


class Engine:
    def __init__(self, model: Gemma4, kv_memory: int | None = None, block_size: int = 64, max_seqs: int = 16,
                 max_step_tokens: int = 512, stop_ids=DEFAULT_STOP_TOKEN_IDS, compile: bool = False,
                 cuda_graphs: bool | None = None, max_rollback: int = 8, drafter=None,
                 num_draft_tokens: int | None = None, routing=None, parallel=None, max_model_len: int | None = None):
        """`kv_memory`: bytes of K/V (default: 2 GiB on a CPU, 90% of free memory on a GPU); `max_seqs`
        sequences at once; `max_step_tokens` per step; `stop_ids` where a request gives none; `compile`,
        `cuda_graphs`: see engine/worker.py; `max_rollback`: computed tokens `rollback` takes back without
        recomputing (sliding layers keep that many positions behind their window). `drafter`: an MTP assistant
        (model.assistant, weights.load_assistant) made for this model: requests without a grammar then
        draft `num_draft_tokens` tokens a step (default: E2B 2, the others 4, as vLLM's recipes; at most
        max_rollback) and verify them in one forward (see `_verify`). `routing`: the model's served LoRA
        adapters (train.lora.serve_adapters): a request names its adapter's slot in `add`. `parallel`: the
        gemma4.parallel Group of a sharded model: every worker call runs on all its ranks (`kv_memory` is per rank).
        `max_model_len`: the context served, prompt and output (default and most: the model's)."""
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or not 2 <= max_model_len <= model.config.text.max_position_embeddings):
            raise ValueError(f"max_model_len must be an integer in [2, {model.config.text.max_position_embeddings}] "
                             f"(the model's context), got {max_model_len!r}")
        cfg = model.config.text
        if block_size <= 0 or max_seqs <= 0 or max_step_tokens <= 0 or max_rollback < 0:
            raise ValueError("block_size, max_seqs and max_step_tokens must be positive, and max_rollback >= 0")
        self.drafter, self.num_draft_tokens = drafter, 0
        if drafter is not None:
            from ..model.assistant import check_pair

            check_pair(cfg, drafter.cfg)
            k = (2 if cfg.hidden_size == 1536 else 4) if num_draft_tokens is None else num_draft_tokens
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_rollback:
                raise ValueError(f"num_draft_tokens must be an integer in [1, {max_rollback}], got {k!r}")
            self.num_draft_tokens = k
        elif num_draft_tokens is not None:
            raise ValueError("num_draft_tokens needs a drafter (draft_model)")
        # drafts verified and accepted, in all and at each draft position (1st, 2nd, ...): for /metrics and tests
        self.draft_stats = {"drafted": 0, "accepted": 0, "accepted_at": [0] * self.num_draft_tokens,
                            "drafted_at": [0] * self.num_draft_tokens}
        self.model, self.cfg, self.block_size, self.default_stop = model, cfg, block_size, frozenset(stop_ids)
        dsize = cache_dtype(model).itemsize
        sizes = {k: block_bytes(cfg, k, block_size, dsize) for k in KINDS}
        sizes = {k: b for k, b in sizes.items() if b}
        kv_memory = default_kv_memory(model) if kv_memory is None else int(kv_memory)
        # Sliding layers need one window (+ a chunk) per sequence, and as much again for the prefix cache, but
        # no more than their share of the memory (by bytes per position); the rest goes to the global layers,
        # which grow with the sequences.
        blocks, per_seq = {}, -(-(cfg.sliding_window + max_step_tokens) // block_size) + 2
        if "sliding" in sizes:
            share = kv_memory * sizes["sliding"] // sum(sizes.values())
            blocks["sliding"] = min(2 * max_seqs * per_seq, share // sizes["sliding"])
        if "full" in sizes:
            most = max_seqs * -(-cfg.max_position_embeddings // block_size)  # every sequence at full context
            left = kv_memory - blocks.get("sliding", 0) * sizes.get("sliding", 0)
            blocks["full"] = min(most, left // sizes["full"])
        if blocks.get("sliding", per_seq) < per_seq or blocks.get("full", 4) < 4:
            need = (per_seq * sizes.get("sliding", 0) + 4 * sizes.get("full", 0)) * (1 + ("sliding" in sizes))
            raise ValueError(f"kv_memory {kv_memory} bytes is too small for this model: give it at least {need}")
        self.block_sizes, prefixes = sizes, Prefixes()
        self.pools = {k: BlockPool(n + 1, sizes[k], prefixes) for k, n in blocks.items()}  # + the scratch block
        if parallel is not None:
            if drafter is not None or routing is not None or compile or cuda_graphs:
                raise ValueError("tensor parallelism runs eagerly, without a draft model or LoRA adapters")
            from ..parallel import Leader

            self.worker = Leader(parallel, model, {k: n + 1 for k, n in blocks.items()}, block_size)
        else:
            self.worker = Worker(model, {k: n + 1 for k, n in blocks.items()}, block_size, compile, cuda_graphs,
                                 routing)
        self.num_adapters = len({s for m in model.modules() for s in getattr(m, "adapters", {})}) \
            if routing is not None else 0
        ids = [model.config.token_ids.get(k) for k in ("image_token_id", "video_token_id", "audio_token_id")]
        self.media_ids = frozenset(i for i in ids if i is not None)
        self.scheduler = Scheduler(cfg, self.pools, block_size, max_seqs, max_step_tokens, self.media_ids,
                                   max_rollback)
        self.sequences: dict[str, Sequence] = {}
        self.stepper: AsyncEngine | None = None  # the thread that steps this engine for servers (AsyncEngine.of)
        self.capacity = blocks["full"] * block_size if "full" in blocks else cfg.max_position_embeddings
        # The context served: the model's, or less (max_model_len), and no more than the K/V memory holds.
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, self.capacity)
        self.max_prompt_tokens = self.max_model_len - 1  # one position left to generate

    # ---------------------------------------------------------------- requests
    def add(self, request_id: str, prompt: list[int], params: SamplingParams, media: torch.Tensor | None = None,
            constraint=None, adapter: int = 0) -> None:
        """Queue a request. `media`: the soft-token rows of its media slots, in order (Gemma4.encode_media);
        `adapter`: the slot of the served LoRA adapter it uses (0: none)."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(adapter, int) or isinstance(adapter, bool) or not 0 <= adapter <= self.num_adapters:
            raise ValueError(f"adapter slot {adapter!r}: this engine serves {self.num_adapters} adapter(s)")
        slots = self.check(prompt, media)
        stop = frozenset(params.stop_token_ids) if params.stop_token_ids is not None else self.default_stop
        seq = Sequence(request_id, list(prompt), params, stop, Sampler(params, seen=set(prompt), constraint=constraint),
                       media=media if slots else None)
        seq.adapter, seq.added_at = adapter, time.monotonic()
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def check(self, prompt: list[int], media: torch.Tensor | None = None, name: str = "the prompt") -> int:
        """ValueError unless this engine can take the prompt (ids in the vocabulary, shorter than the context
        and the K/V memory, one soft-token row per media slot); returns its number of media slots. The one
        validator of prompts, for the API, the CLI and the server; `name` says which prompt in messages."""
        vocab, context = self.cfg.vocab_size, self.max_model_len
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError(f"{name} must be a list of integer token ids")
        if not prompt:
            raise ValueError(f"{name} is empty: give a non-empty list of token ids")
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is out of range (token ids are in [0, {vocab}))")
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"{name} has {len(prompt)} tokens; the context is {context} and the K/V memory "
                             f"holds {self.capacity}")
        slots = sum(t in self.media_ids for t in prompt)
        if slots and (media is None or media.shape[0] != slots):
            raise ValueError(f"{name} has {slots} media placeholder tokens (<|image|>, <|audio|>, <|video|>) but "
                             f"{0 if media is None else media.shape[0]} media soft tokens were given: attach media "
                             f"as such, not its placeholder text or ids")
        return slots

    def abort(self, request_id: str) -> None:
        """Cancel a request: it ends, and its memory is freed, at the start of the next step."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def stats(self) -> dict:
        """What servers report and admit by: sequences running and waiting, preemptions and prompt tokens taken
        from the prefix cache so far, K/V memory (`memory`), and with a drafter its counts (`draft_stats`)."""
        sched = self.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting), "preemptions": sched.preemptions,
                "cached_prompt_tokens": sched.cached_tokens, "memory": self.memory(),
                "drafts": self.draft_stats if self.drafter is not None else None}

    def rollback(self, request_id: str, k: int) -> None:
        """Take back the sequence's last k tokens (rejected drafts): it goes on as if it had never seen them.
        Their K/V are forgotten on every kind of layer and blocks past them freed; the token now last is fed
        again by the next step. Sliding layers keep `max_rollback` positions behind their window, so taking
        back that many computed tokens costs nothing; further back, the sequence is recomputed."""
        seq = self.sequences[request_id]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(seq.output):
            raise ValueError(f"rollback: k must be in [1, {len(seq.output)}] (the tokens generated), got {k!r}")
        del seq.output[-k:]
        seq.sampler.rollback(seq.tokens, k)
        self.scheduler.rollback(seq, self.worker.copy_block)

    def memory(self) -> dict:
        """K/V bytes in use and free (free includes cached blocks no sequence holds), per kind and in all."""
        out = {}
        for kind, pool in self.pools.items():
            out[kind] = {"used_bytes": pool.used * pool.block_bytes,
                         "free_bytes": len(pool.free) * pool.block_bytes}
        out["used_bytes"] = sum(v["used_bytes"] for v in out.values())
        out["free_bytes"] = sum(v["free_bytes"] for k, v in out.items() if k in KINDS)
        return out

    # ---------------------------------------------------------------- one step
    def step(self) -> list[TokenEvent]:
        before = {s.id for s in self.scheduler.running} | {s.id for s in self.scheduler.waiting}
        self._propose()
        work = self._whole_drafts(self.scheduler.schedule())
        events = [TokenEvent(rid, None, self.sequences.pop(rid).finish_reason) for rid in before
                  if self.sequences[rid].status is Status.FINISHED]
        # (a single token goes through _verify to keep the target's state where the next step drafts)
        drafting = [w for w in work if self._drafts(w.seq) and not w.seq.scoring
                    and w.start + w.count == len(w.seq)
                    and (w.count > 1 or not self._fresh(w.seq) and self._planned(w.seq) > 0)]
        decodes = [w for w in work if w.count == 1 and w.start == len(w.seq) - 1 and w not in drafting]
        chunks = [w for w in work if w not in decodes and w not in drafting]
        if decodes:
            events += self._decode(decodes)
        for w in chunks:
            last = w.start + w.count == len(w.seq)
            try:
                media, score = self._media(w), self._score(w)
                logits = self.worker.forward([w.seq.token_range(w.start, w.start + w.count)], [w.start],
                                             [w.seq.blocks], media, logits=last, adapters=[w.seq.adapter],
                                             score=score)
                if score is not None:
                    logits, scores = logits
                    done = len(w.seq.prompt_scores) - w.start  # rows scored before a preemption
                    w.seq.prompt_scores += scores[done:len(w.seq.prompt) - 1 - w.start]
                events.append(self._advance(w, w.seq.sampler.sample(logits[0]) if last else None))
            except Exception as e:
                events.append(self.fail(w.seq, e))
        for w in drafting:
            events += self._verify(w)
        return [e for e in events if e is not None]

    # ---------------------------------------------------------------- speculative decoding
    def _drafts(self, seq: Sequence) -> bool:
        """Whether this sequence drafts: a drafter, the request did not opt out, and no structured-output
        constraint (its grammar state would have to follow the drafts)."""
        return self.drafter is not None and seq.params.speculative and seq.sampler.constraint is None

    def _fresh(self, seq: Sequence) -> bool:
        """Whether the sequence holds the target's state at its last token (set by its last `_verify`)."""
        return seq.draft_from is not None and seq.draft_from[2] == len(seq) - 1

    def _planned(self, seq: Sequence) -> int:
        """Drafts worth making this step: as many as the acceptance seen so far says would be kept (MIN_REACH),
        or one to probe after PROBE_EVERY steps without."""
        n = 0
        while n < self.num_draft_tokens and seq.acceptance ** (n + 1) >= MIN_REACH:
            n += 1
        return n if n or seq.plain_steps < PROBE_EVERY else 1

    def _propose(self) -> None:
        """Before scheduling: the drafter proposes up to k tokens after the last token of each drafting sequence
        whose last step verified (it holds that step's target state); they join its output as unverified
        `drafts`, so that the step feeds them with the token they follow."""
        from ..model.assistant import draft

        for seq in self.scheduler.running:
            if seq.uncomputed != 1 or not self._drafts(seq):
                continue
            room = self.max_model_len - len(seq) - 1
            k = min(self._planned(seq), seq.params.max_new_tokens - len(seq.output) - 1,
                    self.scheduler.max_step_tokens - 1, room)
            if k <= 0 or not self._fresh(seq) or not self._room(seq, k):
                seq.plain_steps += 1
                continue
            seq.plain_steps = 0
            hidden, kv, position = seq.draft_from
            text = self.model.language_model
            with torch.inference_mode():
                token = torch.tensor(seq.token_range(len(seq) - 1, len(seq)), device=hidden.device)
                drafts = draft(self.drafter, text.embed, token, hidden, torch.tensor([[position]]), kv, k)
            seq.output += drafts[0].tolist()
            seq.drafts = k

    def _room(self, seq: Sequence, k: int) -> bool:
        """Whether the blocks for k more positions are free now: drafts never preempt a sequence, nor end one
        that is alone and out of memory (the scheduler's "length")."""
        need = -(-(len(seq) + k + 1) // self.block_size)
        return all(need - len(seq.blocks[kind]) <= len(pool.free) for kind, pool in self.pools.items())

    def _whole_drafts(self, work: list) -> list:
        """A sequence's drafts are verified in one forward with the token they follow: where the scheduler
        preempted it or split that run, the drafts are dropped (and it decodes its token alone)."""
        for seq in self.sequences.values():
            if not seq.drafts:
                continue
            item = next((w for w in work if w.seq is seq), None)
            if item is not None and item.count == seq.drafts + 1 and item.start + item.count == len(seq):
                continue
            del seq.output[-seq.drafts:]
            seq.drafts = 0
            if seq.status is Status.RUNNING:
                seq.computed = min(seq.computed, len(seq) - 1)
            if item is not None:
                work[work.index(item)] = Work(seq, seq.computed, len(seq) - seq.computed)
        return work

    def _verify(self, w) -> list[TokenEvent | None]:
        """One forward over the sequence's last token and its k drafts (k may be 0: after a prefill, or where it
        drafted none), sampling each position in turn: a draft is kept while the sampler keeps it (greedy: it is
        the argmax; sampling: exact rejection, see Sampler.sample), and the token sampled at the first rejection,
        or after the last draft, comes as well. So greedy tokens are plain decoding's, and sampled ones have its
        distribution. The rejected drafts' K/V are forgotten (Scheduler.rollback); the target's state at the
        last token kept is where the drafter starts next."""
        seq, k = w.seq, w.seq.drafts
        try:
            logits, hidden, kv = self.worker.forward_with_kv(seq.token_range(w.start, w.start + w.count), w.start,
                                                             seq.blocks, self._media(w), every_token=k > 0,
                                                             adapter=seq.adapter)
        except Exception as e:
            seq.drafts = 0
            return [self.fail(seq, e)]
        drafts = seq.output[len(seq.output) - k:]
        del seq.output[len(seq.output) - k:]
        self.draft_stats["drafted"] += k
        for j in range(k):
            self.draft_stats["drafted_at"][j] += 1
        seq.drafts, seq.computed = 0, w.start + w.count - k - 1  # up to the token the drafts follow
        events, T = [], len(logits)  # rows: every token fed (drafts to verify), or the last one
        for i in range(T - k - 1, T):
            j = i - (T - k - 1)  # the draft this row's token is checked against (none past the last)
            try:
                token, logprob, top = seq.sampler.sample(logits[i], drafts[j] if j < k else None)
            except Exception as e:
                return events + [self.fail(seq, e)]
            seq.computed += 1  # the token at row i: its K/V is the one this forward wrote
            ev = self._emit(seq, token, logprob, top)
            events.append(ev)
            if ev.finish_reason is not None:
                return events
            if j >= k or token != drafts[j]:
                break
            self.draft_stats["accepted_at"][j] += 1
            self.draft_stats["accepted"] += 1
        if k:  # the share of the drafts checked that were kept (a rejection ends the checking)
            seen = j / (j + (j < k))
            seq.acceptance += ACCEPTANCE_WEIGHT * (seen - seq.acceptance)
        self.scheduler.rollback(seq, self.worker.copy_block)  # blocks past the tokens kept
        self.scheduler.register_full_blocks(seq)
        row = w.count - T + i  # the query row of the last token kept (its mask: the keys the drafter reads)
        state = {kind: (K, V, mask[:, :, row:row + 1]) for kind, (K, V, mask) in kv.items()}
        seq.draft_from = (hidden[:, i:i + 1], state, len(seq) - 1)
        return events

    def _decode(self, decodes) -> list[TokenEvent | None]:
        """One batched forward over the decodes; if it fails, each sequence alone, so that only the sequences
        whose own forward fails end. Rewriting a sequence's position writes the same K/V again."""
        try:
            logits = self.worker.forward([w.seq.token_range(w.start, w.start + 1) for w in decodes],
                                         [w.start for w in decodes], [w.seq.blocks for w in decodes],
                                         self._media(decodes[0]) if len(decodes) == 1 else None,
                                         adapters=[w.seq.adapter for w in decodes])
        except Exception as e:
            if len(decodes) == 1:
                return [self.fail(decodes[0].seq, e)]
            return [ev for w in decodes for ev in self._decode([w])]
        sampled = sample_rows([w.seq.sampler for w in decodes], logits)
        return [self.fail(w.seq, s) if isinstance(s, Exception) else self._advance(w, s)
                for w, s in zip(decodes, sampled)]

    def fail(self, seq: Sequence, error: Exception) -> TokenEvent:
        """End one sequence because of `error` (logged), freeing its memory."""
        if isinstance(error, ValueError):  # the request's own doing (its grammar broke down)
            log.warning("request %s failed: %s: %s", seq.id, type(error).__name__, error)
        else:
            log.error("request %s failed: %s: %s", seq.id, type(error).__name__, error, exc_info=error)
        self.scheduler.finish(seq, "error")
        self.sequences.pop(seq.id, None)
        return TokenEvent(seq.id, None, "error", error=error)

    def _media(self, w) -> torch.Tensor | None:
        seq = w.seq
        if seq.media is None:
            return None
        tokens = seq.tokens
        before = sum(t in self.media_ids for t in tokens[:w.start])
        inside = sum(t in self.media_ids for t in tokens[w.start:w.start + w.count])
        return seq.media[before:before + inside] if inside else None

    def _score(self, w) -> tuple | None:
        """(targets, k) for a prompt chunk whose tokens' logprobs are wanted: each position's next token."""
        seq = w.seq
        if not seq.scoring:
            return None
        return seq.token_range(w.start + 1, w.start + w.count + 1) + [0] * (w.start + w.count + 1 - len(seq)), \
            seq.params.prompt_logprobs

    def _advance(self, w, sampled: tuple | None) -> TokenEvent | None:
        """Account for the work done; `sampled`: (token, logprob, top) where it made a token."""
        seq = w.seq
        seq.computed += w.count
        self.scheduler.register_full_blocks(seq)
        if sampled is None:
            return None
        return self._emit(seq, *sampled)

    def _emit(self, seq: Sequence, token: int, logprob, top) -> TokenEvent:
        """A new token of the sequence: appended, and the sequence finished if it is a stop or the limit."""
        seq.output.append(token)
        p = seq.params
        reason = "stop" if token in seq.stop_ids else \
            "length" if len(seq.output) >= p.max_new_tokens or len(seq) >= self.max_model_len else None
        if reason:
            self.scheduler.finish(seq, reason)
            self.sequences.pop(seq.id)
        first = len(seq.output) == 1
        queued = seq.scheduled_at - seq.added_at if first and seq.scheduled_at else None
        scores = seq.prompt_scores if first and p.prompt_logprobs is not None else None
        return TokenEvent(seq.id, token, reason, logprob, top, queued=queued, prompt_logprobs=scores)


class AsyncEngine:
    """An Engine stepped on a background thread, for asyncio servers: `async for ev in generate(...)`.

    The event loop never takes the step lock: new requests and cancellations go through `inbox`, which the
    engine thread drains between steps (a step can take a second on a CPU; a loop blocked on it stalls every
    connection)."""

    _made_lock = threading.Lock()

    @classmethod
    def of(cls, engine: Engine) -> AsyncEngine:
        """The one AsyncEngine of `engine`: two threads stepping one engine would corrupt it (two servers on
        one model in a process, as the tests make)."""
        with cls._made_lock:
            if engine.stepper is None:
                engine.stepper = cls(engine)
            return engine.stepper

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()  # held by the engine thread for each step; others may take it between steps
        self.wake = threading.Event()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (request id, add arguments), or (request id, None)
        self.queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self.ids = itertools.count()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gemma4-engine", daemon=True)
        self.thread.start()

    def waiting(self) -> int:
        """Requests not admitted yet (read without the lock: a count for admission control)."""
        return self.engine.stats()["waiting"] + self.inbox.qsize()

    def stop(self) -> None:
        """End the stepping thread once its current step is done. A process must not exit while a step runs:
        a torch op still running in a daemon thread at exit aborts the process ("terminate called ...")."""
        self.stopping = True
        self.wake.set()
        self.thread.join()
        with self._made_lock:
            if self.engine.stepper is self:
                self.engine.stepper = None

    def _loop(self):
        while not self.stopping:
            self.wake.wait()
            self.wake.clear()  # before draining the inbox: a request queued after this sets it again
            with self.lock:
                events = self._take_inbox()
                try:
                    events += self.engine.step() if self.engine.has_work() else []
                except Exception as e:  # the scheduler itself broke (a bug): every request ends, the server stays
                    log.exception("engine step failed; ending every request")
                    for rid in list(self.engine.sequences):
                        events.append(self.engine.fail(self.engine.sequences[rid], e))
                more = self.engine.has_work()
            for ev in events:
                q = self.queues.get(ev.request_id)
                if q is not None:
                    q[1].call_soon_threadsafe(q[0].put_nowait, ev)
            if more:
                self.wake.set()

    def _take_inbox(self) -> list[TokenEvent]:
        failed = []
        while True:
            try:
                rid, args = self.inbox.get_nowait()
            except queue.Empty:
                return failed
            if args is None:
                self.engine.abort(rid)
                continue
            try:
                self.engine.add(rid, *args)
            except Exception as e:  # callers check requests first (Engine.check); this is the last guard
                log.error("request %s refused by the engine: %s", rid, e)
                failed.append(TokenEvent(rid, None, "error", error=e))

    async def generate(self, prompt: list[int], params: SamplingParams, media=None, constraint=None,
                       name: str = "req", adapter: int = 0):
        """Yield this request's TokenEvents; leaving the loop early (client gone) cancels it. `name` prefixes
        its id in the engine (and so in its log lines); `adapter`: a served LoRA adapter's slot (0: none)."""
        rid = f"{name}#{next(self.ids)}"
        events: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = (events, asyncio.get_running_loop())
        self.inbox.put((rid, (prompt, params, media, constraint, adapter)))
        self.wake.set()
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.queues.pop(rid, None)
            self.inbox.put((rid, None))  # cancel (a no-op once it has finished)
            self.wake.set()

    def run_locked(self, fn, *args):
        """fn(*args) between two engine steps, on the calling thread (the media towers share the device)."""
        with self.lock:
            return fn(*args)
