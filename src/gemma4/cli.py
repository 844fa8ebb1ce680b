"""The `gemma4` command line: `info` (what a checkpoint is, from its config.json alone), `generate` (stream a
completion), `chat` (an interactive chat in the terminal), `serve` (the OpenAI-compatible server), `quantize`,
`finetune` (LoRA / QLoRA) and `merge` (an adapter into its base).

Errors a user can cause (bad flag, missing checkpoint, unusable config) print one line,
`gemma4: error: ...`, and exit with code 2; Ctrl-C exits quietly with 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from . import __version__, hardware
from .config import ConfigError, ModelConfig, load_config
from .engine.sample import GenerationConfig
from .kernels import DEFAULT_GROUP_SIZE
from .llm import LLM, TINY_NOTICE
from .params import count_params
from .weights import CheckpointError, resolve_checkpoint, resolve_device, resolve_dtype

USER_ERRORS = (ValueError, OSError, ConfigError, CheckpointError)  # OSError covers FileNotFoundError


class _Help(argparse.HelpFormatter):
    """--help shows each option's default (where its text does not say it already)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings:
            text += f" (default: {action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)  # subcommands' parsers too
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse prints the whole usage block; keep to the one-line error every other failure gives.
        print(f"gemma4: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


# ---- gemma4 info ----

def _info_config(model: str | None) -> ModelConfig:
    if model is None:
        print(TINY_NOTICE, file=sys.stderr)
        return load_config(str(resources.files("gemma4").joinpath("data/tiny-random/config.json")))
    from .weights.gguf import GGUFModel, find_gguf
    from .weights.mmproj import MmprojFile, find_mmproj, media_config

    if os.path.isfile(model) and not find_gguf(model):  # a config.json given directly
        return load_config(model)
    # A hub id fetches config.json only, not the weight shards (a GGUF repo's `:QUANT`: that file).
    path = model if os.path.exists(model) else resolve_checkpoint(model, config_only=True)
    if find_gguf(path):  # a GGUF file: its metadata, and the mmproj's beside it
        g = GGUFModel(find_gguf(path))
        towers = find_mmproj(g.path)
        return media_config(g, MmprojFile(towers)) if towers else g.config
    return load_config(path)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n else "-"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _per_kind(specs, attr: str) -> str:
    """'256 sliding / 512 global' (one value per attention kind present)."""
    parts = []
    for kind, sliding in (("sliding", True), ("global", False)):
        values = sorted({getattr(s, attr) for s in specs if s.sliding == sliding})
        if values:
            parts.append(f"{'/'.join(map(str, values))} {kind}")
    return " / ".join(parts)


def _info_rows(name: str, cfg: ModelConfig, c: dict) -> list[tuple[str, str]]:
    t, specs = cfg.text, cfg.text.layers
    n_sliding = sum(s.sliding for s in specs)
    shared = [s for s in specs if s.kv_shared]
    donors = sorted({s.kv_source for s in shared})
    mlp = sorted({s.intermediate_size for s in specs})
    v, a = cfg.vision, cfg.audio
    return [
        ("model", name),
        ("architecture", f"{cfg.architecture} ({t.dtype})"),
        ("layers", f"{t.num_layers}: {n_sliding} sliding (window {t.sliding_window}), "
                   f"{t.num_layers - n_sliding} global"),
        ("KV-shared layers", f"{len(shared)} (layers {shared[0].index}-{shared[-1].index} reuse the K/V of layers "
                             f"{', '.join(map(str, donors))})" if shared else "none"),
        ("hidden size", f"{t.hidden_size}, {t.num_heads} query heads"),
        ("head dim", _per_kind(specs, "head_dim")),
        ("KV heads", _per_kind(specs, "num_kv_heads")),
        ("K=V (no v_proj)", "global layers" if any(s.k_eq_v for s in specs) else "no"),
        ("MLP width", " / ".join(map(str, mlp)) + (" (wider on KV-shared layers)" if len(mlp) > 1 else "")),
        ("MoE", f"{t.num_experts} experts, top-{t.top_k_experts}, width {t.moe_intermediate_size}"
                if t.num_experts else "no"),
        ("PLE", f"{t.ple_dim} per layer" if t.ple_dim else "no"),
        ("vision tower", f"{v.get('num_hidden_layers')} layers, width {v.get('hidden_size')}" if v else "no"),
        ("audio tower", f"{a.get('num_hidden_layers')} layers, width {a.get('hidden_size')}" if a else "no"),
        ("max context", f"{t.max_position_embeddings} tokens"),
        ("", ""),
        ("parameters", _count(c["params_total"])),
        ("  active per token", _count(c["params_active"]) + (f" (top-{t.top_k_experts} of {t.num_experts} experts)"
                                                            if t.num_experts else "")),
        ("  text decoder", _count(c["params_text"])),
        ("    token embedding", _count(c["params_embedding"]) + " (= LM head)"),
        ("    PLE table", _count(c["params_ple"])),
        ("  vision tower", _count(c["params_vision"])),
        ("  audio tower", _count(c["params_audio"])),
        ("", ""),
        (f"KV cache ({c['dtype']})", f"{c['context']} tokens, one sequence"),
        ("  per token", f"{c['kv_bytes_per_token']:,} bytes (average)"),
        ("  total", f"{_bytes(c['kv_cache_bytes'])} ({c['kv_cache_bytes']:,} bytes)"),
    ]


def _hardware_rows(d: dict) -> list[tuple[str, str]]:
    rows = [("cpu", f"{d['cpu']} ({d['arch']}, {d['threads']} threads)"),
            ("features", " ".join(d["features"]) or "none of note"),
            ("torch capability", f"{d['torch_capability']}; oneDNN bf16 GEMM: {'yes' if d['onednn_bf16'] else 'no'}"),
            ("kernel builds", ", ".join(d["kernel_isas"]) or "none for this CPU"),
            ("kernels", f"{d['kernel_isa']}: {d['kernels']}" if d["kernel_isa"] else d["kernels"]),
            ("paths", "")]
    return rows + [(f"  {k}", v) for k, v in d["paths"].items()]


def cmd_info(args) -> int:
    if args.hardware:
        from . import hardware

        d = hardware.describe()
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            for label, value in _hardware_rows(d):
                print(f"{label:<34}{value}".rstrip())
        return 0
    if args.context is not None and args.context <= 0:
        raise ValueError(f"--context must be a positive number of tokens, got {args.context}")
    cfg = _info_config(args.model)
    c = count_params(cfg, args.context)
    if args.tensor_parallel > 1 or args.expert_parallel:
        from .params import plan_parallel

        if args.tensor_parallel < 2:
            raise ValueError("--expert-parallel needs --tensor-parallel N > 1")
        c.update(plan_parallel(cfg, args.tensor_parallel, args.expert_parallel, args.context))
    elif args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be a positive number of ranks, got {args.tensor_parallel}")
    if args.json:
        specs = cfg.text.layers
        out = {k: v for k, v in c.items() if k != "layers"}
        out.update(num_layers=c["layers"], num_sliding_layers=sum(s.sliding for s in specs),
                   num_global_layers=sum(not s.sliding for s in specs),
                   num_kv_shared_layers=sum(s.kv_shared for s in specs), sliding_window=cfg.text.sliding_window,
                   num_experts=cfg.text.num_experts, top_k_experts=cfg.text.top_k_experts,
                   ple_dim=cfg.text.ple_dim, max_position_embeddings=cfg.text.max_position_embeddings,
                   architecture=cfg.architecture)
        print(json.dumps(out, indent=2))
    else:
        rows = _info_rows(args.model or "built-in tiny-random", cfg, c)
        if "tensor_parallel" in c:
            rows += [("", ""), ("tensor parallel", f"{c['tensor_parallel']} ranks" +
                                (", experts split between them" if c["expert_parallel"] else "")),
                     ("  weights per rank", f"{_bytes(c['weight_bytes_per_rank'])} ({c['dtype']}; rank 0 also "
                                            f"the towers: {_bytes(c['tower_bytes_rank0'])})"),
                     ("  KV cache per rank", f"{_bytes(c['kv_cache_bytes_per_rank'])} "
                                             f"({c['kv_bytes_per_token_per_rank']:,} bytes a token)")]
        for label, value in rows:
            print(f"{label:<22}{value}".rstrip())
    return 0


# ---- gemma4 generate ----

def _prompt_text(args) -> str:
    """The prompt: the argument, `-` for stdin, or --prompt-file."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise ValueError("give the prompt or --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: {e}") from None
    if args.prompt is None:
        raise ValueError("give a prompt (the argument, - for stdin, or --prompt-file FILE)")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _common_setup(args) -> None:
    """--threads and --seed (checked and applied before anything loads)."""
    import torch

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "global_seed", None) is not None:
        torch.manual_seed(args.global_seed)  # requests without a seed of their own draw from here


def cmd_generate(args) -> int:
    _common_setup(args)
    prompt = _prompt_text(args)
    if not prompt:
        raise ValueError("the prompt is empty")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    # Check every option before loading gigabytes of weights.
    GenerationConfig().sampling(**sampling)
    if args.dtype:
        resolve_dtype(args.dtype, None)
    resolve_device(args.device)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile,
              draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens, lora=_lora_modules(args),
              max_model_len=args.max_model_len, chat_template=args.chat_template, **_parallel(args))
    if args.system is not None:  # a chat turn: the system prompt, then the prompt as the user's message
        prompt = llm.render_chat([{"role": "system", "content": args.system}, {"role": "user", "content": prompt}])
        ids = llm.tokenizer.encode(prompt)
    else:
        ids = llm.tokenizer.encode(prompt, add_bos=True)
    for ev in llm.generate_stream([ids], adapter="adapter" if args.adapter else None, **sampling):
        print(ev.text, end="", flush=True)
    print()
    return 0


def cmd_quantize(args) -> int:
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty")
    llm = LLM(args.model, dtype=args.dtype, device="cpu", quantize=args.to, group_size=args.group_size)
    llm.save_quantized(args.out)
    print(f"wrote {args.to} checkpoint to {args.out}")
    return 0


# ---- gemma4 finetune / merge ----

def _csv(text: str | None, what: str, kind=str) -> tuple | None:
    if text is None:
        return None
    try:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list") from None
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def cmd_finetune(args) -> int:
    from .train.data import load_dataset
    from .train.lora import TEXT_MODULES, LoRAConfig
    from .train.trainer import TrainConfig, Trainer, latest_checkpoint

    lora = LoRAConfig(r=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      dropout=args.dropout, target_modules=_csv(args.target_modules, "--target-modules") or
                      TEXT_MODULES, layers=_csv(args.layers, "--layers", int), towers=args.towers)
    train = TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, warmup=args.warmup,
                        grad_accum=args.grad_accum, batch_tokens=args.batch_tokens,
                        gradient_checkpointing=not args.no_gradient_checkpointing, eval_every=args.eval_every,
                        save_every=args.save_every, seed=args.seed, weight_decay=args.weight_decay)
    if args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2, got {args.max_len}")
    for f in [args.data] + ([args.valid] if args.valid else []):
        if not os.path.isfile(f):
            raise ValueError(f"no dataset file at {f}")
    resume = latest_checkpoint(args.out) if args.resume else None
    if args.resume and resume is None:
        raise ValueError(f"--resume: no checkpoint-N in {args.out} to continue from")
    if not args.resume and os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty (--resume continues a run there)")
    if args.dtype:
        resolve_dtype(args.dtype, None)
    dtype, device = args.dtype, resolve_device(args.device)
    if dtype is None and device.type == "cpu" and _quantized(args) and hardware.native_bf16():
        dtype = "bfloat16"  # QLoRA's activations (a quantized model computes in fp32 on a CPU by default)
    llm = LLM(args.model, dtype=dtype, device=args.device, quantize=args.quantize)
    examples = load_dataset(llm, args.data, args.max_len, args.think)
    valid = load_dataset(llm, args.valid, args.max_len, args.think) if args.valid else None
    trainer = Trainer(llm, lora, train, args.out, adapter=args.adapter)
    if resume:
        trainer.resume(resume)
        print(f"resuming from {resume} (step {trainer.step})", file=sys.stderr)
    n_tokens = sum(len(e) for e in examples)
    print(f"fine-tuning on {len(examples)} examples ({n_tokens} tokens); LoRA rank {lora.r} on "
          f"{len(trainer.params) // 2} modules, {sum(p.numel() for p in trainer.params) / 1e6:.2f} M parameters",
          file=sys.stderr)
    result = trainer.train(examples, valid)
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
    print(f"wrote the adapter to {args.out} ({shown})")
    return 0


def _quantized(args) -> bool:
    """Whether the model will be quantized: --quantize, or a checkpoint saved by `gemma4 quantize`."""
    from .weights import _saved_quantization

    return bool(args.quantize) or (args.model is not None and
                                   _saved_quantization(resolve_checkpoint(args.model)) is not None)


def cmd_merge(args) -> int:
    from .train.lora import load_adapter, merge_lora, save_merged

    if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty")
    if args.model is None:
        raise ValueError("--model: merging needs the base checkpoint the adapter was trained on")
    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    if getattr(llm.model, "quantization", None):
        raise ValueError(f"{args.model} is a quantized checkpoint: merge into the float base, then quantize")
    load_adapter(llm.model, args.adapter)
    merge_lora(llm.model)
    save_merged(llm.model, llm.checkpoint, args.out)
    print(f"wrote the merged checkpoint to {args.out}")
    return 0


def cmd_export(args) -> int:
    from .weights.gguf import export_gguf

    for flag, out in (("--gguf", args.gguf), ("--mmproj", args.mmproj)):
        if out is not None and os.path.exists(out):
            raise ValueError(f"{flag} {out} exists; give a new file name")
        if out is not None and not out.endswith(".gguf"):
            raise ValueError(f"{flag} {out}: the file name must end in .gguf")
    llm = LLM(args.model, dtype="float32" if args.type == "f32" else None, device="cpu")
    if args.mmproj and not (hasattr(llm.model, "vision_tower") or hasattr(llm.model, "audio_tower")):
        raise ValueError(f"--mmproj: {args.model or 'the built-in model'} has no vision or audio tower")
    if args.adapter:  # a LoRA adapter folded in first (as `gemma4 merge`)
        from .train.lora import load_adapter, merge_lora

        if getattr(llm.model, "quantization", None):
            raise ValueError(f"{args.model} is quantized: merge an adapter into the float base")
        load_adapter(llm.model, args.adapter)
        merge_lora(llm.model)
    source = llm.checkpoint if llm.checkpoint and os.path.isdir(llm.checkpoint) else None
    export_gguf(llm.model, args.gguf, args.type, model_dir=source, chat_template=llm.chat_template)
    print(f"wrote {args.type} GGUF to {args.gguf}")
    if args.mmproj:
        from .weights.mmproj import export_mmproj

        export_mmproj(llm.model, args.mmproj, args.type, model_dir=source)
        print(f"wrote the towers' mmproj GGUF to {args.mmproj}")
    return 0


# ---- gemma4 serve ----

def _parse_bytes(text: str | None, flag: str = "--kv-memory") -> int | None:
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"{flag} {text!r}: expected bytes like 2GB, 512MiB or 1073741824") from None


def _lora_modules(args) -> dict | None:
    """--lora NAME=PATH ... (serve) or --adapter PATH (generate, chat: served as "adapter", used throughout)."""
    if getattr(args, "adapter", None):
        return {"adapter": args.adapter}
    out = {}
    for item in getattr(args, "lora", None) or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {item!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"--lora: the name {name!r} is given twice")
        out[name] = path
    return out or None


def _parallel(args) -> dict:
    """--tensor-parallel (under torchrun, 1 means its WORLD_SIZE) and --expert-parallel, as LLM's arguments."""
    n = args.tensor_parallel
    if n == 1 and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        n = int(os.environ["WORLD_SIZE"])
    if n < 1:
        raise ValueError(f"--tensor-parallel must be a positive number of ranks, got {n}")
    return {"tensor_parallel": n, "expert_parallel": args.expert_parallel}


def _load(args) -> LLM:
    if args.dtype:
        resolve_dtype(args.dtype, None)
    resolve_device(args.device)
    _common_setup(args)
    return LLM(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
               kv_memory=_parse_bytes(getattr(args, "kv_memory", None)), max_seqs=getattr(args, "max_seqs", 16),
               prefill_chunk=getattr(args, "prefill_chunk", 512), compile=args.compile,
               draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens, lora=_lora_modules(args),
               mmproj=args.mmproj, max_model_len=args.max_model_len, chat_template=args.chat_template,
               **_parallel(args))


def _listen(host: str, port: int):
    """A listening socket on host:port (port 0: any free one), or one clear error."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    import logging
    import signal

    import uvicorn

    from .chat.request import MediaPolicy
    from .server.app import create_app
    from .server.service import Limits

    if args.allow_local_media and not os.path.isdir(args.allow_local_media):
        raise ValueError(f"--allow-local-media {args.allow_local_media}: no such directory")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    if args.max_seqs <= 0 or args.prefill_chunk <= 0:
        raise ValueError("--max-seqs and --prefill-chunk must be positive")
    if args.max_waiting < 0:
        raise ValueError("--max-waiting must be >= 0")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise ValueError("--shutdown-timeout must be >= 0 seconds")
    max_request_bytes = _parse_bytes(args.max_request_bytes, "--max-request-bytes")
    if max_request_bytes <= 0:
        raise ValueError("--max-request-bytes must be positive")
    _parse_bytes(args.kv_memory)
    sock = _listen(args.host, args.port)  # before minutes of loading: a port in use is an error at once
    llm = _load(args)
    name = args.served_model_name or (args.model or "gemma4-tiny-random")
    policy = MediaPolicy(args.allow_local_media, args.allow_remote_media)
    limits = Limits(max_request_bytes=max_request_bytes, max_waiting=args.max_waiting)
    app = create_app(llm, name, args.api_key or os.environ.get("GEMMA4_API_KEY"), policy, limits, args.metrics_public)
    logging.basicConfig(format="gemma4 %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gemma4").setLevel(logging.INFO)
    if args.no_access_log:  # (errors are still logged, by gemma4.server)
        logging.getLogger("gemma4.access").setLevel(logging.WARNING)
    host = f"[{args.host}]" if ":" in args.host else args.host
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # On SIGTERM uvicorn stops accepting, lets running requests finish for --shutdown-timeout seconds, cancels
    # the rest, then raises SIGTERM again with the handler it found: this one, so a drained server exits 0, not by
    # the signal; and a SIGTERM before uvicorn takes over stops it as soon as it runs (not lost).
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    # The socket listens already (connections wait in its backlog): the URL works from this line on.
    print(f"gemma4: serving {name} on http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    if llm.parallel is not None:  # a lost rank ends the server (drained as on SIGTERM), with its reason
        llm.parallel.on_lost = lambda: os.kill(os.getpid(), signal.SIGTERM)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.service.engine.stop()
    if llm.parallel is not None and llm.parallel.lost is not None:
        print(f"gemma4: error: a tensor-parallel rank was lost ({llm.parallel.lost}); the server stopped",
              file=sys.stderr)
        return 1
    return 0


# ---- gemma4 chat ----

CHAT_HELP = "commands: /think (toggle thinking), /image FILE, /audio FILE, /reset, /quit"


def cmd_chat(args) -> int:
    from .chat.parse import StreamParser

    llm = _load(args)
    history, pending, thinking = [], [], args.think
    system = [{"role": "system", "content": args.system}] if args.system else []
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"gemma4 chat ({args.model or 'built-in tiny random model'}); {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            history, pending = [], []
            print("(history cleared)")
            continue
        if cmd == "/think":
            thinking = not thinking
            print(f"(thinking {'on' if thinking else 'off'})")
            continue
        if cmd in ("/image", "/audio"):
            path = os.path.expanduser(rest.strip())
            if not os.path.isfile(path):
                print(f"(no such file: {path})")
                continue
            kind = cmd[1:]
            pending.append({"type": kind, kind: os.path.abspath(path)})
            print(f"({kind} attached to your next message)")
            continue
        if cmd.startswith("/"):
            print(f"(unknown command; {CHAT_HELP})")
            continue
        if not line.strip():
            continue
        message = {"role": "user", "content": [*pending, {"type": "text", "text": line}] if pending else line}
        try:
            _, events = llm.chat_events(system + history + [message], enable_thinking=thinking,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        adapter="adapter" if args.adapter else None)
        except ValueError as e:
            print(f"(error: {e})")
            continue
        pending = []
        decoder, parser, answer = llm.tokenizer.decode_stream(), StreamParser(), []
        try:
            for token, reason in events:
                piece = "" if reason == "stop" else decoder.step(token)
                for d in parser.feed(piece) + (parser.finish() if reason else []):
                    if d.kind == "reasoning":
                        print(f"{dim}{d.text}{reset}", end="", flush=True)
                    elif d.kind == "content":
                        print(d.text, end="", flush=True)
                        answer.append(d.text)
                    else:
                        print(f"[tool call {d.tool_call.name}({d.tool_call.arguments})]", end="", flush=True)
        except KeyboardInterrupt:  # stop this answer (its request is cancelled now), keep the chat
            events.close()
        print()
        history += [message, {"role": "assistant", "content": "".join(answer)}]


SAMPLING_DEFAULT = "default: the checkpoint's generation_config.json (Gemma 4: 1.0, with top_k 64, top_p 0.95)"
COMPILE_HELP = "torch.compile the engine's decode step: a minute or two of compiling, then faster tokens"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma4", description="Google's Gemma 4 models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"gemma4 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "checkpoint directory, GGUF file or Hugging Face hub id (default: the built-in tiny random model)"

    p = sub.add_parser("info", help="architecture, parameter counts and K/V cache size, from config.json alone")
    p.add_argument("--model", help=model_help)
    p.add_argument("--context", type=int, help="tokens for the K/V cache size (default: the model's maximum)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--hardware", action="store_true",
                   help="what this CPU can do and which kernel path each product takes (builds the kernels)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="plan the memory of each of N tensor-parallel ranks (default 1)")
    p.add_argument("--expert-parallel", action="store_true", help="with --tensor-parallel: experts split, not sliced")
    p.set_defaults(func=cmd_info)

    def context_options(p):
        p.add_argument("--max-model-len", type=int, metavar="N",
                       help="serve at most N tokens of context, prompt and output (default: the model's)")
        p.add_argument("--chat-template", metavar="FILE",
                       help="a Jinja chat template file (or its text) instead of the checkpoint's")
        p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: torch's choice)")

    def parallel_options(p):
        p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="shard the model over N ranks: N GPUs, or N CPU processes (default 1; under torchrun, "
                            "its WORLD_SIZE)")
        p.add_argument("--expert-parallel", action="store_true",
                       help="with --tensor-parallel: split a 26B-A4B's experts between the ranks (128 / N each)")

    def draft_options(p):
        p.add_argument("--draft-model", help="the model's MTP assistant (directory or hub id): requests "
                                             "draft tokens with it, verified by the model (same output, faster)")
        p.add_argument("--num-draft-tokens", type=int,
                       help="tokens drafted a step, 1-8 (default: E2B 2, the others 4)")

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    p.add_argument("prompt", nargs="?", help="the text to complete; - reads it from stdin")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--system", help="render the prompt as a chat turn after this system prompt (chat template)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, help=SAMPLING_DEFAULT + "; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (" + SAMPLING_DEFAULT + ")")
    p.add_argument("--top-p", type=float, help="nucleus sampling (" + SAMPLING_DEFAULT + ")")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (default: off)")
    p.add_argument("--repetition-penalty", type=float, help="seen tokens' logits divided by it (default: 1, off)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization at load")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    context_options(p)
    parallel_options(p)
    draft_options(p)
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to generate with")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="write an int8 / int4 copy of a checkpoint (loads without re-quantizing)")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    p.add_argument("--to", choices=["int8", "int4"], required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"weights per scale (a multiple of 32; default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--dtype", help="dtype of the float weights kept (norms...; default: the checkpoint's)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning on a JSONL dataset; writes a PEFT adapter")
    p.add_argument("--model", help=model_help)
    p.add_argument("--data", required=True, help="training JSONL: {messages}, {prompt, completion} or {text} per line")
    p.add_argument("--valid", help="validation JSONL (same formats)")
    p.add_argument("--out", required=True, help="output directory: the adapter, checkpoint-N/ every --save-every")
    p.add_argument("--quantize", choices=["int8", "int4"], help="QLoRA: the frozen base quantized at load")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha: updates scaled by alpha / rank (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    p.add_argument("--target-modules", help="comma-separated projection names (default: q,k,v,o,gate,up,down _proj;"
                                             " the 26B-A4B expert banks too)")
    p.add_argument("--layers", help="comma-separated decoder layer indices to adapt (default: all)")
    p.add_argument("--towers", action="store_true", help="also adapt the vision / audio towers' projections")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then cosine decay (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per micro-batch (default 2048)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens kept per example (default 2048)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, more memory)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation losses (default: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: the end only)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-N in --out")
    p.add_argument("--adapter", help="start from this adapter (PEFT format) instead of a new one")
    p.add_argument("--think", action="store_true", help="render conversations with thinking on")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a checkpoint in the published layout")
    p.add_argument("--model", help="the base checkpoint directory or hub id")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", help="dtype of the merged weights (default: the checkpoint's)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write the model as a GGUF file llama.cpp runs (its converter's layout)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--gguf", required=True, help="output file (.gguf)")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default="bf16",
                   help="tensor type (norms and the router stay f32, as llama.cpp's converter keeps them; "
                        "default bf16)")
    p.add_argument("--adapter", help="a LoRA adapter (PEFT format) merged into the weights first")
    p.add_argument("--mmproj", metavar="OUT", help="also write the vision / audio towers as an mmproj GGUF (--type, "
                   "but f16 for q4_0), as llama.cpp's converter does with --mmproj")
    p.set_defaults(func=cmd_export)

    def load_options(p):
        p.add_argument("--model", help=model_help)
        p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's)")
        p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
        p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization at load")
        p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        p.add_argument("--mmproj", metavar="FILE", help="a GGUF model's vision / audio towers (llama.cpp's mmproj "
                       "GGUF; default: the mmproj*.gguf beside the model file)")
        context_options(p)
        p.add_argument("--seed", dest="global_seed", type=int, metavar="N",
                       help="seed the random state: requests without a seed of their own repeat from run to run")
        parallel_options(p)
        draft_options(p)

    p = sub.add_parser("chat", help="chat in the terminal (streams; /think, /image FILE, /reset, /quit)")
    load_options(p)
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to chat with")
    p.add_argument("--think", action="store_true", help="start with thinking on")
    p.add_argument("--system", help="a system prompt for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens an answer may take at most")
    p.add_argument("--temperature", type=float, help=SAMPLING_DEFAULT + "; 0 = greedy")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    load_options(p)
    p.add_argument("--lora", nargs="+", action="extend", metavar="NAME=PATH",
                   help="LoRA adapters (PEFT format) served beside the base model: a request whose model is NAME "
                        "uses it (as vLLM's --lora-modules)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GEMMA4_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients ask for (default: --model)")
    p.add_argument("--kv-memory", help="K/V cache memory, e.g. 4GB (default: 2 GiB on a CPU, 90%% of free GPU memory)")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--allow-local-media", metavar="DIR", help="let requests read image/audio/video files under DIR")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests fetch http(s) media URLs (public addresses only)")
    p.add_argument("--max-request-bytes", default="32MiB", help="largest request body, base64 media included")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are cancelled")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--no-access-log", action="store_true", help="no log line per request (gemma4.access)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gemma4 info | head`): stop quietly, as Unix tools do. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"gemma4: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
