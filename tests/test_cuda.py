"""The same parity checks on a GPU (skipped without CUDA): logits and greedy tokens against the reference
on the same device, and the CUDA-graph decode against the eager one."""
import copy

import pytest
import torch
from test_parity import PROMPT_LEN, assert_close, prompt

import gemma4
from gemma4.engine.engine import Engine
from gemma4.engine.sample import SamplingParams
from gemma4.engine.worker import can_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("shape", ["e2b", "e4b", "26b", "31b"])
def test_logits_and_greedy_match_reference_on_cuda(ckpt, shape):
    path, ref = ckpt(shape)
    ref = copy.deepcopy(ref).to("cuda")
    ids = prompt(batch=2).cuda()
    model = gemma4.load(path, dtype="float32", device="cuda")
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits)
    expected = ref.generate(ids[:1], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    [out] = gemma4.LLM(path, dtype="float32", device="cuda").generate([ids[0].tolist()], max_new_tokens=24,
                                                                      stop_token_ids=[], temperature=0)
    assert out.token_ids == expected[0, PROMPT_LEN:].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(ckpt, dtype):
    """The engine's graphed decode (batch buckets 4 then 2: padded rows, one row finishing early) gives the
    eager engine's tokens, compiled or not."""
    path, _ = ckpt("e2b")
    model = gemma4.load(path, dtype=dtype, device="cuda")
    prompts = [prompt(n, seed=n)[0].tolist() for n in (21, 9, 30)]  # rows of different lengths
    params = [SamplingParams(max_new_tokens=m) for m in (20, 7, 20)]  # one row finishes early

    def run(graph, compile=False):
        engine = Engine(model, kv_memory=256 << 20, block_size=16, stop_ids=(), cuda_graphs=graph, compile=compile)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add(str(i), p, sp)
        out = [[] for _ in prompts]
        while engine.has_work():
            for ev in engine.step():
                if ev.token_id is not None:
                    out[int(ev.request_id)].append(ev.token_id)
        assert bool(engine.worker.graphs) == graph
        return out

    assert can_graph(model)
    eager = run(False)
    assert run(True) == eager

    if dtype == "float32":  # compiled kernels round differently in bf16
        assert run(True, compile=True) == eager


def test_bf16_on_cuda_close_to_reference(ckpt):
    path, ref = ckpt("e2b")
    ref_bf16 = type(ref).from_pretrained(path, dtype=torch.bfloat16).eval().to("cuda")
    ids = prompt().cuda()
    with torch.no_grad():
        theirs = ref_bf16(input_ids=ids).logits.float()
        ours = gemma4.load(path, dtype="bfloat16", device="cuda")(ids).float()
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.95
