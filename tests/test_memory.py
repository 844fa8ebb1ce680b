"""What loading and generating keep resident: the memory targets of benchmarks/bench_generate.py depend on
these (E2B peak RSS of a 512-token prefill, bench_generate: bf16 4.895 GB, int4 1.60 GB)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gemma4


def mapping_rss_kb(address: int) -> int:
    """Resident kB of the memory mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_load_skips_the_default_random_init(ckpt):
    """Building the model on meta with its default init would import sympy and ~800 other modules on the
    first random op (+70 MB RSS for the whole run); the init functions are restored afterwards."""
    path, _ = ckpt("e2b")
    code = ("import sys, torch, gemma4\n"
            "init = torch.nn.init.normal_\n"
            f"gemma4.load({path!r}, device='cpu')\n"
            "assert torch.nn.init.normal_ is init\n"
            "print('sympy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_ple_rows_never_enter_the_resident_set(ckpt):
    """The PLE table is memory-mapped but its rows are read with pread (weights.FileRows): generating maps
    none of it, where a plain lookup keeps the pages it touched (and 64 KB around each row)."""
    path, reference = ckpt("e2b")
    model = gemma4.load(path, device="cpu")
    text = model.language_model
    table = text.embed_tokens_per_layer.weight
    assert text.ple_rows is not None and table.dtype == torch.float32  # the stored dtype, memory-mapped
    ids = torch.randint(3, table.shape[0], (1, 64), generator=torch.Generator().manual_seed(0))
    ours = model(ids)
    assert mapping_rss_kb(table.data_ptr()) == 0
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)  # the rows read are the right ones
    assert torch.equal(text.ple_rows(ids[0, :5]), table[ids[0, :5]])
    F.embedding(ids, table).sum()
    assert mapping_rss_kb(table.data_ptr()) > 0  # what a plain lookup would have kept


def test_ple_row_reader_rejects_bad_ids(ckpt):
    path, _ = ckpt("e2b")
    rows = gemma4.load(path, device="cpu").language_model.ple_rows
    for bad in ([-1], [rows.shape[0]], [5, 10 ** 9]):
        with pytest.raises(IndexError, match="out of range"):
            rows(torch.tensor(bad))
    assert rows(torch.zeros(0, dtype=torch.long)).shape == (0, rows.shape[1])


def test_kv_pool_takes_memory_only_where_written():
    """The serving engine's pool (2 GiB by default on a CPU) is zeros that become resident only when written:
    torch.zeros made `gemma4 generate` of int4 E2B peak at 3.6 GB RSS."""
    from gemma4.engine.kv import zeros_on_touch

    pool = zeros_on_touch((256, 1024, 1024), torch.float32, "cpu")  # 1 GiB
    assert mapping_rss_kb(pool.data_ptr()) < 1024
    pool[3].fill_(2.0)  # one 4 MB slice written
    assert 4096 <= mapping_rss_kb(pool.data_ptr()) < 8192
    assert pool[2].abs().sum() == 0 and pool[3].sum() == 2 * 1024 * 1024
    assert zeros_on_touch((2, 3), torch.bfloat16, "meta").device.type == "meta"


def test_engine_pool_is_not_resident_until_used():
    from gemma4.engine.engine import Engine
    from gemma4.llm import tiny_random_model

    def anon_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))

    model = tiny_random_model()
    before = anon_kb()
    engine = Engine(model, kv_memory=256 << 20)
    pools = [t for t in (*engine.worker.cache.k.values(), *engine.worker.cache.v.values()) if t is not None]
    assert sum(t.nbytes for t in pools) > 200 << 20
    assert anon_kb() - before < 16 << 10  # kB


def test_freed_prompt_sized_buffers_leave_the_resident_set():
    """gemma4 has glibc map every buffer of 1 MB or more on its own where bf16 is emulated (memory.configure_heap): by
    default glibc raises that threshold to the largest block freed so far, so after a 16 MB tensor an 8 MB
    one came from its heap and stayed resident once freed (11 MB of a bf16 E2B prefill's peak, ~35 MB in int4).
    Where bf16 is native the heap is pooled instead: a freed buffer stays for the next prefill."""
    code = ("import torch, gemma4\n"
            "def anon():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
            "before = anon()\n"
            "torch.ones(4 << 20)\n"  # 16 MB, freed
            "t = torch.ones(2 << 20); del t\n"  # 8 MB, freed
            "print(anon() - before)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GEMMA4_BF16_GEMM"))}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    without = code.replace("import torch, gemma4", "import torch")
    # (script, bf16 GEMM, check): where bf16 is native gemma4 pools (prefill's page faults would cost 15-20%
    # there); without gemma4 the buffer is kept too
    for script, gemm, kept in ((code, "fp32", lambda kb: kb < 2048), (code, "native", lambda kb: kb > 6144),
                               (without, "fp32", lambda kb: kb > 6144)):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**env, "GEMMA4_BF16_GEMM": gemm}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert kept(int(r.stdout.split()[-1])), (gemm, r.stdout)


