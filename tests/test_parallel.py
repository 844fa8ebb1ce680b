"""Tensor and expert parallelism (gemma4.parallel) on CPU processes with gloo: the sharded engine gives the
single process's logits (<= 1e-5, fp32) and greedy tokens, for all four shapes at 2 and 4 ranks, through several
sequences, chunked prefill and preemption; a lost rank ends the others; bad sizes are one clear error each.
The checkpoints have tame weights (reference.randomise): the default tiny ones are chaotic enough that the fp32
order of the all-reduce's sums alone moves their logits by 1.4e-5 of their scale."""
import os
import subprocess
import sys
import time

import pytest
import torch

import gemma4
from gemma4.engine.engine import Engine
from gemma4.engine.kv import block_bytes
from gemma4.engine.sample import SamplingParams
from gemma4.parallel import RankLost, check_divisible, launch

LENGTHS, NEW = (5, 40, 13, 27), (12, 9, 14, 6)  # the tiny configs' window is 8: prompts rotate it
# e2b has 2 query heads: its 4-rank case takes 4 (one KV head, copied to every rank)
FOUR_HEADS = (("num_attention_heads", 4),)


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in LENGTHS]


def run(engine):
    """Four requests at once; -> ({id: tokens}, {id: [logits at each new token]}, {id: prompt logprobs}): every
    sampled row's logits (logprobs=0 makes each row go through its sampler's `sample`, greedy still), and the
    prompt tokens' logprobs with the top 2 (scored by the sharded prefill, its logits gathered 32 rows at a time)."""
    tokens, logits, scores = {}, {}, {}
    for i, (p, n) in enumerate(zip(prompts(), NEW)):
        rid = str(i)
        engine.add(rid, p, SamplingParams(max_new_tokens=n, logprobs=0, prompt_logprobs=2))
        sampler, tokens[rid], logits[rid] = engine.sequences[rid].sampler, [], []
        original = sampler.sample

        def capture(row, *args, seen=logits[rid], original=original):
            seen.append(row.float().clone())
            return original(row, *args)
        sampler.sample = capture
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens[ev.request_id].append(ev.token_id)
            if ev.prompt_logprobs is not None:
                scores[ev.request_id] = ev.prompt_logprobs
    assert engine.memory()["used_bytes"] == 0
    return tokens, logits, scores


def engine_for(model, group=None):
    """4-token blocks, 5-token steps, and 18 blocks of each kind (the sharded model's own K/V sizes: the same
    block counts): chunked prefill and preemption (the requests need ~36 global blocks)."""
    cfg = model.config.text
    per_block = sum(block_bytes(cfg, kind, 4, 4) for kind in ("sliding", "full"))
    return Engine(model, kv_memory=18 * per_block, block_size=4, max_seqs=4, max_step_tokens=5, stop_ids=(),
                  parallel=group)


def assert_same(ours, theirs):
    (t_ours, l_ours, s_ours), (t_theirs, l_theirs, s_theirs) = ours, theirs
    assert t_ours == t_theirs
    for rid, want in s_theirs.items():
        assert len(s_ours[rid]) == len(want) == len(prompts()[int(rid)]) - 1
        for (lp, top), (lp2, top2) in zip(s_ours[rid], want):
            assert [i for i, _ in top] == [i for i, _ in top2]
            assert max(abs(a - b) for a, b in [(lp, lp2)] + [(x, y) for (_, x), (_, y) in zip(top, top2)]) < 1e-4
    for rid in t_theirs:
        assert len(l_ours[rid]) == len(l_theirs[rid]) == len(t_theirs[rid])
        for a, b in zip(l_ours[rid], l_theirs[rid]):
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= 1e-5 * scale, rid


# The default run: every shape, both sizes, experts both ways, KV heads copied (e2b at 2, global layers at 4);
# the rest of the matrix is marked slow.
FAST = {("e2b", 2, False), ("e4b", 2, False), ("26b", 2, True), ("26b", 4, False), ("31b", 4, False)}
CASES = [pytest.param(shape, n, e, id=f"{shape}-{n}{'-experts' if e else ''}",
                      marks=() if (shape, n, e) in FAST else pytest.mark.slow)
         for shape, n, e in [(s, n, False) for n in (2, 4) for s in ("e2b", "e4b", "26b", "31b")]
         + [("26b", 2, True), ("26b", 4, True)]]


