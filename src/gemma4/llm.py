"""`LLM`: a checkpoint, its tokenizer and generation behind one object (the user-facing API)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import torch

from .config import parse_config
from .engine.sample import GenerationConfig
from .kernels import DEFAULT_GROUP_SIZE
from .model import Gemma4
from .tokenizer import load_tokenizer
from .weights import load, resolve_checkpoint, resolve_device, resolve_dtype

TINY_DIR = resources.files("gemma4").joinpath("data/tiny-random")
TINY_NOTICE = ("gemma4: no checkpoint given, using the built-in tiny random-weight Gemma 4 "
               "(real tokenizer, random weights: its output is gibberish). Pass --model PATH_OR_HUB_ID for a real one.")


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens, the stop token included when one ended the sequence
    text: str  # the new tokens as text, without the stop token
    finish_reason: str  # "stop" or "length"


@dataclass
class ChatResult:
    content: str | None
    reasoning_content: str | None
    tool_calls: list  # gemma4.chat.parse.ToolCall (.name, .arguments dict, .to_openai())
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the raw output, special tokens included


@dataclass
class StreamEvent:
    index: int  # which prompt
    token_id: int
    text: str  # text this token completes (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None


def tiny_random_model(dtype=torch.float32, device="cpu", seed: int = 0, config=None) -> Gemma4:
    """The built-in tiny Gemma 4 (E2B-like: PLE, KV sharing, double-wide MLP; real 262K vocabulary),
    with random weights drawn from a fixed seed, so the whole stack runs without any download. `config`: another
    (parsed) config to build the same way, e.g. with media towers."""
    if config is None:
        with TINY_DIR.joinpath("config.json").open() as f:
            config = parse_config(json.load(f))
    gen = torch.Generator().manual_seed(seed)
    model = Gemma4(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "scale" in name:
            p.data.uniform_(0.5, 1.5, generator=gen)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def load_model(path=None, dtype=None, device=None, quantize: str | None = None,
               group_size: int = DEFAULT_GROUP_SIZE, mmproj=None, media: bool | None = None) -> Gemma4:
    """`path`'s model (None: the built-in tiny one, said on stderr), as LLM and every tensor-parallel rank load it."""
    if path is None:
        dtype, device = resolve_dtype(dtype or "float32", None), resolve_device(device or "cpu")
        print(TINY_NOTICE, file=sys.stderr)
        model = tiny_random_model(dtype, device)
        from .quant import parse_quantize, quantize_model

        bits = parse_quantize(quantize)
        if bits:
            quantize_model(model, bits, group_size)
        return model
    return load(resolve_checkpoint(path), dtype=dtype, device=device, quantize=quantize, group_size=group_size,
                mmproj=mmproj, media=media)


def _template_text(value) -> str:
    """--chat-template: a file holding a Jinja template, or the template itself (as vLLM takes it)."""
    from .chat.template import _compile

    value = os.fspath(value)
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    elif "{{" not in value and "{%" not in value:
        raise ValueError(f"chat template {value!r}: no such file, and not a Jinja template either")
    _compile(value)  # a syntax error now, not at the first request
    return value


