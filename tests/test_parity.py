"""Our logits and greedy tokens against the reference (transformers) on tiny random checkpoints."""

import pytest
import torch

import gemma4

SHAPES = ["e2b", "e4b", "26b", "31b"]
PROMPT_LEN = 21  # longer than the sliding window (8) of the tiny configs


def prompt(n=PROMPT_LEN, batch=1, seed=0):
    return torch.randint(3, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_close(ours, ref):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3g} > 1e-4 x logit scale {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("text_only", [False, True])
def test_logits_match_reference(ckpt, shape, text_only):
    path, ref = ckpt(shape, text_only=text_only)
    model = gemma4.load(path, dtype="float32", device="cpu")
    ids = prompt(batch=2)
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_32_tokens_match_reference(ckpt, shape):
    path, ref = ckpt(shape)
    ids = prompt()
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    llm = gemma4.LLM(path, dtype="float32", device="cpu")
    [out] = llm.generate([ids[0].tolist()], max_new_tokens=32, stop_token_ids=[], temperature=0)
    assert out.token_ids == expected[0, PROMPT_LEN:].tolist()
    assert out.finish_reason == "length"


def test_repetition_penalty_matches_reference(ckpt):
    """Greedy with repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor: prompt and output tokens),
    through the serving engine, whose logits are inference tensors."""
    path, ref = ckpt("e2b")
    ids = prompt()
    expected = ref.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                            pad_token_id=0)
    plain = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(expected, plain)  # the penalty changes the output
    llm = gemma4.LLM(path, dtype="float32", device="cpu")
    [out] = llm.generate([ids[0].tolist()], max_new_tokens=24, repetition_penalty=1.3, stop_token_ids=[], temperature=0)
    assert out.token_ids == expected[0, PROMPT_LEN:].tolist()


@pytest.mark.parametrize("shape", ["e2b", "31b"])
def test_long_prompt_matches_reference(ckpt, shape):
    """A 600-token prompt: prefill attention runs by 256-query blocks over the keys each block sees
    (ops.prefill_attention), cache-free and through the engine's cache."""
    path, ref = ckpt(shape)
    ids = prompt(600)
    model = gemma4.load(path, dtype="float32", device="cpu")
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits)
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    [out] = gemma4.LLM(path, dtype="float32", device="cpu").generate([ids[0].tolist()], max_new_tokens=8,
                                                                      stop_token_ids=[], temperature=0)
    assert out.token_ids == expected[0, 600:].tolist()


