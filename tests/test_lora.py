"""LoRA / QLoRA (gemma4.train.lora): parity with PEFT on the reference for all four shapes (logits and the
adapter's gradients), adapters that go both ways between PEFT and us, merging, the quantized base's backward,
and bad adapters."""
import json
import os

import pytest
import torch

import gemma4
from gemma4.train.lora import (AdapterError, LoRAConfig, LoRALinear, adapter_state, apply_lora, load_adapter,
                               lora_modules, lora_parameters, merge_lora, save_adapter, save_merged)

peft = pytest.importorskip("peft")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(ref, shape, seed=0, r=4, alpha=8):
    """PEFT's LoRA on the reference with random A and B (init_lora_weights=False: B is not zero)."""
    torch.manual_seed(seed)
    banks = ["experts.gate_up_proj", "experts.down_proj"] if shape == "26b" else None
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=MODULES, target_parameters=banks,
                          init_lora_weights=False)
    return peft.get_peft_model(ref, cfg)


def adapted(model, seed, r, alpha, std=0.1):
    """`model` with LoRA on every projection, A and B drawn at random (a trained adapter: B not zero)."""
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(r=r, alpha=alpha))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, std)
    return model


def grads_in_peft_layout(model):
    """Our adapter gradients under PEFT's keys (adapter_state's layout applied to the .grad tensors)."""
    saved = {}
    for m in lora_modules(model).values():
        saved[m] = (m.lora_A.data, m.lora_B.data)
        m.lora_A.data, m.lora_B.data = m.lora_A.grad, m.lora_B.grad
    try:
        return adapter_state(model)
    finally:
        for m, (a, b) in saved.items():
            m.lora_A.data, m.lora_B.data = a, b


@pytest.mark.parametrize("shape", ["e2b", "e4b", "26b", "31b"])
def test_peft_adapter_gives_peft_logits_and_gradients(ckpt, tmp_path, shape):
    """A PEFT adapter (every projection, and the 26B-A4B expert banks as PEFT's target_parameters) loaded here:
    the logits of PEFT's model within fp32 rounding, and the same gradients of every A and B for the same loss."""
    import copy

    path, ref = ckpt(shape)
    pm = peft_model(copy.deepcopy(ref), shape)
    pm.save_pretrained(tmp_path / "adapter")
    model = gemma4.load(path, dtype="float32", device="cpu")
    wrapped = load_adapter(model, tmp_path / "adapter")
    # KV-shared layers have no k/v to adapt; K=V layers no v; every PEFT module has its twin here
    theirs_keys = {k.replace(".default", "") for k, p in pm.named_parameters() if p.requires_grad}
    assert set(adapter_state(model)) == theirs_keys and len(wrapped) == len(theirs_keys) // 2
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 13, 512, generator=torch.Generator().manual_seed(2))
    theirs, ours = pm(input_ids=ids).logits, model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
    (theirs * w).sum().backward()
    (ours * w).sum().backward()
    want = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    got = grads_in_peft_layout(model)
    scale = max(g.abs().max().item() for g in want.values())
    for key, g in want.items():
        assert (got[key] - g).abs().max().item() <= 1e-4 * scale, key


@pytest.mark.parametrize("shape", ["e2b", "26b"])
def test_our_adapter_loads_in_peft(ckpt, tmp_path, shape):
    """An adapter written here (trained weights: B not zero) loads with peft.PeftModel.from_pretrained on the
    reference and gives our logits."""
    import copy

    path, ref = ckpt(shape)
    model = adapted(gemma4.load(path, dtype="float32", device="cpu"), seed=3, r=4, alpha=16)
    save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == sorted(MODULES)
    assert cfg["target_parameters"] == (["experts.gate_up_proj", "experts.down_proj"] if shape == "26b" else None)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "ours"))
    ids = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs, ours = pm(input_ids=ids).logits, model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