class LLM:
    def __init__(self, path: str | os.PathLike | None = None, dtype=None, device=None,
                 quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE, compile: bool = False,
                 kv_memory: int | None = None, max_seqs: int = 16, prefill_chunk: int = 512,
                 cuda_graphs: bool | None = None, draft_model: str | os.PathLike | None = None,
                 num_draft_tokens: int | None = None, lora: dict | None = None,
                 mmproj: str | os.PathLike | None = None, tensor_parallel: int = 1, expert_parallel: bool = False,
                 max_model_len: int | None = None, chat_template: str | None = None):
        """`path`: checkpoint directory, GGUF file or hub id (None: the built-in tiny random model). `quantize`:
        "int8" / "int4" weight-only, done at load (or load a checkpoint saved by `save_quantized`).
        The engine (engine/engine.py) runs everything: `kv_memory` bytes of K/V (default: 2 GiB on a CPU, 90%
        of free memory on a GPU), `max_seqs` sequences at once, `prefill_chunk` tokens per step; `compile`:
        torch.compile its decode step (a minute or two once, then faster steps); `cuda_graphs`: replay decode
        steps as CUDA graphs (default: on a GPU, where the model allows). `draft_model`: the model's MTP
        assistant (directory or hub id): requests draft `num_draft_tokens` tokens a step with it
        (default: E2B 2, the others 4) and verify them in one forward: greedy output identical to plain decoding,
        sampled output with its distribution (exact rejection sampling). `lora`: {name: adapter directory} (PEFT's
        format) served side by side: a request names its adapter (`adapter=` here, `model` in the server); requests
        with different adapters, and none, run together in one engine step. `mmproj`: a GGUF model's vision / audio
        towers (llama.cpp's mmproj file; by default the one beside the model file). `tensor_parallel`: shard the
        model over that many ranks (GPUs, or CPU processes; gemma4.parallel), started here or by torchrun (the
        non-leader ranks of torchrun then call `self.parallel` `follow`: see the README); `expert_parallel`: split
        a 26B-A4B's experts between the ranks rather than each expert's width. `max_model_len`: serve a shorter
        context than the model's (prompt and output; the default max_new_tokens of the server follows it).
        `chat_template`: a Jinja chat template (its text, or a file holding it) instead of the checkpoint's."""
        if num_draft_tokens is not None and (draft_model is None or isinstance(num_draft_tokens, bool) or
                                             not isinstance(num_draft_tokens, int) or not 1 <= num_draft_tokens <= 8):
            raise ValueError(f"num_draft_tokens must be an integer in [1, 8] with a draft model, got "
                             f"{num_draft_tokens!r}{'' if draft_model is not None else ' without one'}")
        self._chat_template = _template_text(chat_template) if chat_template is not None else None
        self.engine_options = dict(kv_memory=kv_memory, max_seqs=max_seqs, max_step_tokens=prefill_chunk,
                                   max_model_len=max_model_len,
                                   compile=compile, cuda_graphs=cuda_graphs, num_draft_tokens=num_draft_tokens)
        self._engine = None
        self.checkpoint = None if path is None else resolve_checkpoint(path)
        self.parallel = None
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
        if tensor_parallel > 1:
            from .parallel import launch

            if draft_model is not None or lora or compile or cuda_graphs:
                raise ValueError("tensor parallelism runs eagerly, without a draft model or LoRA adapters")
            recipe = dict(path=self.checkpoint, dtype=None if dtype is None else str(dtype).removeprefix("torch."),
                          device=None if device is None else str(device), quantize=quantize, group_size=group_size,
                          mmproj=None if mmproj is None else os.fspath(mmproj))
            self.model, self.parallel = launch(tensor_parallel, recipe, expert_parallel)
            self.engine_options["parallel"] = self.parallel
        elif expert_parallel:
            raise ValueError("expert_parallel needs tensor_parallel > 1 (the ranks to split the experts between)")
        else:
            self.model = load_model(self.checkpoint, dtype, device, quantize, group_size, mmproj)
        self.config = self.model.config
        self.drafter = None
        if draft_model is not None:
            from .model.assistant import check_pair
            from .weights import load_assistant

            try:
                self.drafter = load_assistant(draft_model, dtype=self.model.dtype, device=self.model.device)
                check_pair(self.config.text, self.drafter.cfg)
            except (OSError, ValueError) as e:  # ConfigError and CheckpointError are ValueErrors
                raise ValueError(f"draft model {os.fspath(draft_model)}: {e}") from None
        self.engine_options["drafter"] = self.drafter
        self.lora, self.adapters = {}, {}  # name -> directory; name -> slot
        if lora:
            from .train.lora import serve_adapters

            if not isinstance(lora, dict) or not all(isinstance(k, str) and k for k in lora):
                raise ValueError("lora must be a dict {name: adapter directory}")
            if compile:
                raise ValueError("LoRA adapters are served eagerly: not with compile")
            routing, self.adapters = serve_adapters(self.model, {k: os.fspath(v) for k, v in lora.items()})
            self.lora = {k: os.fspath(v) for k, v in lora.items()}
            self.engine_options["routing"] = routing
        # stop tokens and sampling defaults for every request (the tiny model ships Gemma 4's own)
        self.generation = GenerationConfig.load(self.checkpoint or str(TINY_DIR))
        self._tokenizer = None

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (also done at exit)."""
        if self.parallel is not None:
            self.parallel.close()
            self.parallel = None

    @property
    def engine(self):
        """The engine (engine/engine.py), made on first use."""
        if self._engine is None:
            from .engine.engine import Engine

            self._engine = Engine(self.model, stop_ids=self.generation.stop_token_ids, **self.engine_options)
        return self._engine

    @property
    def tokenizer(self):
        """Loaded on first use (a second and ~100 MB that token-id-only callers do not need)."""
        if self._tokenizer is None:
            ckpt, gguf_file = self.checkpoint, getattr(self.model, "gguf", None)
            if gguf_file is not None:  # the file's own vocabulary (gguf_tokenizer: the built-in one if the same)
                from .weights.gguf import gguf_tokenizer

                self._tokenizer = gguf_tokenizer(gguf_file) or load_tokenizer(None)
                return self._tokenizer
            has_own = ckpt is not None and os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
            self._tokenizer = load_tokenizer(ckpt if has_own else None)
        return self._tokenizer

    @property
    def chat_template(self) -> str:
        """The checkpoint's chat template, else the official 2026-07-09 one of the model's family."""
        if getattr(self, "_chat_template", None) is None:
            from .chat.template import load_chat_template, template_family

            gguf_file = getattr(self.model, "gguf", None)
            own = gguf_file.field("tokenizer.chat_template") if gguf_file is not None else None
            self._chat_template = own or load_chat_template(None if gguf_file is not None else self.checkpoint,
                                                            template_family(self.config))
        return self._chat_template

    def render_chat(self, messages, tools=None, add_generation_prompt: bool = True, enable_thinking: bool = False,
                    image_budget: int | None = None) -> str:
        """The prompt the model will see for these OpenAI-style messages, media placeholders expanded."""
        from .chat.request import prepare_chat

        return prepare_chat(self, messages, tools, enable_thinking=enable_thinking, image_budget=image_budget,
                            add_generation_prompt=add_generation_prompt).prompt

    def chat(self, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
             image_budget: int | None = None, max_new_tokens: int = 512, adapter: str | None = None,
             **sampling) -> ChatResult:
        """One assistant turn: `.content`, `.reasoning_content`, `.tool_calls`. `tool_choice` "required" or
        {"type": "function", "function": {"name": ...}} and `response_format` {"type": "json_object"} /
        {"type": "json_schema", "json_schema": {"schema": ...}} are enforced by constrained decoding.
        Sampling keywords as `generate` (temperature, top_k, top_p, min_p, repetition_penalty, seed)."""
        from .chat.parse import parse_output

        req, events = self.chat_events(messages, tools, tool_choice, response_format, enable_thinking, image_budget,
                                       max_new_tokens, adapter=adapter, **sampling)
        tokens, reason = [], None
        for token, reason in events:
            tokens.append(token)
        text = self.tokenizer.decode(tokens)
        out = parse_output(text)
        finish = "tool_calls" if out.tool_calls else reason
        return ChatResult(out.content, out.reasoning_content, out.tool_calls, finish, len(req.prompt_ids),
                          len(tokens), text)

    def chat_events(self, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
                    image_budget: int | None = None, max_new_tokens: int = 512, adapter: str | None = None,
                    **sampling):
        """Start one assistant turn (arguments as `chat`): returns the prepared request (chat.request.PreparedChat)
        and a generator of (token id, finish reason) as the tokens come, for `chat` and the streaming chat CLI.
        A bad request raises ValueError here, before anything runs."""
        from .chat.request import prepare_chat

        slot = self.adapter_slot(adapter)
        req = prepare_chat(self, messages, tools, tool_choice, response_format, enable_thinking, image_budget,
                           max_tokens=self.engine.max_prompt_tokens)
        params = self.generation.sampling(max_new_tokens, **{**sampling, "stop_token_ids": req.stop_ids})
        media = self.model.encode_media(req.media) if req.media else None
        self.engine.check(req.prompt_ids, media)  # now, not at the first token (`gemma4 chat` printed a traceback)
        events = self._engine_events([req.prompt_ids], [params], [media], [req.constraint], slot)
        return req, ((token, reason) for _, token, reason in events)

    def save_quantized(self, out: str) -> None:
        """Write this (quantized) model as a checkpoint directory that loads without re-quantizing."""
        from .quant import save_quantized

        if self.checkpoint is None:
            raise ValueError("the built-in tiny model has no checkpoint to save from")
        save_quantized(self.model, self.checkpoint, out)

    def adapter_slot(self, adapter: str | None) -> int:
        """The engine slot of a served adapter's name (None: the base model, 0)."""
        if adapter is None:
            return 0
        if adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded (LLM(..., lora={{name: path}}) serves: "
                             f"{sorted(self.adapters) or 'none'})")
        return self.adapters[adapter]

    def generate_stream(self, prompt_token_ids: list[list[int]], max_new_tokens: int = 256, adapter: str | None = None,
                        **sampling) -> Iterator[StreamEvent]:
        """Yield each new token as soon as it is sampled, with the text it completes. Sampling keywords:
        temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed, stop_token_ids, speculative
        (False: no drafting for these prompts); each left out takes the checkpoint's generation_config.json
        default. `adapter`: the name of a served LoRA adapter (see `lora`)."""
        slot = self.adapter_slot(adapter)
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids \
                or not all(isinstance(p, (list, tuple)) for p in prompt_token_ids):
            raise ValueError("prompt_token_ids must be a non-empty list of prompts, each a list of token ids")
        prompts = [list(p) for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            self.engine.check(p, name=f"prompt {i}")
        params = [self.generation.sampling(max_new_tokens, **sampling) for _ in prompts]
        decoders = [self.tokenizer.decode_stream() for _ in prompts]
        for index, token, reason in self._engine_events(prompts, params, adapter=slot):
            text = "" if reason == "stop" else decoders[index].step(token)
            yield StreamEvent(index, token, text, reason)

    def _engine_events(self, prompts, params, media=None, constraints=None, adapter: int = 0):
        """Run requests in the engine; yield (index, token id, finish reason) as tokens come. Leaving early
        (an exception, Ctrl-C, a closed generator) cancels what is left and frees its memory."""
        engine, tag = self.engine, f"llm-{id(prompts)}-"
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add(f"{tag}{i}", p, sp, media=media[i] if media else None,
                       constraint=constraints[i] if constraints else None, adapter=adapter)
        try:
            while engine.has_work():
                for ev in engine.step():
                    if ev.request_id.startswith(tag) and ev.error is not None:
                        raise ev.error  # the engine ended this request (logged); the caller gets why
                    if ev.request_id.startswith(tag) and ev.token_id is not None:
                        yield int(ev.request_id[len(tag):]), ev.token_id, ev.finish_reason
        finally:
            for i in range(len(prompts)):
                engine.abort(f"{tag}{i}")
            while engine.has_work():
                engine.step()

    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int = 256,
                 **kwargs) -> list[GenerationResult]:
        """One result per prompt. Keywords as `generate_stream`."""
        tokens = [[] for _ in prompt_token_ids]
        reasons = [None] * len(prompt_token_ids)
        for ev in self.generate_stream(prompt_token_ids, max_new_tokens, **kwargs):
            tokens[ev.index].append(ev.token_id)
            reasons[ev.index] = ev.finish_reason
        return [GenerationResult(t, self.tokenizer.decode(t[:-1] if r == "stop" else t), r)
                for t, r in zip(tokens, reasons)]
