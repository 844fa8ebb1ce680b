"""The serving engine (continuous batching, paged K/V, chunked prefill, prefix cache, preemption,
cancellation): every request's output equals running it alone, and memory returns to zero."""
import asyncio

import pytest
import torch
from oracle import generate_alone

import gemma4
from gemma4.engine.engine import AsyncEngine, Engine
from gemma4.engine.kv import block_bytes
from gemma4.engine.sample import Sampler, SamplingParams, sample_rows

LENGTHS = (5, 40, 13, 27)  # the tiny configs' window is 8: every prompt but the first rotates it
NEW = (30, 25, 40, 10)


@pytest.fixture(scope="module")
def model(ckpt):
    path, _ = ckpt("e2b")
    return gemma4.load(path, dtype="float64", device="cpu")  # float64: batched and alone agree to the bit


def prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, params):
    return generate_alone(model, prompt, params)


def run(engine, requests):
    """requests: id -> (prompt, params); returns id -> tokens, and the finish reasons."""
    for rid, (p, sp) in requests.items():
        engine.add(rid, p, sp)
    out, reasons = {rid: [] for rid in requests}, {}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
    assert engine.memory()["used_bytes"] == 0
    return out, reasons


CASES = [  # (name, kv_memory, block_size, max_step_tokens, temperature): all must equal the requests alone
    ("roomy, greedy", None, 16, 512, 0.0),
    ("tiny chunks", None, 4, 3, 0.0),
    ("chunks of 7, block 8", None, 8, 7, 0.0),
    ("preemption (18 global blocks for ~200 tokens)", 120_000, 4, 4, 0.0),
    ("seeded sampling", None, 16, 512, 1.0),
    ("seeded sampling, preemption", 120_000, 4, 5, 0.8),
]


@pytest.mark.parametrize("name,kv,bs,chunk,temperature", CASES, ids=[c[0] for c in CASES])
def test_batch_equals_alone(model, name, kv, bs, chunk, temperature):
    params = [SamplingParams(max_new_tokens=n, temperature=temperature, seed=i, top_k=50 if temperature else None)
              for i, n in enumerate(NEW)]
    ps = prompts()
    engine = Engine(model, kv_memory=kv, block_size=bs, max_seqs=4, max_step_tokens=chunk, stop_ids=())
    out, reasons = run(engine, {str(i): (p, sp) for i, (p, sp) in enumerate(zip(ps, params))})
    for i, (p, sp) in enumerate(zip(ps, params)):
        assert out[str(i)] == alone(model, p, sp), f"request {i}"
        assert reasons[str(i)] == "length"
    if kv:
        assert engine.scheduler.preemptions > 0


def test_stop_token_and_requests_joining_midway(model):
    ps = prompts((9, 17, 6))
    first = alone(model, ps[0], SamplingParams(max_new_tokens=20))
    stop = first[5]  # stop on the 6th token the first request makes
    engine = Engine(model, block_size=8, max_seqs=2, stop_ids=(stop,))
    engine.add("a", ps[0], SamplingParams(max_new_tokens=20))
    engine.add("b", ps[1], SamplingParams(max_new_tokens=12))
    out, reasons = {"a": [], "b": [], "c": []}, {}
    steps = 0
    while engine.has_work():
        if steps == 3:  # a third request arrives while the others decode (and waits for a free slot)
            engine.add("c", ps[2], SamplingParams(max_new_tokens=8))
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
            reasons[ev.request_id] = ev.finish_reason
        steps += 1
    assert out["a"] == first[:first.index(stop) + 1] and reasons["a"] == "stop"
    for rid, p, n in (("b", ps[1], 12), ("c", ps[2], 8)):
        expected = alone(model, p, SamplingParams(max_new_tokens=n))
        expected = expected[:expected.index(stop) + 1] if stop in expected else expected
        assert out[rid] == expected