@pytest.mark.parametrize("shape,world,experts", CASES)
def test_sharded_engine_equals_one_process(ckpt, shape, world, experts):
    path, _ = ckpt(shape, tame=True, **({"overrides": FOUR_HEADS} if shape == "e2b" and world == 4 else {}))
    single = engine_for(gemma4.load(path, dtype="float32", device="cpu"))
    expected = run(single)
    assert single.scheduler.preemptions > 0
    model, group = launch(world, {"path": path, "dtype": "float32", "device": "cpu"}, experts)
    try:
        engine = engine_for(model, group)
        assert_same(run(engine), expected)
        assert engine.scheduler.preemptions > 0
        layer = model.language_model.layers[0]
        assert layer.self_attn.q_proj.weight.shape[0] * world == single.model.language_model.layers[0] \
            .self_attn.q_proj.weight.shape[0]  # the weights are sharded, not copied
        if experts:
            assert layer.experts.num_experts * world == 8
    finally:
        group.close()


def test_int4_shards_hold_whole_groups(ckpt, no_kernels):
    """Quantized weights shard too (groups of 32 stay whole): the same logits as the quantized model alone. (Without
    our kernels, which quantize activations to int8: there a 1-ulp difference of the all-reduce's order now and
    then moves one rounding step, 1e-2 on these logits.)"""
    path, _ = ckpt("31b", tame=True, overrides=(("intermediate_size", 128),))
    model = gemma4.load(path, dtype="float32", device="cpu", quantize="int4", group_size=32)
    expected = run(engine_for(model))
    sharded, group = launch(2, {"path": path, "dtype": "float32", "device": "cpu", "quantize": "int4",
                                "group_size": 32})
    try:
        assert sharded.language_model.layers[0].mlp.down_proj.qweight.shape[1] == 64 // 2  # 64 columns, packed
        assert_same(run(engine_for(sharded, group)), expected)
    finally:
        group.close()


def test_llm_and_cli(tmp_path):
    """LLM(tensor_parallel=2) and `gemma4 generate --tensor-parallel 2` on the built-in model: the same greedy
    text as one process."""
    one = gemma4.LLM(dtype="float32", device="cpu").generate([[2, 10, 20, 30]], max_new_tokens=6, temperature=0)
    llm = gemma4.LLM(dtype="float32", device="cpu", tensor_parallel=2)
    try:
        two = llm.generate([[2, 10, 20, 30]], max_new_tokens=6, temperature=0)
    finally:
        llm.close()
    assert one[0].token_ids == two[0].token_ids
    cmd = [sys.executable, "-m", "gemma4.cli", "generate", "Hello", "--max-new-tokens", "5", "--temperature", "0",
           "--dtype", "float32"]
    plain = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    sharded = subprocess.run(cmd + ["--tensor-parallel", "2"], capture_output=True, text=True, check=True).stdout
    assert sharded == plain and plain.strip()


def test_torchrun(tmp_path):
    """Under torchrun every rank runs the command: rank 0 prints, the other follows and ends."""
    cmd = ["generate", "Hello", "--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32"]
    plain = subprocess.run([sys.executable, "-m", "gemma4.cli", *cmd], capture_output=True, text=True,
                           check=True).stdout
    from gemma4.parallel import _free_port

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "gemma4.cli", *cmd], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == plain


def test_a_lost_follower_ends_the_leader():
    llm = gemma4.LLM(dtype="float32", device="cpu", tensor_parallel=2)
    try:
        llm.generate([[2, 10, 20]], max_new_tokens=2, temperature=0)
        llm.parallel.procs[0].kill()
        start = time.time()
        with pytest.raises(RankLost, match="tensor parallelism stopped: RuntimeError: .*Connection"):
            llm.generate([[2, 10, 20]], max_new_tokens=2, temperature=0)
        assert time.time() - start < 30
        with pytest.raises(RankLost, match="tensor parallelism stopped"):  # at once, from then on
            llm.engine.worker.forward([[2]], [0], [{k: [1] for k in llm.engine.worker.worker.kinds}])
    finally:
        llm.close()


