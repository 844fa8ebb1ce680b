"""Tensor and expert parallelism on torch.distributed (NCCL between GPUs, gloo on CPUs), as gpt-fast's tp.py:
each rank holds a shard of every large weight, and the model code is unchanged but for the Linear layers swapped
for their shards and an all-reduce after the layers whose outputs are partial sums.

    attention   q, k, v by heads (column-wise); KV heads a rank's query heads read, copied where there are
                fewer KV heads than ranks (E2B / E4B: 1-2); o row-wise, then an all-reduce
    MLP         gate, up column-wise; down row-wise, then an all-reduce
    experts     tensor parallel: every expert's width split as the MLP's; `expert_parallel`: whole experts,
                128 / N per rank (each rank runs the tokens routed to its experts; an all-reduce sums them)
    vocabulary  the embedding and LM head split by token id: a lookup is an all-reduce of each rank's rows,
                logits an all-gather (before the softcap)
    the rest    norms, the router, the PLE table and projections: whole on every rank; the media towers on
                rank 0 alone, which encodes media and sends the soft tokens with the step

Only rank 0 (the leader) runs the scheduler and the server; the followers run every worker call it makes, in
the same order (`Leader`, `follow`): each step's inputs travel as one pickled message on a gloo group, and the
tensors of the forward through the all-reduces. A rank that dies ends the others: the followers exit, the
leader's engine raises `RankLost` from then on (`gemma4 serve` shuts down).

Processes: `launch` starts the followers itself (`python -m gemma4.parallel`), or joins the ones torchrun
started (RANK / WORLD_SIZE in the environment: every rank runs the same command, and on the non-leaders `launch`
follows the leader and then ends the process).
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("gemma4.parallel")
# Followers wait on the leader's next step for as long as the server is idle: a dead peer is seen at once on the
# sockets, so the collective timeout only bounds a live peer that stopped answering.
TIMEOUT = datetime.timedelta(days=7)


class RankLost(RuntimeError):
    """A tensor-parallel rank died, or a sharded step failed part-way: the ranks can no longer run together."""


class Group:
    """This process's place among the ranks: `rank`, `world`, its `device`, and the followers it started."""

    def __init__(self, rank: int, world: int, device: torch.device, procs=()):
        self.rank, self.world, self.device, self.procs = rank, world, device, list(procs)
        self.commands = dist.new_group(backend="gloo", timeout=TIMEOUT)  # CPU messages, whatever the device
        self.lost: Exception | None = None
        self.closed = False
        self.on_lost = None  # called once when a rank is lost (gemma4 serve: shut down)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, message) -> None:
        """Leader: one message to every follower (None: stop)."""
        self.check()
        try:
            dist.broadcast_object_list([message], src=0, group=self.commands)
        except Exception as e:
            raise self.fail(e) from None

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def check(self) -> None:
        if self.lost is not None:
            raise RankLost(f"tensor parallelism stopped: {self.lost}")

    def fail(self, error: Exception) -> RankLost:
        if self.lost is None:
            self.lost = error
            log.error("tensor-parallel step failed, the ranks cannot go on together: %s: %s",
                      type(error).__name__, error)
            if self.on_lost is not None:
                self.on_lost()
        return RankLost(f"tensor parallelism stopped: {type(error).__name__}: {error}")

    def close(self) -> None:
        """Leader: stop the followers and wait for them; every rank leaves the process group."""
        if self.closed or not dist.is_initialized():
            return
        self.closed = True
        if self.leader and self.lost is None:
            try:
                self.send(None)
            except RankLost:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        dist.destroy_process_group()


# ---- sharding ---------------------------------------------------------------------------------------------

