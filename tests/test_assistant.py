"""The MTP drafters (model/assistant.py) against the reference's Gemma4AssistantForCausalLM, given the same
target states: the drafter logits and the hidden state it passes to its next step."""
import json
import os

import pytest
import torch

from gemma4.config import ConfigError
from gemma4.model.assistant import TARGET, parse_assistant_config
from gemma4.weights import CheckpointError, load_assistant

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")  # the published configs (copied)

# (name, backbone width, centroid head, head dims sliding / full, KV heads): E2B's drafter (centroids), 31B's
# (full LM head, 2 KV heads)
CASES = [("e2b", 48, True, 16, 32, 1), ("31b", 64, False, 16, 32, 2)]
WINDOW, VOCAB = 8, 512


def tiny_drafter(out: str, backbone: int, ordered: bool, head_dim: int, global_head_dim: int, kv_heads: int):
    """A reference drafter with random weights (norms and scalars too), saved as a checkpoint."""
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
                layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=WINDOW,
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
                final_logit_softcapping=None)
    cfg = transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=backbone,
                                             use_ordered_embeddings=ordered, num_centroids=16,
                                             centroid_intermediate_top_k=4)
    torch.manual_seed(backbone)
    model = transformers.Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
        for layer in model.model.layers:
            layer.layer_scalar.fill_(0.7)
        if ordered:
            model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB))
    model.save_pretrained(out)
    return model


def target_states(batch: int, keys: int, kv_heads: int, head_dim: int, global_head_dim: int, backbone: int):
    g = torch.Generator().manual_seed(keys)
    kv = {kind: (torch.randn(batch, kv_heads, keys, d, generator=g), torch.randn(batch, kv_heads, keys, d, generator=g))
          for kind, d in (("sliding_attention", head_dim), ("full_attention", global_head_dim))}
    return kv, torch.randn(batch, 1, 2 * backbone, generator=g)


@pytest.mark.parametrize("name,backbone,ordered,head_dim,global_head_dim,kv_heads", CASES)
@pytest.mark.parametrize("keys", [5, 12])  # fewer keys than the window, and more (the sliding layers see 8)
def test_drafter_matches_the_reference(tmp_path, name, backbone, ordered, head_dim, global_head_dim, kv_heads, keys):
    reference = tiny_drafter(str(tmp_path), backbone, ordered, head_dim, global_head_dim, kv_heads)
    ours = load_assistant(str(tmp_path), dtype=torch.float32, device="cpu")
    assert all(s.kv_source == TARGET for s in ours.cfg.text.layers)
    batch = 2
    kv, inputs = target_states(batch, keys, kv_heads, head_dim, global_head_dim, backbone)
    positions = torch.full((batch, 1), keys - 1)
    # The sliding layers see the keys the target's last query saw: its last WINDOW. The reference is given them
    # cropped, as a sliding cache holds them (given more, its sliding mask lets the drafter see WINDOW + 1).
    cropped = {**kv, "sliding_attention": tuple(t[:, :, -WINDOW:] for t in kv["sliding_attention"])}
    with torch.no_grad():
        expected = reference(inputs_embeds=inputs, position_ids=positions, shared_kv_states=cropped)
    window = torch.arange(keys) >= keys - WINDOW
    ours_kv = {"sliding": (*kv["sliding_attention"], window.expand(batch, 1, 1, keys)),
               "full": (*kv["full_attention"], torch.ones(batch, 1, 1, keys, dtype=torch.bool))}
    logits, hidden = ours(inputs[..., :backbone], inputs[..., backbone:], positions, ours_kv)
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.logits.argmax(-1))


def test_published_drafter_configs_parse():
    """The published drafters' configs: E2B / E4B with the centroid head, 31B with the full LM head."""
    for name, backbone, ordered in (("e2b", 1536, True), ("e4b", 2560, True), ("31b", 5376, False)):
        with open(os.path.join(CONFIGS, f"gemma-4-{name}-assistant", "config.json")) as f:
            cfg = parse_assistant_config(json.load(f))
        assert (cfg.backbone_hidden_size, cfg.use_ordered_embeddings) == (backbone, ordered)
        assert cfg.text.num_layers == 4 and all(s.kv_source == TARGET for s in cfg.text.layers)
        assert cfg.text.ple_dim == 0 and cfg.text.vocab_size == 262144


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma4_text"}, "not a Gemma 4 assistant"),
    ({"backbone_hidden_size": 0}, "backbone_hidden_size must be a positive integer"),
    ({"num_centroids": 3000}, "num_centroids=3000 must divide vocab_size"),
    ({"text_config": {"num_kv_shared_layers": 2}}, "every drafter layer attends to the target's K/V"),
    ({"text_config": {"hidden_size_per_layer_input": 256}}, "hidden_size_per_layer_input must be 0"),
])
def test_bad_drafter_configs(change, message):
    with open(os.path.join(CONFIGS, "gemma-4-e2b-assistant", "config.json")) as f:
        cfg = json.load(f)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        parse_assistant_config(cfg)


