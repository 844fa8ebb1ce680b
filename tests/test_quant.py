"""Weight-only int8 / int4: close to the float model, savable, and loadable without re-quantizing.
The checkpoints are "tame" (scaled as trained weights are, see reference.randomise): on the wild parity
checkpoints even bf16 drifts to a cosine of 0.97 from fp32."""
import json
import os

import pytest
import torch

import gemma4
from gemma4.engine.kv import cache_dtype
from gemma4.quant import QuantizedLinear


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# Group 64 is the default; at 32 the tiny models' 96- and 32-wide projections (MLP down, attention out) are
# quantized too (at 64 they stay in float, as any width that is not a multiple of the group does).
@pytest.mark.parametrize("shape", ["e2b", "e4b", "26b", "31b"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_quantized_close_to_float(ckpt, shape, quantize, group_size):
    path, _ = ckpt(shape, tame=True)
    ids = torch.randint(3, 512, (2, 21), generator=torch.Generator().manual_seed(0))
    ref = gemma4.LLM(path, dtype="float32", device="cpu")
    q = gemma4.LLM(path, dtype="float32", device="cpu", quantize=quantize, group_size=group_size)
    assert any(isinstance(m, QuantizedLinear) for m in q.model.modules())
    with torch.no_grad():
        c = cosine(q.model(ids), ref.model(ids))
    assert c >= (0.999 if quantize == "int8" else 0.99), c
    prompts = [ids[0].tolist(), ids[1, :9].tolist()]
    want = [r.token_ids for r in ref.generate(prompts, max_new_tokens=16, stop_token_ids=[], temperature=0)]
    got = [r.token_ids for r in q.generate(prompts, max_new_tokens=16, stop_token_ids=[], temperature=0)]
    # agreement on the first 16 greedy tokens of each prompt, counted up to the first divergence
    agree = sum(next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), 16) for w, g in zip(want, got))
    assert agree >= 0.9 * 32, (agree, c)


def test_int4_greedy_agreement_on_rows(ckpt):
    """>= 90% of greedy next tokens agree when each step sees the same (float model's) history."""
    path, _ = ckpt("e2b", tame=True)
    ids = torch.randint(3, 512, (4, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = gemma4.load(path, dtype="float32", device="cpu")(ids).argmax(-1)
        b = gemma4.load(path, dtype="float32", device="cpu", quantize="int4")(ids).argmax(-1)
    assert (a == b).float().mean().item() >= 0.9


@pytest.mark.parametrize("quantize,text_only", [("int8", False), ("int4", False), ("int4", True)])
def test_save_and_reload_quantized(ckpt, tmp_path, quantize, text_only):
    path, _ = ckpt("e2b", tame=True, text_only=text_only)
    llm = gemma4.LLM(path, dtype="float32", device="cpu", quantize=quantize)
    out = str(tmp_path / "q")
    llm.save_quantized(out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["bits"] == int(quantize[3:])
    again = gemma4.load(out, dtype="float32", device="cpu")
    ids = torch.randint(3, 512, (1, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids), llm.model(ids))
    with pytest.raises(ValueError, match="already quantized"):
        gemma4.load(out, quantize="int4")


def test_bad_quantization_requests(ckpt, tmp_path):
    path, _ = ckpt("e2b", tame=True)
    with pytest.raises(ValueError, match="quantize must be 'int8' or 'int4'"):
        gemma4.load(path, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        gemma4.load(path, quantize="int4", group_size=48)
    llm = gemma4.LLM(path, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="needs a quantized model"):
        llm.save_quantized(str(tmp_path / "x"))
    # a checkpoint quantized by another tool is refused by name, not misread
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(path, other)
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(gemma4.CheckpointError, match="quantization 'gptq' is not supported"):
        gemma4.load(other)


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_quantized_cpu_model_computes_in_fp32(ckpt, tmp_path, monkeypatch, native):
    """A bf16 checkpoint quantized (at load, or saved so) on a CPU: fp32 activations by default where bf16 is
    emulated (the kernels take them at the same speed), bf16 where it is native (prefill's GEMM is then bf16);
    the PLE table left in its stored dtype, scales fp16; an explicit dtype wins."""
    import shutil

    from gemma4 import hardware, kernels

    monkeypatch.setattr(hardware, "_chosen", {"native_bf16": native})
    monkeypatch.setattr(kernels, "_native", None)
    want = torch.bfloat16 if native else torch.float32
    from safetensors.torch import load_file, save_file

    src, _ = ckpt("e2b", tame=True, text_only=True)
    bf16 = str(tmp_path / "bf16")
    shutil.copytree(src, bf16)
    with open(os.path.join(bf16, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    with open(os.path.join(bf16, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in os.listdir(bf16):
        if name.endswith(".safetensors"):
            file = os.path.join(bf16, name)
            save_file({k: v.bfloat16() for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    saved = str(tmp_path / "int4")
    gemma4.LLM(bf16, device="cpu", quantize="int4").save_quantized(saved)
    for model in (gemma4.load(bf16, device="cpu", quantize="int4"), gemma4.load(saved, device="cpu")):
        text = model.language_model
        assert model.dtype == want and text.norm.weight.dtype == want
        assert cache_dtype(model) == torch.bfloat16  # K/V stored in bf16, as llama.cpp keeps f16 K/V
        assert text.embed_tokens_per_layer.weight.dtype == torch.bfloat16
        assert text.layers[0].mlp.up_proj.scales.dtype == torch.float16
        assert text.embed_tokens.scales.dtype == torch.float16
        ids = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert model(ids).dtype == want
    assert gemma4.load(bf16, device="cpu").dtype == torch.bfloat16  # float: the checkpoint's dtype
    assert cache_dtype(gemma4.load(src, device="cpu")) == torch.float32  # unquantized: K/V in the model's dtype
    explicit = gemma4.load(bf16, device="cpu", quantize="int4", dtype="bfloat16")
    assert explicit.dtype == torch.bfloat16 and explicit.language_model.norm.weight.dtype == torch.bfloat16
    # an fp32 checkpoint quantized into bf16 activations: the RoPE tables stay fp32 (computed, not loaded)
    fp32_to_bf16 = gemma4.load(src, device="cpu", quantize="int4", dtype="bfloat16")
    assert fp32_to_bf16.language_model.norm.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in fp32_to_bf16.named_buffers() if "inv_freq" in n)