def test_prefix_cache_second_turn(model):
    """Turn 2 = turn 1's prompt + its answer + a new message: the shared prefix comes from the cache
    (global blocks by prefix, sliding blocks of the window before the resume point), with the same output."""
    [p1, extra] = prompts((45, 11), seed=3)
    engine = Engine(model, block_size=4, max_seqs=2, stop_ids=())
    out1, _ = run(engine, {"t1": (p1, SamplingParams(max_new_tokens=10))})
    p2 = p1 + out1["t1"] + extra
    before = engine.scheduler.cached_tokens
    out2, _ = run(engine, {"t2": (p2, SamplingParams(max_new_tokens=12))})
    reused = engine.scheduler.cached_tokens - before
    assert reused == (len(p1) + 10 - 1) // 4 * 4  # every full block of turn 1 (its last token has no K/V)
    assert out2["t2"] == alone(model, p2, SamplingParams(max_new_tokens=12))
    # many requests with the same system prompt
    out3, _ = run(engine, {f"s{i}": (p1[:30] + [7 + i] * 5, SamplingParams(max_new_tokens=4)) for i in range(3)})
    for i in range(3):
        assert out3[f"s{i}"] == alone(model, p1[:30] + [7 + i] * 5, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rollback_then_continue_equals_never_drafted(model, k):
    """k drafted tokens are fed (their K/V written on every kind of layer, the window moving past block
    boundaries), the target samples after them, then all k + 1 are taken back: the sequence goes on with
    exactly the tokens of one that never saw them. Blocks past the kept tokens go back at once."""
    prompt, params = prompts((13,), seed=k)[0], SamplingParams(max_new_tokens=24)
    want = alone(model, prompt, params)
    engine = Engine(model, block_size=4, max_seqs=2, stop_ids=(), max_rollback=k + 1)
    engine.add("r", prompt, params)
    seq, got = engine.sequences["r"], []
    while len(got) < 5 + k:  # 18 + k positions: the 8-token window has moved past several blocks
        got += [ev.token_id for ev in engine.step()]
    junk = [(t * 7 + 11) % 500 + 3 for t in got[-k:]]  # drafts the target would reject
    seq.output += junk
    assert [ev.token_id for ev in engine.step()] and seq.computed == len(seq) - 1  # fed them, sampled one more
    engine.rollback("r", k + 1)
    assert seq.output == got and seq.computed == len(seq) - 1
    assert all(len(t) == -(-len(seq) // 4) for t in seq.blocks.values())
    while engine.has_work():
        got += [ev.token_id for ev in engine.step() if ev.token_id is not None]
    assert got == want
    assert engine.memory()["used_bytes"] == 0


def test_rollback_past_the_kept_window_recomputes(model):
    """Taking back more computed tokens than the sliding blocks kept behind the window (max_rollback 2, 6 taken
    back at position ~27 of an 8-token window): the sequence is recomputed (its blocks from the prefix cache
    where they still hold), with the same tokens; a bad k is refused."""
    prompt, params = prompts((17,), seed=9)[0], SamplingParams(max_new_tokens=16)
    want = alone(model, prompt, params)
    engine = Engine(model, block_size=4, stop_ids=(), max_rollback=2)
    engine.add("r", prompt, params)
    seq = engine.sequences["r"]
    while len(seq.output) < 10:
        engine.step()
    for k in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match="k must be in"):
            engine.rollback("r", k)
    engine.rollback("r", 6)
    assert seq.output == want[:4] and seq.computed == 0 and seq in engine.scheduler.waiting
    got = list(seq.output)
    while engine.has_work():
        got += [ev.token_id for ev in engine.step() if ev.token_id is not None]
    assert got == want and engine.scheduler.cached_tokens > 0
    assert engine.memory()["used_bytes"] == 0


def test_padded_decode_rows_and_keys_change_nothing(model):
    """What a CUDA graph replays (engine/worker.py): a decode batch padded to its row bucket (scratch rows in
    block 0), its key buckets (masked keys) and a fixed table width gives the real rows' logits of the unpadded
    batch."""
    from gemma4.engine.worker import forward_step

    engine = Engine(model, block_size=4, max_seqs=4, stop_ids=())
    for i, p in enumerate(prompts((5, 19, 11))):
        engine.add(str(i), p, SamplingParams(max_new_tokens=20))
    for _ in range(6):
        engine.step()
    seqs, cache = engine.scheduler.running, engine.worker.cache
    assert len(seqs) == 3 and all(s.uncomputed == 1 for s in seqs)
    for s in seqs:  # the blocks the next step would take
        engine.scheduler._ensure_blocks(s, len(s))
    ids = torch.tensor([[s.tokens[-1]] for s in seqs])
    starts = [s.computed for s in seqs]
    tables = {kind: [s.blocks[kind] for s in seqs] for kind in engine.pools}
    with torch.inference_mode():
        plain = forward_step(model, cache, ids, cache.index(starts, 1, tables))
        index = cache.index(starts, 1, tables, rows=8, keys={"full": 64, "sliding": 32}, width=16)
        padded = forward_step(model, cache, torch.cat([ids, torch.zeros(5, 1, dtype=ids.dtype)]), index)
    assert index.keys["full"].shape == (64,) and index.keys["sliding"].shape == (32,)
    assert all(t.shape == (8, 16) for t in index.tables.values())
    torch.testing.assert_close(padded[:3], plain, rtol=1e-12, atol=1e-12)


def test_prefix_names_compare_tokens_not_hashes():
    """Two blocks whose Python hashes collide ((0, -1) and (0, -2) hash alike) are different prefixes: the
    second never finds the first's blocks."""
    from gemma4.engine.blocks import BlockPool, Prefixes

    assert hash((0, -1)) == hash((0, -2))
    prefixes = Prefixes()
    pool = BlockPool(4, 1, prefixes)
    block = pool.allocate()
    pool.register(block, prefixes.name(0, [-1]))
    assert prefixes.find([-1], 1) == [pool.name_of[block]] and prefixes.find([-2], 1) == []
    pool.release(block)
    for _ in range(3):  # handed out again: its name is gone
        pool.allocate()
    assert prefixes.find([-1], 1) == [] and not prefixes.ids


def test_cancel_frees_memory(model):
    engine = Engine(model, block_size=4, max_seqs=4, stop_ids=())
    for i, p in enumerate(prompts()):
        engine.add(str(i), p, SamplingParams(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.memory()["used_bytes"] > 0
    engine.abort("1")
    engine.abort("unknown")  # harmless
    events = engine.step()
    assert [(e.request_id, e.token_id, e.finish_reason) for e in events if e.request_id == "1"] == \
        [("1", None, "cancelled")]
    for i in ("0", "2", "3"):
        engine.abort(i)
    engine.step()
    assert not engine.has_work()
    assert engine.memory()["used_bytes"] == 0


def test_async_engine_concurrent_requests_and_disconnect(model):
    engine = Engine(model, block_size=8, max_seqs=4, stop_ids=())
    served = AsyncEngine(engine)
    ps = prompts()

    async def one(p, n):
        return [ev.token_id async for ev in served.generate(p, SamplingParams(max_new_tokens=n))]

    async def leaves_early(p):
        async for ev in served.generate(p, SamplingParams(max_new_tokens=500)):
            if ev.token_id is not None:
                return  # the client goes away: its request is cancelled

    async def main():
        return await asyncio.gather(*(one(p, n) for p, n in zip(ps, NEW)), leaves_early(ps[0]))

    results = asyncio.run(main())
    for p, n, got in zip(ps, NEW, results):
        assert got == alone(model, p, SamplingParams(max_new_tokens=n))
    for _ in range(100):  # the engine thread frees the cancelled request at its next step
        if not engine.has_work():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.memory()["used_bytes"] == 0


class ExplodingGrammar:
    """A constraint whose fourth mask raises, as a grammar that breaks down mid-output does."""

    def __init__(self):
        self.masks = 0

    def mask_logits(self, logits):
        self.masks += 1
        if self.masks == 4:
            raise ValueError("the grammar broke")
        return logits

    def accept(self, token):
        pass


def test_a_failing_sequence_ends_alone(model, monkeypatch, caplog):
    """Its sampler or grammar fails mid-decode, or its forward fails inside a decode batch (a one-token prompt
    is fed with the decodes): that sequence ends with "error" (logged, its memory freed), the others run on
    with the tokens they make alone."""
    from gemma4.engine.worker import Worker

    real = Worker.forward

    def forward(worker, ids, *args, **kw):
        if [77] in ids:
            raise RuntimeError("this row cannot run")
        return real(worker, ids, *args, **kw)

    monkeypatch.setattr(Worker, "forward", forward)
    ps, params = prompts((9, 17, 6)), SamplingParams(max_new_tokens=10)
    engine = Engine(model, block_size=4, max_seqs=8, stop_ids=())
    for rid, p, c in (("a", ps[0], None), ("b", ps[1], None), ("grammar", ps[2], ExplodingGrammar())):
        engine.add(rid, p, params, constraint=c)
    out, reasons, steps = {"a": [], "b": [], "grammar": [], "forward": []}, {}, 0
    while engine.has_work():
        if steps == 2:  # joins the decode batch of a, b and grammar
            engine.add("forward", [77], params)
        for ev in engine.step():
            out[ev.request_id] += [ev.token_id] if ev.token_id is not None else []
            reasons[ev.request_id] = ev.finish_reason
        steps += 1
    assert engine.memory()["used_bytes"] == 0
    assert reasons == {"a": "length", "b": "length", "forward": "error", "grammar": "error"}
    assert out["a"] == alone(model, ps[0], params) and out["b"] == alone(model, ps[1], params)
    assert out["forward"] == [] and len(out["grammar"]) == 3
    logged = {r.getMessage() for r in caplog.records if r.name == "gemma4.engine"}
    assert logged == {"request grammar failed: ValueError: the grammar broke",
                      "request forward failed: RuntimeError: this row cannot run"}


def test_repetition_penalty_in_the_engine(model):
    """The penalty divides/multiplies the logits of tokens already seen; the engine's logits are inference
    tensors, which the sampler once wrote into (an error outside inference mode)."""
    ps = prompts((9, 17))
    penalized = SamplingParams(max_new_tokens=12, repetition_penalty=2.0)
    engine = Engine(model, block_size=4, max_seqs=2, stop_ids=())
    out, reasons = run(engine, {"a": (ps[0], penalized), "b": (ps[1], SamplingParams(max_new_tokens=12))})
    assert reasons == {"a": "length", "b": "length"}
    assert out["a"] == alone(model, ps[0], penalized) != alone(model, ps[0], SamplingParams(max_new_tokens=12))


def test_chunks_never_split_a_media_run(model):
    engine = Engine(model, block_size=4, max_seqs=1, stop_ids=())
    sched = engine.scheduler
    sched.media_ids = frozenset({9})
    from gemma4.engine.sequence import Sequence

    seq = Sequence("x", [5, 5, 9, 9, 9, 9, 5, 5], SamplingParams(), frozenset(), None)
    # (start, count) -> chunk end
    for (start, count), end in {(0, 3): 2, (0, 2): 2, (0, 6): 6, (2, 1): 6, (2, 3): 6, (0, 8): 8, (6, 1): 7}.items():
        assert sched._chunk_end(seq, start, count) == end, (start, count)


BAD = [
    (dict(prompt=[]), "non-empty"),
    (dict(prompt=[1, 2, 10 ** 9]), "token ids"),
    (dict(prompt=["a"]), "token ids"),
    (dict(prompt=[5] * 5000), "context"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_requests(model, kwargs, message):
    engine = Engine(model, block_size=8, stop_ids=())
    with pytest.raises(ValueError, match=message):
        engine.add("r", kwargs["prompt"], SamplingParams())
    assert not engine.has_work()


def test_bad_engine_settings(model):
    with pytest.raises(ValueError, match="too small"):
        Engine(model, kv_memory=1000)
    with pytest.raises(ValueError, match="positive"):
        Engine(model, block_size=0)
    engine = Engine(model, block_size=8, stop_ids=())
    engine.add("r", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add("r", [5, 6], SamplingParams())


SAMPLERS = [  # rows of one batch: the plain greedy ones take the shared argmax, the rest their own path
    dict(),
    dict(repetition_penalty=1.5),
    dict(temperature=0.8, top_k=20, seed=3),
    dict(logprobs=2),
    dict(),
]


def test_sample_rows_equals_each_sampler_alone():
    logits = torch.randn(len(SAMPLERS), 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits[4, [7, 9]] = 50.0  # a tie: the first index wins, as on the host
    seen = {1, 2, int(logits[1].argmax())}  # the penalty changes row 1's argmax
    make = lambda: [Sampler(SamplingParams(**kw), seen=set(seen)) for kw in SAMPLERS]  # noqa: E731
    together, alone = make(), make()
    got = sample_rows(together, logits)
    assert got == [s.sample(row) for s, row in zip(alone, logits)]
    assert got[4][0] == 7 and got[1][0] != int(logits[1].argmax())
    assert [s.seen for s in together] == [s.seen for s in alone]


def test_quantized_model_keeps_bf16_kv(ckpt):
    """int4 weights with fp32 activations: the pool holds bf16 K/V (half the bytes, as accounted), rounded
    before attending in both caches, so the engine still gives each request's tokens alone."""
    path, _ = ckpt("e2b")
    model = gemma4.load(path, dtype="float32", device="cpu", quantize="int4", group_size=32)
    # Prompts in one chunk, as the oracle feeds them: an int4 chunk of up to 16 rows goes to the kernel and a
    # larger one to dequantize + GEMM, whose roundings differ.
    engine = Engine(model, block_size=8, max_seqs=2, max_step_tokens=64, stop_ids=())
    assert all(t.dtype == torch.bfloat16 for t in engine.worker.cache.v.values())
    assert engine.block_sizes == {k: block_bytes(model.config.text, k, 8, 2) for k in engine.block_sizes}
    ps, params = prompts((11, 30)), SamplingParams(max_new_tokens=12)
    out, _ = run(engine, {"a": (ps[0], params), "b": (ps[1], params)})
    assert out == {"a": alone(model, ps[0], params), "b": alone(model, ps[1], params)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(cuda_graphs=True), "CUDA graphs need a CUDA device"),  # asked for on a CPU
    (dict(max_rollback=-1), "max_rollback >= 0"),
    (dict(max_seqs=0), "must be positive"),
])
def test_bad_engine_options(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, block_size=8, **kwargs)


PROMPT_SCORE_CASES = [  # (name, kv_memory, block_size, max_step_tokens, top k): prompt logprobs = one forward's
    ("one chunk, top 3", None, 16, 512, 3),
    ("chunks of 5, top 0", None, 4, 5, 0),
    ("preempted mid-prompt", 120_000, 4, 4, 2),
    ("after the prefix cache holds the prompt", None, 4, 512, 1),
]


@pytest.mark.parametrize("name,kv,bs,chunk,k", PROMPT_SCORE_CASES, ids=[c[0] for c in PROMPT_SCORE_CASES])
def test_prompt_logprobs(model, name, kv, bs, chunk, k):
    """SamplingParams.prompt_logprobs: each prompt token's log-probability given those before it (and the top
    k) from the engine's own prefill, equal to the whole prompt's forward, however it is chunked, preempted
    or cached; the tokens generated are unchanged."""
    ps = prompts()
    engine = Engine(model, kv_memory=kv, block_size=bs, max_seqs=4, max_step_tokens=chunk, stop_ids=())
    if name.startswith("after"):  # the same prompts once without scores: their blocks are cached
        run(engine, {f"warm{i}": (p, SamplingParams(max_new_tokens=2)) for i, p in enumerate(ps)})
    scores = {}
    for i, p in enumerate(ps):
        engine.add(str(i), p, SamplingParams(max_new_tokens=NEW[i], prompt_logprobs=k))
    out = {str(i): [] for i in range(len(ps))}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
            if ev.prompt_logprobs is not None:
                assert ev.request_id not in scores  # on the first token alone
                scores[ev.request_id] = ev.prompt_logprobs
    assert engine.memory()["used_bytes"] == 0
    if kv:
        assert engine.scheduler.preemptions > 0
    for i, p in enumerate(ps):
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
        got = scores[str(i)]
        assert len(got) == len(p) - 1
        for t, (lp, top) in enumerate(got):
            assert abs(lp - logp[t, p[t + 1]].item()) < 1e-9
            want = logp[t].topk(k)
            assert [j for j, _ in top] == want.indices.tolist()
            assert all(abs(a - b) < 1e-9 for (_, a), b in zip(top, want.values.tolist()))
        assert out[str(i)] == alone(model, p, SamplingParams(max_new_tokens=NEW[i]))
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=21)
