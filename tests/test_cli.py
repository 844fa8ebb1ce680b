"""`gemma4 info` / `gemma4 generate`, run in-process through `cli.main`.

The configs in tests/data/configs are the four published-architecture config.json files (copied from the
shared configs; README §2 there gives the parameter counts checked here).
"""
import json
import os
import shutil

import pytest

from gemma4.cli import main
from gemma4.llm import TINY_NOTICE

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")
B = 10**9

# README §2 (meta-device counts, tied LM head once), in billions rounded to 3 decimals as published:
# total, text decoder (= total - vision - audio; the public 25.2 B / 30.7 B are these), active per token.
# The embedding and PLE tables are exact: 262144 x hidden, 262144 x layers x 256.
PUBLISHED = {
    #                  total   text    active  embedding              PLE table
    "gemma-4-e2b":     (5.104, 4.629, 4.629, 262144 * 1536, 262144 * 35 * 256),  # 2.349 B PLE
    "gemma-4-e4b":     (7.941, 7.463, 7.463, 262144 * 2560, 262144 * 42 * 256),  # 2.819 B PLE
    "gemma-4-26b-a4b": (25.806, 25.233, 3.823, 262144 * 2816, 0),  # active: top-8 of 128 experts
    "gemma-4-31b":     (31.273, 30.697, 30.697, 262144 * 5376, 0),
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def info_json(capsys, name, *extra):
    code, out, err = run(capsys, "info", "--model", os.path.join(CONFIGS, name), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", PUBLISHED)
def test_info_counts_match_published(capsys, name):
    total, text, active, embedding, ple = PUBLISHED[name]
    info = info_json(capsys, name)
    assert round(info["params_total"] / B, 3) == total  # stricter than the 0.5 % asked for
    assert round((info["params_total"] - info["params_vision"] - info["params_audio"]) / B, 3) == text
    assert round(info["params_text"] / B, 3) == text
    assert round(info["params_active"] / B, 3) == active
    assert (info["params_embedding"], info["params_ple"]) == (embedding, ple)
    assert info["dtype"] == "bfloat16" and info["context"] == info["max_position_embeddings"]
    assert info["num_layers"] == {"gemma-4-e2b": 35, "gemma-4-e4b": 42, "gemma-4-26b-a4b": 30, "gemma-4-31b": 60}[name]


@pytest.mark.parametrize("name", PUBLISHED)
def test_counts_match_transformers(capsys, name):
    """Our closed-form tower counts (and the text decoder we build) equal transformers' own model, counting
    what its checkpoint stores: parameters and persistent buffers (clip bounds, std_bias/std_scale, layer_scalar)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    with open(os.path.join(CONFIGS, name, "config.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ref = Gemma4ForConditionalGeneration(Gemma4Config(**cfg)).model

    def stored(*parts):
        modules = [getattr(ref, p) for p in parts if getattr(ref, p) is not None]
        return sum(t.numel() for m in modules for t in m.state_dict().values())

    info = info_json(capsys, name)
    assert info["params_vision"] == stored("vision_tower", "embed_vision")
    assert info["params_audio"] == stored("audio_tower", "embed_audio")
    assert info["params_text"] == stored("language_model")


def test_kv_cache_bytes_e2b(capsys):
    # E2B: 35 layers, (4 sliding, 1 global) x 7; layers 15-34 are KV-shared (store nothing), so layers 0-14
    # hold K/V: 12 sliding + 3 global (4, 9, 14). 1 KV head; head dim 256 sliding / 512 global; bf16.
    context = 131072
    sliding = 12 * 512 * 1 * 256 * 2 * 2  # one 512-token window each; K and V; 2 bytes
    full = 3 * context * 1 * 512 * 2 * 2  # every position; K and V
    info = info_json(capsys, "gemma-4-e2b", "--context", str(context))
    assert info["kv_cache_bytes"] == sliding + full == 811_597_824
    assert info["kv_bytes_per_token"] == (sliding + full) // context == 6192


def test_kv_cache_bytes_31b(capsys):
    # 31B: 60 layers, (5 sliding, 1 global) x 10, no KV sharing. Sliding: 16 KV heads x 256, window 1024,
    # K and V. Global: 4 KV heads x 512 with K=V, so one tensor. bf16.
    context = 131072
    sliding = 50 * 1024 * 16 * 256 * 2 * 2
    full = 10 * context * 4 * 512 * 1 * 2
    info = info_json(capsys, "gemma-4-31b", "--context", str(context))
    assert info["kv_cache_bytes"] == sliding + full == 6_207_569_920
    assert info["kv_bytes_per_token"] == (sliding + full) // context


def test_info_table(capsys):
    code, out, err = run(capsys, "info", "--model", os.path.join(CONFIGS, "gemma-4-26b-a4b"))
    assert code == 0 and err == ""
    for line in ("layers                30: 25 sliding (window 1024), 5 global",
                 "KV heads              8 sliding / 2 global",
                 "MoE                   128 experts, top-8, width 704",
                 "parameters            25.806 B",
                 "  active per token    3.823 B (top-8 of 128 experts)"):
        assert line in out.splitlines()


def test_info_builtin_tiny(capsys):
    code, out, err = run(capsys, "info", "--json")
    assert code == 0
    assert err.strip() == TINY_NOTICE
    info = json.loads(out)
    assert info["num_layers"] == 6 and info["dtype"] == "float32"
    assert info["params_vision"] > 0 and info["params_audio"] > 0  # tiny towers: /image and /audio work


def test_generate_builtin_tiny(capsys):
    code, out, err = run(capsys, "generate", "--max-new-tokens", "6", "The capital of France is")
    assert code == 0, err
    assert TINY_NOTICE in err and "Traceback" not in err
    assert out.endswith("\n") and out.strip()


@pytest.fixture
def unknown_field_ckpt(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(os.path.join(CONFIGS, "gemma-4-e2b"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["frobnicate"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


BAD = [  # argv, words the one-line error must contain
    (["generate", ""], "the prompt is empty"),
    (["generate", "--model", "/nonexistent", "hi"], "/nonexistent"),
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens must be a positive integer"),
    (["generate", "--temperature", "-1", "hi"], "temperature must be >= 0"),
    (["generate", "--top-p", "1.5", "hi"], "top_p must be in (0, 1]"),
    (["generate", "--max-new-tokens", "many", "hi"], "invalid int value: 'many'"),
    (["generate", "--dtype", "int8", "hi"], "unsupported dtype 'int8'"),
    (["generate", "--device", "cuda:99", "hi"], "device cuda:99: 0 CUDA device(s) available"),
    (["generate", "--model", "{unknown}", "hi"], "frobnicate"),
    (["info", "--model", "/nonexistent"], "/nonexistent"),
    (["info", "--context", "0"], "--context must be a positive number"),
    (["info", "--model", "{unknown}"], "frobnicate"),
    ([], "required: COMMAND"),
    (["serve", "--port", "70000"], "--port 70000: must be in 0..65535"),
    (["serve", "--kv-memory", "lots"], "--kv-memory 'lots'"),
    (["serve", "--max-seqs", "0"], "--max-seqs and --prefill-chunk must be positive"),
    (["serve", "--allow-local-media", "/nonexistent"], "no such directory"),
    (["serve", "--max-request-bytes", "huge"], "--max-request-bytes 'huge'"),
    (["serve", "--max-request-bytes", "0"], "--max-request-bytes must be positive"),
    (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    (["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout must be >= 0"),
    (["serve", "--max-waiting", "-1"], "--max-waiting must be >= 0"),
    (["serve", "--model", "/nonexistent"], "/nonexistent"),
    (["chat", "--model", "/nonexistent"], "/nonexistent"),
    (["chat", "--dtype", "int8"], "unsupported dtype 'int8'"),
]


@pytest.mark.parametrize("argv,words", BAD)
def test_bad_input(capsys, unknown_field_ckpt, argv, words):
    argv = [a.replace("{unknown}", unknown_field_ckpt) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("gemma4: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err


def test_ctrl_c_is_quiet(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("gemma4.cli.LLM", interrupted)
    code, out, err = run(capsys, "generate", "hi")
    assert code == 130 and "Traceback" not in err


def test_quantize_then_generate(ckpt, tmp_path, capsys):
    path, _ = ckpt("e2b", tame=True)
    out = str(tmp_path / "int4")
    assert main(["quantize", "--model", path, "--to", "int4", "--out", out]) == 0
    assert "wrote int4 checkpoint" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:  # the default format: 64 weights per scale
        assert json.load(f)["quantization_config"] == {"quant_method": "gemma4-weight-only", "bits": 4, "group_size": 64}
    assert main(["info", "--model", out, "--json"]) == 0
    capsys.readouterr()
    # "<|turn>\n" tokenizes to ids below the tiny model's 512-token vocabulary
    assert main(["generate", "--model", out, "--max-new-tokens", "3", "<|turn>\n"]) == 0
    assert main(["generate", "--model", path, "--quantize", "int8", "--max-new-tokens", "3", "<|turn>\n"]) == 0


@pytest.mark.parametrize("argv,words", [
    (["quantize", "--model", "/nonexistent", "--to", "int4", "--out", "/tmp/x"], "no checkpoint directory"),
    (["quantize", "--model", "x", "--to", "int3", "--out", "/tmp/x"], "invalid choice: 'int3'"),
    (["generate", "--quantize", "fp4", "hi"], "invalid choice: 'fp4'"),
])
def test_quantize_bad_input(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize("group_size,words", [("48", "group_size must be a positive multiple of 32, got 48"),
                                              ("0", "group_size must be a positive multiple of 32, got 0"),
                                              ("x", "--group-size: invalid int value: 'x'")])
def test_quantize_bad_group_size(ckpt, tmp_path, capsys, group_size, words):
    path, _ = ckpt("e2b", tame=True)
    assert main(["quantize", "--model", path, "--to", "int4", "--out", str(tmp_path / "q"),
                 "--group-size", group_size]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_serve_kv_memory_too_small(capsys):
    code, out, err = run(capsys, "serve", "--kv-memory", "1KB")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("gemma4: error: kv_memory 1024 bytes is too small")