def mapping_line(address: int) -> dict:
    """The /proc/self/smaps entry that holds `address`: {"path": file or "", "Rss": kB, "VmFlags": [...]}."""
    with open("/proc/self/smaps") as f:
        entry = None
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                if entry is not None:
                    return entry
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                if lo <= address < hi:
                    entry = {"path": head[5] if len(head) > 5 and head[4] != "0" else ""}
            elif entry is not None and head[0] == "VmFlags:":
                entry["VmFlags"] = head[1:]
            elif entry is not None and head[0].endswith(":") and len(head) >= 2:
                entry[head[0][:-1]] = int(head[1]) if head[1].isdigit() else head[1]
    if entry is not None:
        return entry
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not gemma4.memory.hugepages(), reason="no transparent huge pages on this machine")
def test_weights_move_to_huge_pages(ckpt, monkeypatch):
    """On a CPU with transparent huge pages the loaded weights live in one anonymous mapping advised for them
    (a decode step then takes no TLB miss per 4 kB of weights); what a step reads sparsely (the PLE table,
    MoE experts) stays mapped from its file; GEMMA4_HUGEPAGES=0 keeps all mapped. Same logits either way."""
    path, _ = ckpt("e2b")
    ids = torch.tensor([[2, 17, 400, 9, 33]])
    model = gemma4.load(path, device="cpu")
    text = model.language_model
    for w in (text.layers[0].self_attn.q_proj.weight, text.layers[-1].mlp.down_proj.weight, text.embed_tokens.weight):
        where = mapping_line(w.data_ptr())
        assert where["path"] == "" and "hg" in where["VmFlags"] and w.data_ptr() % 64 == 0, where  # hg: advised
    assert mapping_line(text.embed_tokens_per_layer.weight.data_ptr())["path"].endswith(".safetensors")
    logits = model(ids)
    moe = gemma4.load(ckpt("26b")[0], device="cpu").language_model  # experts: read 8 of 128 a token
    experts = next(layer.experts for layer in moe.layers if layer.spec.moe)
    assert mapping_line(experts.gate_up_proj.data_ptr())["path"].endswith(".safetensors")
    assert mapping_line(moe.layers[0].mlp.up_proj.weight.data_ptr())["path"] == ""
    assert gemma4.memory._fits(1 << 20) and not gemma4.memory._fits(1 << 50)
    with monkeypatch.context() as m:
        m.setattr(gemma4.memory, "_fits", lambda nbytes: False)  # more than 3/4 of the available memory
        w = gemma4.load(path, device="cpu").language_model.layers[0].self_attn.q_proj.weight
        assert mapping_line(w.data_ptr())["path"].endswith(".safetensors")
    monkeypatch.setenv("GEMMA4_HUGEPAGES", "0")
    mapped = gemma4.load(path, device="cpu")
    w = mapped.language_model.layers[0].self_attn.q_proj.weight
    assert mapping_line(w.data_ptr())["path"].endswith(".safetensors")
    assert torch.equal(mapped(ids), logits)


@pytest.mark.skipif(not gemma4.memory.hugepages(), reason="no transparent huge pages on this machine")
def test_moving_weights_holds_them_once(tmp_path):
    """Weights memory-mapped from a file are read from the file into huge pages, never faulted in here:
    moving 64 MB in 16 tensors raises the peak RSS by ~64 MB, not twice that; tied tensors stay one
    Parameter; values are unchanged."""
    from safetensors.torch import save_file

    file = str(tmp_path / "w.safetensors")
    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, file)
    code = ("import resource, torch\n"
            "from safetensors import safe_open\n"
            "from gemma4 import memory\n"
            "def anon():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            f"f = safe_open({file!r}, framework='pt', device='cpu')\n"
            "m = torch.nn.ModuleList(torch.nn.Linear(1024, 1024, bias=False) for _ in range(16))\n"
            "for i, lin in enumerate(m):\n"
            "    lin.weight = torch.nn.Parameter(f.get_tensor(f'w{i}'), requires_grad=False)\n"
            "m.append(torch.nn.Module()); m[16].tied = m[3].weight\n"
            "before = anon()\n"
            "moved = memory.move_to_hugepages(m)\n"
            "assert moved == 64 << 20, moved\n"
            "assert m[16].tied is m[3].weight\n"
            "assert all(bool((lin.weight == i).all()) for i, lin in enumerate(m[:16]))\n"
            "print(anon() - before)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 60 << 10 < int(r.stdout.split()[-1]) < 76 << 10  # kB: the copies and one source tensor