def check_divisible(cfg, world: int, expert_parallel: bool = False, group_size: int | None = None) -> None:
    """ValueError unless `world` ranks can split this text config (heads, KV heads, widths, experts, vocabulary);
    `group_size`: that of quantized weights, whose row-wise shards must hold whole groups."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"tensor parallel size {world}: {what}")

    need(isinstance(world, int) and not isinstance(world, bool) and world >= 1, "must be a positive integer")
    need(cfg.num_heads % world == 0, f"the {cfg.num_heads} attention heads do not split into {world}")
    for kv in sorted({s.num_kv_heads for s in cfg.layers}):
        need(kv % world == 0 or world % kv == 0, f"{kv} KV heads neither split into {world} ranks nor divide them")
    need(cfg.vocab_size % world == 0, f"the vocabulary of {cfg.vocab_size} does not split into {world}")
    widths = {("MLP width", s.intermediate_size) for s in cfg.layers}
    widths |= {("attention width", cfg.num_heads * s.head_dim) for s in cfg.layers}
    if cfg.num_experts and expert_parallel:
        need(cfg.num_experts % world == 0, f"the {cfg.num_experts} experts do not split into {world}")
    elif cfg.num_experts:
        widths.add(("expert width", cfg.moe_intermediate_size))
    for what, w in sorted(widths):
        step = world * (group_size or 1)
        need(w % step == 0, f"the {what} {w} does not split into {world} shards" +
             (f" of whole quantization groups of {group_size}" if group_size else ""))


def _rows(module, a: int, b: int) -> None:
    """Keep output rows [a, b) of a Linear (plain or quantized)."""
    if hasattr(module, "qweight"):
        module.qweight, module.scales = module.qweight[a:b].contiguous(), module.scales[a:b].contiguous()
    else:
        module.weight = nn.Parameter(module.weight[a:b].contiguous(), requires_grad=False)
    module.out_features = b - a


def _cols(module, a: int, b: int) -> None:
    """Keep input columns [a, b) of a Linear (quantized: whole groups; int4 packs two columns a byte)."""
    if hasattr(module, "qweight"):
        per_byte, gs = 2 if module.bits == 4 else 1, module.group_size
        module.qweight = module.qweight[:, a // per_byte:b // per_byte].contiguous()
        module.scales = module.scales[:, a // gs:b // gs].contiguous()
    else:
        module.weight = nn.Parameter(module.weight[:, a:b].contiguous(), requires_grad=False)
    module.in_features = b - a


def _bank(experts, attr: str, select) -> None:
    """An expert bank [n, out, in] (plain, or QuantizedBank: qweight / scales) cut by `select(tensor, kind)`."""
    bank = getattr(experts, attr)
    if isinstance(bank, nn.Module):
        bank.qweight, bank.scales = select(bank.qweight, "q"), select(bank.scales, "s")
    else:
        setattr(experts, attr, nn.Parameter(select(bank, "f"), requires_grad=False))


def _reduce_output(module, group) -> None:
    """The module's output is this rank's partial sum: add the other ranks' in place."""
    def hook(_module, _inputs, out):
        try:
            dist.all_reduce(out)
        except Exception as e:
            raise group.fail(e) from None
        return out
    module.register_forward_hook(hook)


class VocabShard(nn.Module):
    """The embedding table's rows of ids [v0, v1) (plain or quantized), used as the embedding and the tied LM
    head: a lookup sums each rank's rows (zeros for ids it does not hold), the head gathers each rank's logits."""

    def __init__(self, table, v0: int, v1: int, group: Group | None):
        super().__init__()
        self.v0, self.v1, self.group = v0, v1, group
        if not hasattr(table, "qweight"):
            table = nn.Embedding(v1 - v0, table.weight.shape[1], _weight=table.weight[v0:v1].contiguous(),
                                 _freeze=True)
        else:
            _rows(table, v0, v1)
        self.table = table

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.v0
        here = (local >= 0) & (local < self.v1 - self.v0)
        local = torch.where(here, local, 0)
        rows = self.table.lookup(local) if hasattr(self.table, "lookup") else \
            torch.nn.functional.embedding(local, self.table.weight)
        rows = rows * here[..., None].to(rows.dtype)
        try:
            dist.all_reduce(rows)
        except Exception as e:
            raise self.group.fail(e) from None
        return rows

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        from .. import ops

        part = self.table.project(hidden) if hasattr(self.table, "project") else ops.linear(hidden, self.table.weight)
        return _gather_last(part, self.group)


def _gather_last(part: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(group.world)]
    try:
        dist.all_gather(parts, part.contiguous())
    except Exception as e:
        raise group.fail(e) from None
    return torch.cat(parts, dim=-1)


