"""Every entry point given bad input answers with a clear error naming the problem."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
from gemma4.config import ConfigError, parse_config


def edited_copy(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        config(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if tensors:
        st = os.path.join(dst, "model.safetensors")
        state = load_file(st)
        tensors(state)
        save_file(state, st, metadata={"format": "pt"})
    return dst


def _set(path, value):
    def edit(cfg):
        *parents, last = path.split(".")
        d = cfg
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return edit


PREFIX = "model.language_model.layers."
CONFIG_CASES = [  # (edit, words the error must contain)
    (_set("model_type", "llama"), "model_type 'llama'"),
    (_set("text_config.frobnicate", 3), "frobnicate"),
    (_set("text_config.layer_types", ["sliding_attention"] * 3 + ["full_attention"]), "layer_types has 4 entries"),
    (_set("text_config.layer_types", ["sliding_attention"] * 10), "last layer must be full_attention"),
    (_set("text_config.layer_types", ["bogus_attention"] * 9 + ["full_attention"]), "unknown layer type"),
    (_set("text_config.num_key_value_heads", 3), "not a multiple of num_key_value_heads"),
    (_set("text_config.hidden_size", KeyError), "hidden_size must be a positive integer"),
    (_set("text_config.num_kv_shared_layers", 10), "num_kv_shared_layers=10"),
    (_set("text_config.num_kv_shared_layers", 9), "non-shared layer of each attention type"),
    (_set("text_config.hidden_activation", "relu"), "hidden_activation 'relu'"),
    (_set("text_config.enable_moe_block", True), "enable_moe_block needs a positive integer num_experts"),
    (_set("text_config.rope_parameters", {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                                          "full_attention": {"rope_theta": 1.0}}), "unsupported rope_type 'yarn'"),
    (_set("text_config.per_layer_config", {"9": {"head_dim": 8}}), "both per_layer_config and global_head_dim"),
]


@pytest.mark.parametrize("edit,words", CONFIG_CASES)
def test_bad_config(ckpt, tmp_path, edit, words):
    path, _ = ckpt("e2b")
    bad = edited_copy(path, str(tmp_path / "bad"), config=edit)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        gemma4.load(bad, dtype="float32", device="cpu")


@pytest.mark.parametrize("per_layer,words", [
    ({"99": {"head_dim": 8}}, "per_layer_config key '99'"),
    ({"2": {"sliding_window": 8}}, "may only set head_dim"),
    ({"2": {"head_dim": 7}}, "head_dim must be a positive even integer"),
])
def test_bad_per_layer_config(per_layer, words):
    text = {"model_type": "gemma4_text", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_key_value_heads": 1, "per_layer_config": per_layer,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
    with pytest.raises(ConfigError, match=words):
        parse_config(text)


def test_config_not_an_object():
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_config([1, 2])


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        gemma4.load_config(tmp_path)


TENSOR_CASES = [
    (lambda s: s.pop(PREFIX + "3.mlp.up_proj.weight"), "missing tensor.*layers.3.mlp.up_proj.weight"),
    (lambda s: s.update({PREFIX + "0.mlp.up_proj.weight": torch.zeros(7, 64)}),
     r"layers.0.mlp.up_proj.weight' has shape \(7, 64\)"),
    (lambda s: s.update({PREFIX + "0.self_attn.extra.weight": torch.zeros(2)}), "unexpected tensor.*extra"),
    # K/V weights on a layer that is NOT KV-shared are not "unused": layer 0 keeps its own, so a stray
    # v_norm weight there (v_norm has no scale) is unexpected
    (lambda s: s.update({PREFIX + "0.self_attn.v_norm.weight": torch.zeros(16)}), "unexpected tensor.*v_norm"),
]


@pytest.mark.parametrize("edit,words", TENSOR_CASES)
def test_bad_tensors(ckpt, tmp_path, edit, words):
    path, _ = ckpt("e2b")
    bad = edited_copy(path, str(tmp_path / "bad"), tensors=edit)
    with pytest.raises(gemma4.CheckpointError, match=words):
        gemma4.load(bad, dtype="float32", device="cpu")


def test_missing_paths_and_pickles(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        gemma4.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        gemma4.load("no-such-org/no-such-model-xyz")
    path, _ = ckpt("e2b")
    pickled = edited_copy(path, str(tmp_path / "pickled"))
    os.remove(os.path.join(pickled, "model.safetensors"))
    open(os.path.join(pickled, "pytorch_model.bin"), "wb").close()
    with pytest.raises(gemma4.CheckpointError, match="never unpickles"):
        gemma4.load(pickled)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        gemma4.load(path, dtype="int8")


@pytest.fixture(scope="module")
def tiny_llm():
    return gemma4.LLM(None)


@pytest.mark.parametrize("prompts,kwargs,words", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "non-empty list of prompts"),
    ([[1, 2], [3, 262144]], {}, "prompt 1: token id 262144 is out of range"),
    ([[1, -1]], {}, "token id -1 is out of range"),
    ([["a", "b"]], {}, "list of integer token ids"),
    ("hello", {}, "non-empty list of prompts"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ([[1, 2]], {"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
    ([[1, 2]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1, 2]], {"top_p": 1.5}, "top_p must be in"),
    ([[1, 2]], {"top_k": -2}, "top_k must be a non-negative integer"),
])
def test_bad_generate_input(tiny_llm, prompts, kwargs, words):
    with pytest.raises(ValueError, match=words):
        tiny_llm.generate(prompts, **kwargs)


def test_model_call_bad_input(tiny_llm):
    model = tiny_llm.model
    for ids, words in [(torch.zeros(1, 0, dtype=torch.long), "non-empty"),
                       (torch.tensor([[1, 300000]]), "token id 300000 is out of range"),
                       (torch.tensor([1, 2]), r"\[batch, seq\]"),
                       (torch.tensor([[1.0, 2.0]]), "integer token ids")]:
        with pytest.raises(ValueError, match=words):
            model(ids)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


BENCH_SERVING = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_serving.py")


@pytest.mark.parametrize("device,message", [("tpu", "invalid choice: 'tpu'"),
                                            ("cuda", "no CUDA device here")])
def test_bench_serving_bad_device(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, BENCH_SERVING, "--device", device], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


# generation_config.json -> (stop ids, temperature, top_k, top_p) of a request that sets nothing, or the error
GENERATION_CONFIGS = [
    (None, ((1, 106, 50), 1.0, None, None)),  # no file: stop on Gemma 4's tokens, temperature 1 alone
    ({"eos_token_id": [1, 106, 50], "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95},
     ((1, 106, 50), 1.0, 64, 0.95)),  # what Gemma 4 ships
    ({"eos_token_id": 1, "do_sample": False, "temperature": 0.7}, ((1,), 0.0, None, None)),  # greedy checkpoint
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": "high"}, "top_p must be a finite number"),
    ("{not json", "not a usable generation config"),
]


@pytest.mark.parametrize("content,expected", GENERATION_CONFIGS)
def test_generation_config_defaults(tmp_path, content, expected):
    from gemma4.engine.sample import GenerationConfig

    if content is not None:
        (tmp_path / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            GenerationConfig.load(tmp_path)
        return
    p = GenerationConfig.load(tmp_path).sampling(16)
    assert (tuple(p.stop_token_ids), p.temperature, p.top_k, p.top_p) == expected
    q = GenerationConfig.load(tmp_path).sampling(16, temperature=0.5, top_k=0, stop_token_ids=())
    assert (tuple(q.stop_token_ids), q.temperature, q.top_k) == ((), 0.5, 0)  # a value given wins


def test_one_set_of_sampling_defaults(tiny_llm):
    """LLM, CLI and server build a request's SamplingParams in one place, from the checkpoint's defaults:
    the same seed gives the same tokens through LLM.generate and the server."""
    from fastapi.testclient import TestClient

    from gemma4.server.app import create_app

    [out] = tiny_llm.generate([[2, 651, 6037]], max_new_tokens=6, seed=11)
    with TestClient(create_app(tiny_llm, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": [2, 651, 6037], "max_tokens": 6, "seed": 11})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == out.text
