"""Speculative decoding with MTP drafters in the engine: greedy output with drafting is token for token the
output without, for every target shape, draft length, mixed batches and preemption."""
import pytest
import torch
from test_engine import run as run_requests  # id -> (prompt, params) through an engine: tokens, finish reasons

import gemma4
from gemma4.engine.engine import Engine
from gemma4.engine.sample import SamplingParams
from gemma4.weights import load_assistant

PROMPTS = [[2, 17, 300, 45], [2, 9, 8, 7, 6, 5, 4, 3, 100, 200, 300, 400, 11, 12, 13], [2, 77]]
NEW = 14


@pytest.fixture(scope="session")
def pair(ckpt, tmp_path_factory):
    """pair(shape) -> (target, drafter) in fp32: the tiny target and a tiny drafter made for it."""
    import reference

    made = {}

    def make(shape):
        if shape not in made:
            path, _ = ckpt(shape)
            out = str(tmp_path_factory.mktemp(f"{shape}-drafter"))
            reference.build_drafter(shape, out, ordered=shape != "31b")
            made[shape] = (gemma4.load(path, dtype="float32", device="cpu"),
                           load_assistant(out, dtype="float32", device="cpu"))
        return made[shape]

    return make


def run(engine, prompts=PROMPTS, new=NEW):
    """Greedy tokens of each prompt, decoded together (and every block freed at the end)."""
    out, _ = run_requests(engine, {str(i): (p, SamplingParams(max_new_tokens=new, stop_token_ids=()))
                                   for i, p in enumerate(prompts)})
    return [out[str(i)] for i in range(len(prompts))]


def oracle(plain, wrong_every=3):
    """A drafter stand-in that proposes the target's own greedy continuation (known from a plain run), every
    `wrong_every`-th draft replaced by a wrong token: acceptance is high, and rejection still happens."""
    calls = [0]

    def draft(drafter, embed, token, hidden, positions, kv, k):
        position = int(positions[0, 0])
        for p, out in zip(PROMPTS, plain):
            seq = p + out
            if position < len(seq) and seq[position] == int(token[0]) and position >= len(p) - 1 \
                    and seq[:position] == (p + out)[:position]:
                nxt = (seq[position + 1:position + 1 + k] + [1] * k)[:k]
                calls[0] += 1
                if calls[0] % wrong_every == 0:
                    nxt[-1] = (nxt[-1] + 1) % 512
                return torch.tensor([nxt])
        raise AssertionError("no known sequence at this position")

    return draft


@pytest.mark.parametrize("shape", ["e2b", "e4b", "26b", "31b"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_drafts_is_greedy(pair, shape, k):
    """The tiny drafter (random: drafts mostly rejected) and an oracle drafter (mostly accepted): the same tokens
    as plain greedy decoding, for three prompts of mixed lengths decoded together."""
    target, drafter = pair(shape)
    plain = run(Engine(target, block_size=4, max_step_tokens=64))
    assert all(len(o) == NEW for o in plain)
    engine = Engine(target, block_size=4, max_step_tokens=64, drafter=drafter, num_draft_tokens=k)
    assert run(engine) == plain
    # it drafted, and backed off as its drafts were rejected (k, then 4, 2, 1, 1 at most: see MIN_REACH)
    assert 3 <= engine.draft_stats["drafted"] <= 3 * (k + 8)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("gemma4.model.assistant.draft", oracle(plain))
        engine = Engine(target, block_size=4, max_step_tokens=64, drafter=drafter, num_draft_tokens=k)
        assert run(engine) == plain
    stats = engine.draft_stats
    assert stats["accepted"] > 0.5 * stats["drafted"] > 0 and stats["accepted"] < stats["drafted"]


@pytest.mark.parametrize("max_step_tokens", [8, 3])
def test_drafts_through_preemption_and_split_steps(pair, max_step_tokens):
    """Little K/V memory (18 global blocks of 4 for three sequences of 52-65 tokens: preempted and recomputed),
    and steps too small for a token and its 4 drafts (3: drafts dropped, the token decoded alone): still plain
    greedy's tokens, and every block freed."""
    target, drafter = pair("e2b")
    plain = run(Engine(target, block_size=4, max_step_tokens=64), new=50)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("gemma4.model.assistant.draft", oracle(plain))
        engine = Engine(target, kv_memory=60_000, block_size=4, max_seqs=3, max_step_tokens=max_step_tokens,
                        drafter=drafter, num_draft_tokens=4)
        assert run(engine, new=50) == plain
    assert engine.scheduler.preemptions > 0 and engine.draft_stats["accepted"] > 0
    assert engine.memory()["used_bytes"] == 0


def test_stop_and_length_inside_an_accepted_run(pair):
    """A stop token or the token limit reached among accepted drafts ends the sequence exactly there."""
    target, drafter = pair("e2b")
    plain = run(Engine(target, block_size=4, max_step_tokens=64))
    stop = plain[0][5]
    cut = plain[0][:plain[0].index(stop) + 1]
    with pytest.MonkeyPatch.context() as m:
        m.setattr("gemma4.model.assistant.draft", oracle(plain, wrong_every=1000))
        engine = Engine(target, block_size=4, drafter=drafter, num_draft_tokens=6)
        out, reasons = run_requests(engine, {
            "s": (PROMPTS[0], SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,))),
            "n": (PROMPTS[1], SamplingParams(max_new_tokens=5, stop_token_ids=()))})
    assert out == {"s": cut, "n": plain[1][:5]} and reasons == {"s": "stop", "n": "length"}
    assert engine.draft_stats["accepted"] > 0


