"""Serving LoRA adapters per request: requests with different adapters, and none, batch together in one engine
step and each gets exactly what its adapter alone gives; the prefix cache never hands one adapter's K/V to
another; the server routes by `model` and lists the adapters; bad adapters and names fail clearly."""
import concurrent.futures

import pytest
import torch

from gemma4.llm import LLM
from gemma4.train.lora import AdapterError, LoRAConfig, apply_lora, lora_parameters, save_adapter

openai = pytest.importorskip("openai")

PROMPT = [2] + [1000 + 37 * i for i in range(150)]  # longer than two K/V blocks: the prefix cache is in play
ORDER = [None, "a", "b", "a", None, "b"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters of the built-in tiny model, of different ranks and modules, with large random weights."""
    out = {}
    for name, seed, rank, modules in (("a", 1, 4, ("q_proj", "down_proj")),
                                      ("b", 2, 8, ("v_proj", "o_proj", "up_proj"))):
        llm = LLM()
        torch.manual_seed(seed)
        apply_lora(llm.model, LoRAConfig(r=rank, alpha=8, target_modules=modules))
        with torch.no_grad():
            for p in lora_parameters(llm.model):
                p.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(f"adapter-{name}")
        save_adapter(llm.model, path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def alone(adapters):
    """Greedy tokens of the prompt under each adapter (and none), each in an LLM serving only that one."""
    return {name: LLM(lora={name: adapters[name]} if name else None)
            .generate([PROMPT], max_new_tokens=12, temperature=0, adapter=name)[0].token_ids
            for name in (None, "a", "b")}


def test_mixed_adapters_in_one_step_match_each_alone(adapters, alone):
    assert alone[None] != alone["a"] != alone["b"] != alone[None]  # the adapters do change the output
    llm = LLM(lora=adapters)
    engine = llm.engine
    steps_with_all = 0
    for i, name in enumerate(ORDER):
        engine.add(f"r{i}", PROMPT, llm.generation.sampling(12, temperature=0), adapter=llm.adapter_slot(name))
    out = {}
    while engine.has_work():
        running = {s.adapter for s in engine.scheduler.running}
        steps_with_all += running == {0, 1, 2}
        for ev in engine.step():
            if ev.token_id is not None:
                out.setdefault(ev.request_id, []).append(ev.token_id)
    assert steps_with_all > 0
    for i, name in enumerate(ORDER):
        assert out[f"r{i}"] == alone[name], (i, name)
    # A second round: the prompt's blocks come from the prefix cache, each adapter's own (a block computed under
    # another adapter, or none, holds other K/V).
    before = engine.stats()["cached_prompt_tokens"]
    results = {name: llm.generate([PROMPT], max_new_tokens=12, temperature=0, adapter=name)[0].token_ids
               for name in ("b", None, "a")}
    assert results == {name: alone[name] for name in results}
    assert engine.stats()["cached_prompt_tokens"] - before == 3 * 128


def test_unknown_adapter_name(adapters):
    llm = LLM(lora={"a": adapters["a"]})
    with pytest.raises(ValueError, match=r"adapter 'b' is not loaded"):
        llm.generate([PROMPT], max_new_tokens=2, adapter="b")
    with pytest.raises(ValueError, match="adapter slot 5"):
        llm.engine.add("x", PROMPT, llm.generation.sampling(2), adapter=5)


def test_bad_adapter_directories(tmp_path, adapters):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        LLM(lora={"x": str(tmp_path)})
    with pytest.raises(ValueError, match="not with compile"):
        LLM(lora=adapters, compile=True)


def test_server_routes_requests_by_model_name(adapters, alone):
    from test_server import start

    from gemma4.server.app import create_app

    llm = LLM(lora=adapters)
    srv, url = start(create_app(llm, "tiny"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny", "a", "b"} and listed["a"].parent == "tiny"
        text = llm.tokenizer.decode(PROMPT[1:])

        def ask(name):
            try:
                r = client.completions.create(model=name, prompt=text, max_tokens=12, temperature=0)
            except openai.BadRequestError as e:
                return "400", str(e)
            return r.model, r.choices[0].text

        # requests for an adapter that is not served ("c") run beside the others: each is refused alone
        names = ["tiny" if n is None else n for n in ORDER]
        names = names[:3] + ["c"] + names[3:] + ["c"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, names))
        expected = {name: llm.generate([llm.tokenizer.encode(text, add_bos=True)], max_new_tokens=12,
                                       temperature=0, adapter=None if name == "tiny" else name)[0].text
                    for name in ("tiny", "a", "b")}
        for (model, got), name in zip(answers, names):
            if name == "c":
                assert model == "400" and "not served here" in got
            else:
                assert model == name and got == expected[name]
    finally:
        srv.should_exit = True


@pytest.mark.parametrize("argv,message", [
    (["--lora", "noequals"], "expected NAME=PATH"),
    (["--lora", "a=/nowhere"], "no adapter directory"),
])
def test_serve_lora_flag_errors(capsys, argv, message):
    from gemma4.cli import main

    assert main(["serve", "--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
