"""What loading and generating keep resident: the memory targets of benchmarks/bench_generate.py depend on
these (E2B bf16 peak RSS 4.94 -> 4.76 GB, int4 1.79 -> 1.58 GB)."""
import os
import subprocess
import sys

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


def test_ple_rows_leave_the_resident_set(ckpt):
    """The PLE table is mapped on its own and its pages are dropped after each lookup: generating leaves none
    of it resident, where a plain lookup keeps the pages it touched (and 64 KB around each row)."""
    path, reference = ckpt("e2b")
    model = gemma4.load(path, device="cpu")
    text = model.language_model
    table = text.embed_tokens_per_layer.weight
    assert text.ple_pages is not None and table.dtype == torch.float32  # the stored dtype, memory-mapped
    ids = torch.randint(3, table.shape[0], (1, 64), generator=torch.Generator().manual_seed(0))
    F.embedding(ids, table).sum()
    assert mapping_rss_kb(table.data_ptr()) > 0  # a plain lookup: resident
    ours = model(ids)
    assert mapping_rss_kb(table.data_ptr()) == 0
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)  # the rows read are the right ones
    again = model(ids)  # pages mapped again from the page cache
    assert torch.equal(again, ours) and mapping_rss_kb(table.data_ptr()) == 0