def test_bad_drafter_settings(pair, ckpt):
    target, drafter = pair("e2b")
    for k in (0, 9, 100, True, 2.0):
        with pytest.raises(ValueError, match="num_draft_tokens must be an integer in \\[1, 8\\]"):
            Engine(target, drafter=drafter, num_draft_tokens=k)
    with pytest.raises(ValueError, match="num_draft_tokens needs a drafter"):
        Engine(target, num_draft_tokens=2)
    other, _ = pair("e4b")
    with pytest.raises(ValueError, match="drafter layer 0 \\(sliding\\) has head dim 16 and 1 KV heads"):
        Engine(other, drafter=drafter)


@pytest.fixture(scope="module")
def drafter_dir(ckpt, tmp_path_factory):
    import reference

    out = str(tmp_path_factory.mktemp("e2b-drafter-cli"))
    reference.build_drafter("e2b", out)
    return ckpt("e2b")[0], out


def test_llm_with_a_draft_model(drafter_dir):
    """gemma4.LLM(path, draft_model=...): greedy results as without it; sampled requests decode as before."""
    path, drafter = drafter_dir
    prompts = [[2, 17, 300, 45], [2, 77]]
    plain = gemma4.LLM(path, dtype="float32", device="cpu").generate(prompts, max_new_tokens=10, temperature=0)
    llm = gemma4.LLM(path, dtype="float32", device="cpu", draft_model=drafter, num_draft_tokens=3)
    assert [r.token_ids for r in llm.generate(prompts, max_new_tokens=10, temperature=0)] == \
        [r.token_ids for r in plain]
    assert llm.engine.num_draft_tokens == 3 and llm.engine.draft_stats["drafted"] > 0