def shard(model, rank: int, world: int, expert_parallel: bool = False, group: Group | None = None):
    """Cut `model` (loaded whole on this rank, on the CPU; or on meta, to plan) to rank `rank`'s shard of `world`,
    in place; its config becomes the rank's (its KV heads: what the K/V cache holds here). With the `group`, the
    all-reduces and gathers are wired in and the model moves to the rank's device."""
    text = model.language_model
    cfg, r, N = text.cfg, rank, world
    reduce = (lambda module: _reduce_output(module, group)) if group is not None else (lambda module: None)
    quantized = [m.group_size for m in text.modules() if hasattr(m, "group_size")]
    check_divisible(cfg, N, expert_parallel, max(quantized) if quantized else None)
    if getattr(model, "adapters", None) or any(hasattr(m, "adapters") for m in model.modules()):
        raise ValueError("tensor parallelism does not shard LoRA adapters")
    H = cfg.num_heads
    h0, h1 = r * H // N, (r + 1) * H // N
    specs = []
    for layer in text.layers:
        spec, attn = layer.spec, layer.self_attn
        D, K = spec.head_dim, spec.num_kv_heads
        per_kv = H // K  # query heads per KV head
        k0, k1 = h0 // per_kv, (h1 - 1) // per_kv + 1  # the KV heads this rank's query heads read
        _rows(attn.q_proj, h0 * D, h1 * D)
        if not spec.kv_shared:
            _rows(attn.k_proj, k0 * D, k1 * D)
            if attn.v_proj is not None:
                _rows(attn.v_proj, k0 * D, k1 * D)
        _cols(attn.o_proj, h0 * D, h1 * D)
        reduce(attn.o_proj)
        attn.num_heads = h1 - h0
        I = spec.intermediate_size
        i0, i1 = r * I // N, (r + 1) * I // N
        _rows(layer.mlp.gate_proj, i0, i1)
        _rows(layer.mlp.up_proj, i0, i1)
        _cols(layer.mlp.down_proj, i0, i1)
        reduce(layer.mlp.down_proj)
        if spec.moe:
            _shard_experts(layer.experts, cfg, r, N, expert_parallel)
            reduce(layer.experts)
        spec = dataclasses.replace(spec, num_kv_heads=k1 - k0)
        layer.spec = attn.spec = spec
        specs.append(spec)
    V = cfg.vocab_size
    v0, v1 = r * V // N, (r + 1) * V // N
    text.embed_tokens = VocabShard(text.embed_tokens, v0, v1, group)
    if hasattr(text, "lm_head"):
        _rows(text.lm_head, v0, v1)
        if group is not None:
            text.lm_head.register_forward_hook(lambda _m, _i, out: _gather_last(out, group))
    local = dataclasses.replace(cfg, num_heads=h1 - h0, layers=tuple(specs))
    text.cfg = local
    model.config = dataclasses.replace(model.config, text=local)
    model.parallel = group
    return model if group is None else model.to(group.device)