def test_drafter_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_assistant(str(tmp_path))
    tiny_drafter(str(tmp_path), 48, True, 16, 32, 1)
    from safetensors.torch import load_file, save_file

    file = os.path.join(tmp_path, "model.safetensors")
    state = load_file(file)
    state.pop("pre_projection.weight")
    save_file(state, file)
    with pytest.raises(CheckpointError, match="missing drafter tensor.*pre_projection"):
        load_assistant(str(tmp_path))


@pytest.mark.parametrize("name,backbone,ordered,head_dim,global_head_dim,kv_heads", CASES)
def test_greedy_drafts_match_the_reference_loop(tmp_path, name, backbone, ordered, head_dim, global_head_dim,
                                                kv_heads):
    """k drafts from `draft` equal transformers' assistant loop (candidate_generator: argmax, the drafter's
    hidden fed back, the position and the target's K/V held), and `top_tokens` is the argmax of the logits."""
    from gemma4.model.assistant import draft

    reference = tiny_drafter(str(tmp_path), backbone, ordered, head_dim, global_head_dim, kv_heads)
    ours = load_assistant(str(tmp_path), dtype=torch.float32, device="cpu")
    batch, keys, k = 3, 6, 5
    kv, inputs = target_states(batch, keys, kv_heads, head_dim, global_head_dim, backbone)
    table = torch.randn(VOCAB, backbone, generator=torch.Generator().manual_seed(1))

    def embed(ids):  # the target's scaled embedding
        return table[ids] * backbone ** 0.5

    positions, hidden, token = torch.full((batch, 1), keys - 1), inputs[..., backbone:], torch.tensor([3, 70, 500])
    expected, tok, h = [], token[:, None], hidden
    with torch.no_grad():
        for _ in range(k):
            out = reference(inputs_embeds=torch.cat([embed(tok), h], -1), position_ids=positions, shared_kv_states=kv)
            tok, h = out.logits.argmax(-1), out.last_hidden_state
            expected.append(tok[:, 0])
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    ours_kv = {"sliding": (*kv["sliding_attention"], mask), "full": (*kv["full_attention"], mask)}
    drafts = draft(ours, embed, token, hidden, positions, ours_kv, k)
    assert drafts.tolist() == torch.stack(expected, 1).tolist()
    h, _ = ours.step(embed(token[:, None]), hidden, positions, ours_kv)
    assert torch.equal(ours.top_tokens(h), ours.logits(h).argmax(-1))


def published(name):
    name = name if name.startswith("gemma-4-") else f"gemma-4-{name}"
    from gemma4.config import load_config

    path = os.path.join(CONFIGS, name)
    if name.endswith("assistant"):
        with open(os.path.join(path, "config.json")) as f:
            return parse_assistant_config(json.load(f))
    return load_config(path).text


@pytest.mark.parametrize("target,drafter,message", [
    ("e2b", "e2b-assistant", None),
    ("e4b", "e4b-assistant", None),
    ("31b", "31b-assistant", None),
    ("31b", "e2b-assistant", "made for a target 1536 wide; this model is 5376 wide"),
    ("e2b", "e4b-assistant", "made for a target 2560 wide; this model is 1536 wide"),
])
def test_drafter_must_match_its_target(target, drafter, message):
    from gemma4.model.assistant import check_pair

    if message is None:
        check_pair(published(target), published(drafter))
    else:
        with pytest.raises(ValueError, match=message):
            check_pair(published(target), published(drafter))


def test_drafter_heads_must_match_the_donor_layers():
    import dataclasses

    from gemma4.model.assistant import check_pair

    drafter = published("31b-assistant")
    wrong = dataclasses.replace(drafter, text=dataclasses.replace(drafter.text, layers=tuple(
        dataclasses.replace(s, num_kv_heads=8) if s.sliding else s for s in drafter.text.layers)))
    with pytest.raises(ValueError, match=r"drafter layer 0 \(sliding\) has head dim 256 and 8 KV heads; the "
                                         r"model's sliding layer \d+, whose K/V it reads, has 256 and 16"):
        check_pair(published("31b"), wrong)