def test_a_lost_leader_ends_the_follower(tmp_path):
    """The leader dies without a word: its follower exits (not a hang)."""
    script = ("import os, sys, gemma4\n"
              "llm = gemma4.LLM(dtype='float32', device='cpu', tensor_parallel=2)\n"
              "print(llm.parallel.procs[0].pid, flush=True)\n"
              "sys.stdin.readline()\n"
              "os._exit(3)\n")
    leader = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    pid = int(leader.stdout.readline())
    leader.stdin.write("\n")
    leader.stdin.flush()
    assert leader.wait(timeout=60) == 3
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"follower {pid} still alive 20 s after its leader died")


def test_bad_sizes_are_one_clear_error(ckpt, monkeypatch):
    from gemma4.config import load_config
    from gemma4.parallel import _rank_device

    e2b = load_config(ckpt("e2b")[0]).text
    cases = [(e2b, 4, False, None, "the 2 attention heads do not split into 4"),
             (load_config(ckpt("26b")[0]).text, 2, True, None, None),
             (load_config(ckpt("26b")[0]).text, 2, False, 32, "the MLP width 96 does not split into 2 shards "
                                                            "of whole quantization groups of 32"),
             (e2b, 0, False, None, "must be a positive integer")]
    for cfg, world, experts, gs, message in cases:
        if message is None:
            check_divisible(cfg, world, experts, gs)
        else:
            with pytest.raises(ValueError, match=message):
                check_divisible(cfg, world, experts, gs)
    with pytest.raises(ValueError, match="expert parallelism needs a model with experts"):
        launch(2, {"path": ckpt("31b")[0], "dtype": "float32"}, expert_parallel=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor parallel size 2 needs 2 GPUs; 1 are visible"):
        _rank_device("cuda", 0, 2, 0)
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "generate", "hi", "--model", ckpt("e2b")[0],
                          "--tensor-parallel", "4"], capture_output=True, text=True)
    assert out.returncode != 0 and "do not split into 4" in out.stderr and "Traceback" not in out.stderr


def test_info_plans_each_rank(ckpt):
    from gemma4.config import load_config
    from gemma4.params import count_params, plan_parallel

    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "gemma4", "configs")
    if not os.path.isdir(shared):
        pytest.skip("../shared/gemma4/configs is not here")
    big = load_config(os.path.join(shared, "gemma-4-31b"))
    plan, whole = plan_parallel(big, 4), count_params(big)
    assert plan["kv_cache_bytes_per_rank"] * 4 == whole["kv_cache_bytes"]  # 16 and 4 KV heads: split four ways
    assert whole["params_text"] / 4 < plan["params_text_per_rank"] < whole["params_text"] / 4 * 1.01
    edge = load_config(os.path.join(shared, "gemma-4-e2b"))
    assert plan_parallel(edge, 2)["kv_cache_bytes_per_rank"] == count_params(edge)["kv_cache_bytes"]  # 1 KV head
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "info", "--model", os.path.join(shared, "gemma-4-31b"),
                          "--tensor-parallel", "4"], capture_output=True, text=True, check=True).stdout
    assert "weights per rank    14.30 GiB (bfloat16; rank 0 also the towers: 1.07 GiB)" in out


def test_images_through_the_sharded_engine(tmp_path):
    """Rank 0 alone holds the towers: the soft tokens travel with the step, and the logits are the one
    process's."""
    import reference
    from test_vision import image

    from gemma4 import media

    path = str(tmp_path / "e2b-vision")
    reference.build_media("e2b", path, vision=reference.VISION_EDGE, tame=True)
    ids = reference.MEDIA_TOKENS

    def go(model, group=None):
        soft = model.encode_media([media.preprocess_image(image(60, 90, 3), 70)])
        prompt = [2, 30, ids["boi_token_id"]] + [ids["image_token_id"]] * soft.shape[0] + [ids["eoi_token_id"], 40]
        engine = engine_for(model, group)
        engine.add("r", prompt, SamplingParams(max_new_tokens=5, logprobs=0), media=soft)
        seen, original = [], engine.sequences["r"].sampler.sample
        engine.sequences["r"].sampler.sample = lambda row, *a: (seen.append(row.clone()), original(row, *a))[1]
        tokens = [ev.token_id for _ in iter(engine.has_work, False) for ev in engine.step() if ev.token_id]
        return {"r": tokens}, {"r": seen}, {}

    expected = go(gemma4.load(path, dtype="float32", device="cpu"))
    model, group = launch(2, {"path": path, "dtype": "float32", "device": "cpu"})
    try:
        assert hasattr(model, "vision_tower")
        assert_same(go(model, group), expected)
    finally:
        group.close()