@pytest.mark.parametrize("extra,message", [
    (["--num-draft-tokens", "0"], "num_draft_tokens must be an integer in [1, 8] with a draft model, got 0"),
    (["--num-draft-tokens", "100"], "num_draft_tokens must be an integer in [1, 8] with a draft model, got 100"),
    (["--draft-model", "/nonexistent"], "draft model /nonexistent: no checkpoint directory at /nonexistent"),
    (["--draft-model", "TARGET"], "draft model TARGET: not a Gemma 4 assistant (drafter) config: model_type"),
])
def test_draft_options_bad_input(drafter_dir, capsys, extra, message):
    from gemma4.cli import main

    path, drafter = drafter_dir
    extra = [path if x == "TARGET" else x for x in extra]
    if "--draft-model" not in extra:
        extra += ["--draft-model", drafter]
    assert main(["generate", "hi", "--model", path, "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message.replace("TARGET", path) in err and "Traceback" not in err


# (p over a 4-token vocabulary, the draft): the draft likely, unlikely, impossible (top-k drops it), and the
# case the reference gets wrong (p = [.5, .5], the draft token 0: its 83% instead of 50%)
SAMPLED_CASES = [([0.5, 0.5, 0.0, 0.0], 0), ([0.1, 0.2, 0.3, 0.4], 3), ([0.1, 0.2, 0.3, 0.4], 0),
                 ([0.05, 0.05, 0.6, 0.3], 1)]


@pytest.mark.parametrize("probs,draft", SAMPLED_CASES)
def test_rejection_sampling_keeps_the_distribution(probs, draft):
    """Sampler.sample(logits, draft): the token's distribution is p whatever the draft (total-variation
    distance to p shrinking like 1/sqrt(n): < 0.02 at 20,000 draws), where accepting the argmax draft with
    probability p/q and resampling from p (the reference) is biased."""
    from gemma4.engine.sample import Sampler

    logits = torch.log(torch.tensor(probs + [0.0] * 60))
    for top_k in (None, 3):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=0, top_k=top_k))
        target = torch.tensor(probs)
        if top_k:  # the 3 most likely, renormalised
            target = torch.where(target >= target.topk(3).values[-1], target, 0.0)
            target = target / target.sum()
        n = 20_000
        counts = torch.bincount(torch.tensor([sampler.sample(logits, draft)[0] for _ in range(n)]), minlength=64)
        assert counts[4:].sum() == 0
        tv = 0.5 * (counts[:4] / n - target).abs().sum()
        assert tv < 0.02, (top_k, counts[:4].tolist())


def test_sampled_requests_draft_and_finish(pair):
    """Sampled requests draft too (seeded: the same tokens every run), within their limits."""
    target, drafter = pair("e2b")
    outs = []
    for _ in range(2):
        engine = Engine(target, block_size=4, drafter=drafter, num_draft_tokens=3)
        out, _ = run_requests(engine, {str(i): (p, SamplingParams(max_new_tokens=NEW, temperature=0.8, seed=i,
                                                                  stop_token_ids=())) for i, p in enumerate(PROMPTS)})
        outs.append(out)
        assert engine.draft_stats["drafted"] > 0
    assert outs[0] == outs[1] and all(len(o) == NEW for o in outs[0].values())


def test_drafting_backs_off_and_probes(pair, monkeypatch):
    """A drafter whose drafts are all rejected: the draft length falls (k, then fewer: MIN_REACH) to none,
    then one draft every PROBE_EVERY steps; one that is always right keeps drafting k."""
    import gemma4.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "PROBE_EVERY", 4)
    target, drafter = pair("e2b")
    plain = run(Engine(target, block_size=4, max_step_tokens=64), prompts=PROMPTS[:1], new=40)
    engine = Engine(target, block_size=4, max_step_tokens=64, drafter=drafter, num_draft_tokens=4)
    sizes = []
    real = engine._verify
    monkeypatch.setattr(engine, "_verify", lambda w: sizes.append(w.seq.drafts) or real(w))
    assert run(engine, prompts=PROMPTS[:1], new=40) == plain
    drafted = [n for n in sizes if n]
    assert drafted[:5] == [4, 4, 2, 1, 1] and set(drafted[5:]) == {1} and len(drafted) > 6  # back off, probe
    assert engine.draft_stats["accepted"] == 0
    with monkeypatch.context() as m:
        m.setattr("gemma4.model.assistant.draft", oracle(plain, wrong_every=10**6))
        engine = Engine(target, block_size=4, max_step_tokens=64, drafter=drafter, num_draft_tokens=4)
        assert run(engine, prompts=PROMPTS[:1], new=40) == plain
    assert engine.draft_stats["drafted"] == engine.draft_stats["accepted"] > 30