@pytest.mark.parametrize("shape", ["e2b", "26b"])
def test_padded_batch(ckpt, shape):
    path, ref = ckpt(shape)
    model = gemma4.load(path, dtype="float32", device="cpu")
    a, b = prompt(15, seed=1)[0], prompt(10, seed=2)[0]
    with torch.no_grad():
        ref_a, ref_b = ref(input_ids=a[None]).logits[0], ref(input_ids=b[None]).logits[0]
        # right padding: the reference and we agree on every real position
        ids = torch.stack([a, torch.cat([b, torch.zeros(5, dtype=torch.long)])])
        mask = torch.stack([torch.ones(15), torch.cat([torch.ones(10), torch.zeros(5)])]).long()
        ours = model(ids, attention_mask=mask)
        assert_close(ours[1, :10], ref(input_ids=ids, attention_mask=mask).logits[1, :10])
        assert_close(ours[0], ref_a)
        assert_close(ours[1, :10], ref_b)
        # left padding: positions count real tokens only, so the row equals the unpadded prompt
        ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
        mask = torch.stack([torch.ones(15), torch.cat([torch.zeros(5), torch.ones(10)])]).long()
        assert_close(model(ids, attention_mask=mask)[1, 5:], ref_b)
    # batched generation of prompts of different lengths == the reference one by one
    llm = gemma4.LLM(path, dtype="float32", device="cpu")
    outs = llm.generate([a.tolist(), b.tolist()], max_new_tokens=12, stop_token_ids=[], temperature=0)
    for p, out in zip((a, b), outs):
        exp = ref.generate(p[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == exp[0, len(p):].tolist()


@pytest.mark.parametrize("shape", ["e2b", "31b"])
def test_config_layouts_and_unused_kv_give_same_logits(ckpt, shape):
    ids = prompt()
    logits = []
    for options in (dict(published_layout=True), dict(published_layout=False),
                    dict(published_layout=True, unused_shared_kv=True)):
        path, _ = ckpt(shape, **options)
        with torch.no_grad():
            logits.append(gemma4.load(path, dtype="float32", device="cpu")(ids))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def force_bf16_gemm(monkeypatch, native: bool) -> None:
    """Take the emulated-bf16 routes (kernel up to 64 rows, fp32 blocks beyond) or the native one (PyTorch's bf16
    GEMM from 3 rows) on any CPU: each is correct everywhere, only its speed depends on the CPU."""
    from gemma4 import hardware, kernels

    monkeypatch.setattr(hardware, "_chosen", {"native_bf16": native})
    monkeypatch.setattr(kernels, "_native", None)


@pytest.mark.parametrize("route", ["kernel", "fp32", "fp32 chunked", "native"])
def test_bf16_close_to_reference(ckpt, monkeypatch, route):
    """A bf16 prefill against the reference's. Where bf16 is emulated, 21 tokens go to our kernel (up to 64
    rows), 80 to the fp32 GEMM; chunked: that GEMM in 64-column input chunks and 64-row weight blocks, as E2B's
    6144-wide down projection runs (the tiny model's widths are below the 2048-column chunk). Native: 80 tokens
    through PyTorch's bf16 GEMM."""
    from gemma4 import kernels, ops

    force_bf16_gemm(monkeypatch, route == "native")
    real, calls = ops._fp32_product, []
    options = dict(depth=64, block_bytes=64 * 4 * 64) if route == "fp32 chunked" else {}
    monkeypatch.setattr(ops, "_fp32_product", lambda x, w: calls.append(len(x)) or real(x, w, **options))
    path, ref = ckpt("e2b")
    ref_bf16 = type(ref).from_pretrained(path, dtype=torch.bfloat16).eval()
    model = gemma4.load(path, dtype="bfloat16", device="cpu")
    ids = prompt(21 if route == "kernel" else 80)
    with torch.no_grad():
        ours, theirs = model(ids).float(), ref_bf16(input_ids=ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.95
    if kernels.kernel_available():  # the route taken is the one named
        assert (not calls) == (route in ("kernel", "native"))


@pytest.mark.parametrize("batch,length,native", [(1, PROMPT_LEN, False), (5, PROMPT_LEN, False),
                                                  (16, PROMPT_LEN, False), (1, 80, False), (5, PROMPT_LEN, True)])
def test_bf16_decode_matches_reference(ckpt, monkeypatch, batch, length, native):
    """bf16 decode steps against the reference's bf16 decode: each step's logits close, the greedy tokens
    identical. Where bf16 is emulated every step goes to our bf16 kernel: one row (bf16 x), or 5 or 16
    sequences at once (x widened to fp32 in tiles of 2-4 rows over pairs of weight rows); the prefill: 21 rows
    through the kernel, 80 (or 16 x 21) through the fp32 GEMM. Native: 5 rows through the kernel's 512-bit path
    in the avx512_bf16 build, else PyTorch's bf16 GEMM."""
    from oracle import ContiguousCache, step_logits

    from gemma4 import kernels

    force_bf16_gemm(monkeypatch, native)
    path, ref = ckpt("e2b", tame=True)
    ref_bf16 = type(ref).from_pretrained(path, dtype=torch.bfloat16).eval()
    model = gemma4.load(path, dtype="bfloat16", device="cpu")
    rows = []
    if kernels.kernel_available():  # the test is about the kernel path where there is one
        real = kernels.gemv_bf16
        monkeypatch.setattr(kernels, "gemv_bf16", lambda x, w: rows.append(x.numel() // x.shape[-1]) or real(x, w))
    ids = prompt(length, batch=batch)
    steps = 12
    with torch.no_grad():
        want = ref_bf16.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    cache = ContiguousCache(model.config.text, batch, ids.shape[1] + steps, torch.bfloat16, "cpu")
    tokens, pos, x = [], ids.shape[1], ids
    positions = torch.arange(pos)[None].expand(batch, -1)
    for i in range(steps):
        logits = step_logits(model, x, positions, cache).float()
        theirs = want.logits[i].float()
        assert (logits - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item(), i
        tokens.append(logits.argmax(-1))
        x, positions, pos = tokens[-1][:, None], torch.full((batch, 1), pos), pos + 1
    assert torch.stack(tokens, 1).tolist() == want.sequences[:, ids.shape[1]:].tolist()
    assert not kernels.kernel_available() or (batch in rows) == (batch <= kernels.bf16_kernel_rows())


def test_sharded_checkpoint_with_media_towers(ckpt):
    """A sharded file set (index + shards) with vision and audio towers: the text load skips the towers
    and still matches the reference on text."""
    path, ref = ckpt("e2b", towers=True, max_shard_size="100KB")
    import os
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = gemma4.load(path, dtype="float32", device="cpu")
    ids = prompt()
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits)


def test_hub_id_resolves_through_local_cache(ckpt, tmp_path, monkeypatch):
    """`load("org/name")` finds a checkpoint in huggingface_hub's cache layout, offline."""
    import shutil

    path, ref = ckpt("e2b")
    snap = tmp_path / "hub" / "models--google--gemma-4-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(path, snap)
    (tmp_path / "hub" / "models--google--gemma-4-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--google--gemma-4-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = gemma4.load("google/gemma-4-tiny", dtype="float32", device="cpu")
    ids = prompt()
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits)


@pytest.mark.parametrize("shape", SHAPES)
def test_serving_engine_logits_match_reference(ckpt, shape):
    """The paged cache path (prompt in chunks of 5 across block and window boundaries, then decode steps):
    every step's logits equal the reference's full forward over the same tokens."""
    from gemma4.engine.engine import Engine
    from gemma4.engine.sample import SamplingParams

    path, ref = ckpt(shape)
    model = gemma4.load(path, dtype="float32", device="cpu")
    engine = Engine(model, block_size=4, max_step_tokens=5, stop_ids=())
    ids = prompt()[0].tolist()
    engine.add("r", ids, SamplingParams(max_new_tokens=4, logprobs=0))  # not plain greedy: .sample sees all
    sampler, seen = engine.sequences["r"].sampler, []
    original = sampler.sample

    def capture(logits):
        seen.append(logits.clone())
        return original(logits)
    sampler.sample = capture
    out = []
    while engine.has_work():
        out += [ev.token_id for ev in engine.step()]
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids + out])).logits[0]
    assert len(seen) == 4
    for step, logits in enumerate(seen):
        assert_close(logits, expected[len(ids) - 1 + step])
