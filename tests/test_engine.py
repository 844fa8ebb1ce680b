"""The serving engine (continuous batching, paged K/V, chunked prefill, prefix cache, preemption,
cancellation): every request's output equals running it alone, and memory returns to zero."""
import asyncio

import pytest
import torch

import gemma4
from gemma4.engine import runner
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
    return [ev.token_id for ev in runner.generate(model, [prompt], [params], [set()])]


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
    (global blocks by hash, sliding blocks of the window before the resume point), with the same output."""
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
    from gemma4.engine import engine as engine_module

    real = engine_module.forward_paged

    def forward(model, cache, ids, *args, **kw):
        if [77] in ids:
            raise RuntimeError("this row cannot run")
        return real(model, cache, ids, *args, **kw)

    monkeypatch.setattr(engine_module, "forward_paged", forward)
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
    # Prompts in one chunk, as runner.generate does: an int4 chunk of up to 16 rows goes to the kernel and a
    # larger one to dequantize + GEMM, whose roundings differ.
    engine = Engine(model, block_size=8, max_seqs=2, max_step_tokens=64, stop_ids=())
    assert all(t.dtype == torch.bfloat16 for t in engine.cache.v.values())
    assert engine.block_sizes == {k: block_bytes(model.config.text, k, 8, 2) for k in engine.block_sizes}
    ps, params = prompts((11, 30)), SamplingParams(max_new_tokens=12)
    out, _ = run(engine, {"a": (ps[0], params), "b": (ps[1], params)})
    assert out == {"a": alone(model, ps[0], params), "b": alone(model, ps[1], params)}