def test_metrics_report_drafts(drafter_dir):
    """/metrics: drafted and accepted tokens, in all and per draft position (as vLLM's spec_decode counters)."""
    from gemma4.server.service import Service

    path, drafter = drafter_dir
    llm = gemma4.LLM(path, dtype="float32", device="cpu", draft_model=drafter, num_draft_tokens=2)
    llm.generate([[2, 17, 300, 45]], max_new_tokens=8, temperature=0)
    stats = llm.engine.draft_stats
    from prometheus_client.parser import text_string_to_metric_families

    service = Service(llm, "m")
    try:
        text = service.metrics.render().decode()
    finally:
        service.engine.stop()
    got = {(s.name, s.labels.get("position")): s.value for f in text_string_to_metric_families(text)
           for s in f.samples}
    assert got["gemma4:spec_decode_num_draft_tokens_total", None] == stats["drafted"] > 0
    assert got["gemma4:spec_decode_num_accepted_tokens_total", None] == stats["accepted"]
    for i in range(2):
        assert got["gemma4:spec_decode_num_draft_tokens_per_pos_total", str(i)] == stats["drafted_at"][i]
        assert got["gemma4:spec_decode_num_accepted_tokens_per_pos_total", str(i)] == stats["accepted_at"][i]


def test_a_failing_request_leaves_the_others(pair):
    """One drafting request whose sampling fails mid-verification ends alone ("error", its blocks freed); the
    requests beside it go on to plain greedy's tokens."""
    from gemma4.engine.sample import Sampler

    target, drafter = pair("e2b")
    plain = run(Engine(target, block_size=4, max_step_tokens=64))
    real, calls = Sampler.sample, [0]

    def sample(self, logits, draft=None):
        if 400 in self.seen:  # request "1" (its prompt alone holds 400)
            calls[0] += 1
            if calls[0] == 6:
                raise ValueError("this request's own sampler broke")
        return real(self, logits, draft)

    with pytest.MonkeyPatch.context() as m:
        m.setattr("gemma4.model.assistant.draft", oracle(plain))
        m.setattr(Sampler, "sample", sample)
        engine = Engine(target, block_size=4, max_step_tokens=64, drafter=drafter, num_draft_tokens=3)
        out, reasons = run_requests(engine, {str(i): (p, SamplingParams(max_new_tokens=NEW, stop_token_ids=()))
                                             for i, p in enumerate(PROMPTS)})
    assert reasons == {"0": "length", "1": "error", "2": "length"} and calls[0] == 6
    assert out["0"] == plain[0] and out["2"] == plain[2] and out["1"] == plain[1][:len(out["1"])]
    assert engine.draft_stats["accepted"] > 0


def test_requests_can_opt_out(pair, drafter_dir):
    """`speculative=False` (SamplingParams, LLM keywords, the API's "speculative": false): that request decodes
    token by token beside drafting ones; a non-boolean is one clear error."""
    target, drafter = pair("e2b")
    plain = run(Engine(target, block_size=4, max_step_tokens=64))
    engine = Engine(target, block_size=4, drafter=drafter, num_draft_tokens=3)
    out, _ = run_requests(engine, {"0": (PROMPTS[0], SamplingParams(max_new_tokens=NEW, stop_token_ids=(),
                                                                    speculative=False))})
    assert out["0"] == plain[0] and engine.draft_stats["drafted"] == 0
    with pytest.raises(ValueError, match="speculative must be true or false, got 'no'"):
        SamplingParams(speculative="no")

    from fastapi.testclient import TestClient

    from gemma4.server.app import create_app

    path, drafter_path = drafter_dir
    llm = gemma4.LLM(path, dtype="float32", device="cpu", draft_model=drafter_path, num_draft_tokens=2)
    with TestClient(create_app(llm, "m")) as http:
        body = {"model": "m", "prompt": [2, 17, 300, 45], "max_tokens": 6, "temperature": 0}
        r = http.post("/v1/completions", json={**body, "speculative": False})
        assert r.status_code == 200 and llm.engine.draft_stats["drafted"] == 0
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and llm.engine.draft_stats["drafted"] > 0
        r = http.post("/v1/completions", json={**body, "speculative": "no"})
        assert r.status_code == 400 and "speculative" in r.text
    llm.engine.stepper.stop()