@pytest.mark.parametrize("shape", ["e2b", "26b"])
def test_merged_checkpoint_equals_adapter_applied(ckpt, tmp_path, shape):
    path, _ = ckpt(shape)
    model = adapted(gemma4.load(path, dtype="float32", device="cpu"), seed=5, r=2, alpha=4)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids)
    merge_lora(model)
    assert not lora_modules(model)
    save_merged(model, path, tmp_path / "merged")
    merged = gemma4.load(tmp_path / "merged", dtype="float32", device="cpu")
    with torch.no_grad():
        assert (merged(ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    base = gemma4.load(path, dtype="float32", device="cpu")
    with torch.no_grad():
        assert (base(ids) - want).abs().max().item() > 1e-2  # the adapter did change the model


def test_quantized_base_backward_dequantizes_without_keeping_a_copy(ckpt):
    """QLoRA: the gradient of the adapter through an int4 base equals the gradient through the same weights
    dequantized to fp32, and the backward keeps no float copy of any weight (saved tensors are activations)."""
    from gemma4 import kernels
    from gemma4.quant import QuantizedLinear, quantize_model

    path, _ = ckpt("e2b")
    q = gemma4.load(path, dtype="float32", device="cpu")
    quantize_model(q, 4, 32)
    f = gemma4.load(path, dtype="float32", device="cpu")
    with torch.no_grad():  # f: the dequantized weights of q, in float
        for (name, mq), (_, mf) in zip(q.language_model.named_modules(), f.language_model.named_modules()):
            if isinstance(mq, QuantizedLinear):
                mf.weight.copy_(kernels.dequantize(mq.qweight, mq.scales, 4, 32))
            elif hasattr(mq, "lookup"):
                mf.weight.copy_(kernels.dequantize(mq.qweight, mq.scales, 4, 32))
    for model in (q, f):
        adapted(model, seed=7, r=4, alpha=8, std=0.05)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(8))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_q = q(ids).float().logsumexp(-1).sum()
    loss_f = f(ids).float().logsumexp(-1).sum()
    loss_q.backward()
    loss_f.backward()
    assert abs(loss_q.item() - loss_f.item()) <= 1e-3 * abs(loss_f.item())
    for (_, a), (_, b) in zip(adapter_state_grads(q).items(), adapter_state_grads(f).items()):
        assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item() + 1e-6
    largest_weight = max(m.qweight.shape[0] * m.scales.shape[1] * 32 for m in q.modules() if hasattr(m, "qweight"))
    assert max(saved) < largest_weight  # the tied embedding / LM head [512, 64] is never saved whole


def adapter_state_grads(model):
    return {k: v for k, v in sorted(grads_in_peft_layout(model).items())}


def test_lora_linear_starts_as_the_identity_and_freezes_the_base():
    base = gemma4.model.text.Linear(8, 6)
    lora = LoRALinear.from_base(base, LoRAConfig(r=2, alpha=4))
    x = torch.randn(3, 8)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    assert not base.weight.requires_grad and lora.lora_A.requires_grad and lora.scaling == 2.0
    assert LoRALinear.from_base(base, LoRAConfig(r=4, alpha=4, rslora=True)).scaling == 2.0


@pytest.mark.parametrize("options,message", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(r=2.5), "rank r must be a positive integer"),
    (dict(alpha=-1), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(target_modules=("q_proj", "qkv_proj")), r"target module\(s\) \['qkv_proj'\] match no projection"),
    (dict(layers=(0, 99)), r"layers \[99\] do not exist"),
])
def test_bad_lora_settings(ckpt, options, message):
    path, _ = ckpt("e2b")
    model = gemma4.load(path, dtype="float32", device="cpu")
    with pytest.raises(AdapterError, match=message):
        apply_lora(model, LoRAConfig(**options))


def test_layers_and_targets_select_modules(ckpt):
    path, _ = ckpt("e2b")
    model = gemma4.load(path, dtype="float32", device="cpu")
    wrapped = apply_lora(model, LoRAConfig(target_modules=("q_proj", "k_proj"), layers=(0, 9)))
    # layer 9 is KV-shared: no k_proj to adapt
    assert sorted(wrapped) == ["language_model.layers.0.self_attn.k_proj", "language_model.layers.0.self_attn.q_proj",
                               "language_model.layers.9.self_attn.q_proj"]
    with pytest.raises(AdapterError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_bad_adapters(ckpt, tmp_path):
    """Another base's adapter, missing or corrupt files, a non-LoRA config: one clear error each; the model is
    not left half-adapted by a failed load of a corrupt file."""
    path, _ = ckpt("e2b")
    other, _ = ckpt("e4b")
    m_other = gemma4.load(other, dtype="float32", device="cpu")
    apply_lora(m_other, LoRAConfig(r=2))
    save_adapter(m_other, tmp_path / "e4b-adapter")
    cases = {"e4b-adapter": "the adapter adapts .*which this model does not have|do not fit"}
    (tmp_path / "empty").mkdir()
    cases["empty"] = "adapter_config.json is missing"
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases["corrupt"] = "not a readable safetensors file"
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (ia3 / "adapter_model.safetensors").write_bytes(b"")
    cases["ia3"] = "not a LoRA adapter"
    cases["nowhere"] = "no adapter directory"
    for name, message in cases.items():
        model = gemma4.load(path, dtype="float32", device="cpu")
        with pytest.raises(AdapterError, match=message):
            load_adapter(model, tmp_path / name)
        if name != "e4b-adapter":
            assert not lora_modules(model)


def test_save_is_atomic(ckpt, tmp_path, monkeypatch):
    """A save that fails midway leaves the previous adapter whole."""
    path, _ = ckpt("e2b")
    model = gemma4.load(path, dtype="float32", device="cpu")
    apply_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import json as json_module

    monkeypatch.setattr(json_module, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with torch.no_grad():
        lora_parameters(model)[0].add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert os.path.isfile(tmp_path / "a" / "adapter_config.json")