def _shard_experts(experts, cfg, r: int, N: int, expert_parallel: bool) -> None:
    n, I = cfg.num_experts, cfg.moe_intermediate_size
    if expert_parallel:  # whole experts [e0, e1)
        e0, e1 = r * n // N, (r + 1) * n // N
        _bank(experts, "gate_up_proj", lambda t, _: t[e0:e1].contiguous())
        _bank(experts, "down_proj", lambda t, _: t[e0:e1].contiguous())
        experts.first, experts.num_experts = e0, e1 - e0
        return
    i0, i1 = r * I // N, (r + 1) * I // N  # every expert's width, gate and up halves alike
    _bank(experts, "gate_up_proj", lambda t, _: torch.cat([t[:, i0:i1], t[:, I + i0:I + i1]], dim=1).contiguous())
    bank = experts.down_proj
    per = {"f": 1, "q": 2 if getattr(bank, "bits", 8) == 4 else 1, "s": getattr(bank, "group_size", 1)}
    _bank(experts, "down_proj", lambda t, kind: t[:, :, i0 // per[kind]:i1 // per[kind]].contiguous())


# ---- the leader's steps, run by every rank ---------------------------------------------------------------

class Leader:
    """The engine's worker on rank 0 (engine/worker.py's Worker, wrapped): every call is sent to the followers,
    which make it on their shards, then made here."""

    def __init__(self, group: Group, model, num_blocks: dict, block_size: int):
        from ..engine.worker import Worker

        self.group = group
        group.send(("worker", num_blocks, block_size))
        self.worker = Worker(model, num_blocks, block_size, compile=False, cuda_graphs=False)
        self.cache = self.worker.cache

    def _call(self, name: str, *args, **kwargs):
        self.group.send((name, _moved(args, "cpu"), _moved(kwargs, "cpu")))  # media rows: to each rank's device
        try:
            return getattr(self.worker, name)(*args, **kwargs)
        except RankLost:
            raise
        except Exception as e:  # a rank may have finished the step and another not: they cannot go on
            raise self.group.fail(e) from None

    def forward(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)

    def copy_block(self, *args):
        return self._call("copy_block", *args)

    def forward_with_kv(self, *args, **kwargs):
        raise ValueError("speculative decoding does not run with tensor parallelism")


def _moved(value, device):
    """The tensors in a call's arguments (lists, tuples, dicts of them) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def follow(model, group: Group) -> None:
    """A follower's life: make every worker call the leader makes, until it says stop. Any failure (the leader
    gone, a step that fails here) ends this process with the reason on stderr."""
    from ..engine.worker import Worker

    worker = None
    try:
        while True:
            message = group.receive()
            if message is None:
                return
            if message[0] == "worker":
                worker = Worker(model, message[1], message[2], compile=False, cuda_graphs=False)
                continue
            name, args, kwargs = message
            getattr(worker, name)(*_moved(args, group.device), **_moved(kwargs, group.device))
    except Exception as e:
        print(f"gemma4: tensor-parallel rank {group.rank} stops: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        os._exit(1)  # not a teardown that waits on the dead peers


# ---- processes ------------------------------------------------------------------------------------------

def _rank_device(device, rank: int, world: int, local_rank: int) -> torch.device:
    from ..weights import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count()
    if os.environ.get("GEMMA4_TP_SHARE_GPU") == "1":  # correctness checks on one GPU: every rank on it
        return torch.device("cuda", dev.index or 0)
    if world > count:
        raise ValueError(f"tensor parallel size {world} needs {world} GPUs; {count} are visible")
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, recipe: dict, expert_parallel: bool = False):
    """Start `world` ranks that each load the model of `recipe` (LLM's load arguments: path, dtype, device,
    quantize, group_size, mmproj) and keep their shard. Under torchrun (RANK and WORLD_SIZE set) this process is
    one of them; otherwise it is rank 0 and starts the others. Returns (the sharded model, Group)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {world!r}")
    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process: one parallel model at a time")
    procs = []
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise ValueError(f"tensor_parallel={world}, but torchrun started {size} processes")
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, local_rank = 0, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    device = _rank_device(recipe.get("device"), rank, world, local_rank)
    # The config is checked before any process starts or any weight is read.
    _check_recipe(recipe, world, expert_parallel)
    if rank == 0 and "RANK" not in os.environ:
        spec = json.dumps({"recipe": recipe, "world": world, "expert_parallel": expert_parallel})
        for r in range(1, world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), GEMMA4_HUGEPAGES="0",
                       OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
            procs.append(subprocess.Popen([sys.executable, "-m", "gemma4.parallel", spec], env=env))
    backend = "nccl" if device.type == "cuda" and os.environ.get("GEMMA4_TP_SHARE_GPU") != "1" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT,
                                **({"device_id": device} if backend == "nccl" else {}))
        group = Group(rank, world, device, procs)
        model = shard(_load(recipe, rank == 0), rank, world, expert_parallel, group)
    except BaseException:
        for p in procs:
            p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if rank != 0:  # a follower never returns: it runs the leader's steps, then its process ends
        with torch.inference_mode():
            follow(model, group)
        dist.destroy_process_group()
        sys.exit(0)
    atexit.register(group.close)
    return model, group


def _check_recipe(recipe: dict, world: int, expert_parallel: bool) -> None:
    from ..config import load_config
    from ..weights import resolve_checkpoint
    from ..weights.gguf import GGUFModel, find_gguf

    path = recipe.get("path")
    if path is None:
        from ..llm import TINY_DIR

        cfg = load_config(str(TINY_DIR))
    else:
        ckpt = resolve_checkpoint(path)
        cfg = GGUFModel(find_gguf(ckpt)).config if find_gguf(ckpt) else load_config(ckpt)
    check_divisible(cfg.text, world, expert_parallel)
    if expert_parallel and not cfg.text.num_experts:
        raise ValueError("expert parallelism needs a model with experts (26B-A4B)")


def _load(recipe: dict, leader: bool):
    """The whole model on the CPU, its weights left memory-mapped where they can be (each rank copies out just
    its shard), quantized if asked; the media towers on the leader only (it alone encodes media)."""
    from ..llm import load_model

    saved = os.environ.get("GEMMA4_HUGEPAGES")
    os.environ["GEMMA4_HUGEPAGES"] = "0"
    try:
        towers = {} if leader else {"media": False, "mmproj": None}
        return load_model(**{**recipe, "device": "cpu", **towers})
    finally:
        if saved is None:
            os.environ.pop("GEMMA4_HUGEPAGES")
        else:
            os.environ["GEMMA4_HUGEPAGES"] = saved


def _follower_main(spec: str) -> None:
    """`python -m gemma4.parallel SPEC`: a follower started by `launch`; ends with its leader."""
    import ctypes
    import signal

    try:  # Linux: this process ends when its leader does, even if it never reaches the process group
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    args = json.loads(spec)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        launch(args["world"], args["recipe"], args["expert_parallel"])  # follows, then exits
    except Exception as e:
        print(f"gemma4: tensor-parallel rank {os.environ.get('RANK')} could not start: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        os._exit(1)
