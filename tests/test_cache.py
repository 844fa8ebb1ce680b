"""K/V cache invariants: prefill == token-by-token decode == chunked prefill == the cache-free forward,
across window rotation; batched generation == one prompt at a time; the cache holds only what it must."""
import pytest
import torch

import gemma4
from gemma4.engine.engine import Engine
from gemma4.engine.kv import kv_bytes, kv_bytes_per_token

SHAPES = ["e2b", "e4b", "26b", "31b"]
N = 30  # window 8: the ring rotates several times


def logits_with_cache(model, ids, chunk, block_size=4):
    """The last token's logits of each `chunk` tokens fed through the engine's paged cache (its worker, with
    blocks taken from its pools): [number of chunks, vocab]."""
    engine = Engine(model, block_size=block_size, max_step_tokens=chunk)
    n = ids.shape[1]
    table = {kind: [pool.allocate() for _ in range(-(-n // block_size))] for kind, pool in engine.pools.items()}
    return torch.cat([engine.worker.forward([ids[0, s:s + chunk].tolist()], [s], [table])
                      for s in range(0, n, chunk)])


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_decode_chunked_agree(ckpt, shape):
    path, _ = ckpt(shape)
    # float64: the three ways must agree to rounding, which fp32 noise would hide
    model = gemma4.load(path, dtype="float64", device="cpu")
    ids = torch.randint(3, 512, (1, N), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    scale = full.abs().max().item()
    for chunk in (N, 1, 5, 8, 13):
        got = logits_with_cache(model, ids, chunk)
        ends = [min(s + chunk, N) - 1 for s in range(0, N, chunk)]
        assert (got - full[0, ends]).abs().max().item() <= 1e-10 * scale, f"chunk {chunk}"


@pytest.mark.parametrize("shape", ["e2b", "26b"])
def test_last_token_logits_skip_shared_layers_work(ckpt, shape):
    """A prompt chunk runs KV-shared layers on the last token only; its logits equal the full forward's."""
    path, _ = ckpt(shape)
    model = gemma4.load(path, dtype="float64", device="cpu")
    ids = torch.randint(3, 512, (1, N), generator=torch.Generator().manual_seed(4))
    last = logits_with_cache(model, ids, N)
    with torch.no_grad():
        full = model(ids)[:, -1]
    assert (last - full).abs().max().item() <= 1e-10 * full.abs().max().item()


@pytest.mark.parametrize("shape", ["e2b", "31b"])
@pytest.mark.parametrize("sampled", [False, True])
def test_batched_equals_one_by_one(ckpt, shape, sampled):
    path, _ = ckpt(shape)
    llm = gemma4.LLM(path, dtype="float64", device="cpu")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 17, 9)]
    kw = dict(max_new_tokens=14, stop_token_ids=[], temperature=0.8 if sampled else 0.0, top_k=50, seed=7)
    together = llm.generate(prompts, **kw)
    alone = [llm.generate([p], **kw)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_stop_token_ends_one_sequence_not_the_batch(ckpt):
    path, _ = ckpt("e2b")
    llm = gemma4.LLM(path, dtype="float32", device="cpu")
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free = llm.generate(prompts, max_new_tokens=10, stop_token_ids=[], temperature=0)
    stop = free[0].token_ids[3]
    outs = llm.generate(prompts, max_new_tokens=10, stop_token_ids=[stop], temperature=0)
    first = free[0].token_ids.index(stop)
    assert outs[0].token_ids == free[0].token_ids[:first + 1] and outs[0].finish_reason == "stop"
    if stop not in free[1].token_ids:
        assert outs[1].token_ids == free[1].token_ids and outs[1].finish_reason == "length"


@pytest.mark.parametrize("shape,expected", [
    # E2B-like: 6 non-shared layers, 5 sliding (window 8, 1 KV head, D 16) + 1 global (D 32); K and V
    ("e2b", lambda ctx: (5 * min(ctx, 8) * 1 * 16 * 2 + 1 * ctx * 1 * 32 * 2) * 4),
    # 31B-like: 5 sliding (2 KV heads, D 16) + 1 global K=V (1 KV head, D 32): one tensor on the global layer
    ("31b", lambda ctx: (5 * min(ctx, 8) * 2 * 16 * 2 + 1 * ctx * 1 * 32 * 1) * 4),
])
def test_cache_holds_only_what_is_needed(ckpt, shape, expected):
    path, _ = ckpt(shape)
    cfg = gemma4.load_config(path).text
    for ctx in (5, 8, 100):
        assert kv_bytes(cfg, ctx, 4) == expected(ctx)
        assert kv_bytes_per_token(cfg, ctx, 4) == expected(ctx) // ctx
    # the engine's pools: a block of each kind holds block_size positions of what the sequence needs
    engine = Engine(gemma4.load(path, dtype="float32", device="cpu"), kv_memory=1 << 20, block_size=4)
    per_block = sum(engine.block_sizes.values())
    assert per_block == expected(4)


def test_compiled_decode_matches_eager(ckpt):
    """The engine's torch.compile'd decode steps (dynamic batch and key lengths) give the eager tokens, with a
    row finishing early (the batch shrinks)."""
    path, _ = ckpt("e2b")
    eager = gemma4.LLM(path, dtype="float64", device="cpu")
    compiled = gemma4.LLM(path, dtype="float64", device="cpu", compile=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [9, 10]]
    kw = dict(max_new_tokens=12, stop_token_ids=[], temperature=0)
    want = eager.generate(prompts, **kw)
    stop = want[1].token_ids[2]  # ends the second prompt early, the first runs on
    got = compiled.generate(prompts, **dict(kw, stop_token_ids=[stop]))
    want = eager.generate(prompts, **dict(kw, stop_token_ids=[stop]))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


# (new tokens T, cached keys before them, sliding window or None, padded rows): a causal prompt, one after a
# rotated ring of cached keys, sliding windows narrower and wider than a block, left padding of one row.
BLOCK_CASES = [(600, 0, None, 0), (600, 0, 100, 0), (700, 300, 512, 0), (513, 40, 8, 0), (300, 0, None, 37)]


@pytest.mark.parametrize("T,cached,window,pad", BLOCK_CASES)
def test_prefill_attention_blocks_equal_one_call(T, cached, window, pad):
    """A long prompt's attention by 256-query blocks over the keys each block sees == one SDPA call over all
    keys and the whole mask (float64)."""
    from gemma4.ops import prefill_attention

    g = torch.Generator().manual_seed(T + cached)
    B, H, K, D = 2, 4, 2, 16
    q = torch.randn(B, H, T, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, K, cached + T, D, dtype=torch.float64, generator=g) for _ in range(2))
    # cached keys sit in a rotated ring (positions out of order), then the new tokens
    ring = torch.roll(torch.arange(cached), cached // 3)
    key_pos = torch.cat([ring, torch.arange(cached, cached + T)])[None].expand(B, -1).clone()
    key_pos[1, cached:cached + pad] = -1  # row 1: padding keys
    q_pos = torch.arange(cached, cached + T)[None, :, None]
    mask = (key_pos[:, None] >= 0) & (key_pos[:, None] <= q_pos)
    if window:
        mask &= key_pos[:, None] > q_pos - window
    mask[1, :pad] = False
    mask[1, :pad, 0] = True  # padded queries see one key (no all-masked row)
    mask = mask[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                                                enable_gqa=True)
    torch.testing.assert_close(prefill_attention(q, k, v, mask), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", ["e2b", "31b"])
def test_forward_returns_last_kv_of_each_kind(ckpt, shape):
    """return_kv: the final hidden state and the K/V (and mask) of the last layer of each kind that computes its
    own (what the MTP drafters attend to): through the engine's paged cache, after a prompt fed in chunks, they equal the
    cache-free forward's over the whole prompt (31B: K rebuilt from V on its K=V global layers)."""
    from gemma4.engine.worker import forward_step

    path, _ = ckpt(shape)
    model = gemma4.load(path, dtype="float64", device="cpu")
    ids = torch.randint(3, 512, (1, N), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        embeds, ple_ids = model.embed(ids)
        hidden, kv = model.language_model(embeds, ple_ids, torch.arange(N)[None], return_kv=True)
        assert torch.equal(hidden, model.language_model(embeds, ple_ids, torch.arange(N)[None]))
    assert set(kv) == {"full", "sliding"} and all(kv[k][0].shape[2] == N for k in kv)
    engine = Engine(model, block_size=4, max_step_tokens=N)
    table = {kind: [pool.allocate() for _ in range(-(-N // 4))] for kind, pool in engine.pools.items()}
    cache = engine.worker.cache
    with torch.inference_mode():
        for s in range(0, N, 7):  # chunks of 7 (the last of 2), the last one asking for the K/V
            index = cache.index([s], min(7, N - s), {k: [t] for k, t in table.items()})
            out = forward_step(model, cache, ids[:, s:s + 7], index, return_kv=s + 7 >= N)
    logits, h, paged = out
    torch.testing.assert_close(h, hidden[:, -1:], rtol=1e-10, atol=1e-10)
    for kind in kv:  # the paged K/V covers the keys the last chunk read (the sliding layers: its window)
        pos = paged[kind][0].shape[2]
        torch.testing.assert_close(paged[kind][0], kv[kind][0][:, :, N - pos:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(paged[kind][1], kv[kind][1][:, :, N - pos:], rtol=1e-10, atol=1e-10)
