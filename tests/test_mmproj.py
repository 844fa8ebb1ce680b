"""The vision / audio towers of a GGUF model: llama.cpp's `mmproj` GGUF read (beside the model, or given) and
written in its converter's layout; media through a GGUF model equal media through the checkpoint."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference
import torch
from test_audio import tone
from test_gguf import LLAMA_SRC, copy_with, tiny_tokenizer
from test_vision import assert_close, image

import gemma4
from gemma4 import media
from gemma4.chat.template import builtin_template
from gemma4.weights.gguf import GGUFError, export_gguf, read_header
from gemma4.weights.mmproj import export_mmproj

# edge: E2B's layout (clipped linears, PLE, causal images) with an audio tower; large: 31B's (standardised
# output, grouped KV heads, bidirectional images), vision only.
VARIANTS = {"edge": ("e2b", reference.VISION_EDGE, reference.AUDIO_RUN),
            "large": ("31b", reference.VISION_LARGE, None)}




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(variant) -> (checkpoint dir, its model, folder holding model-f32.gguf and mmproj-f32.gguf)."""
    made = {}

    def get(variant):
        if variant not in made:
            shape, vision, audio = VARIANTS[variant]
            ckpt = str(tmp_path_factory.mktemp(f"mm-{variant}") / f"tiny-{shape}")
            reference.build_media(shape, ckpt, vision=vision, audio=audio)
            tiny_tokenizer(ckpt, media_ids=reference.MEDIA_TOKENS)
            with open(os.path.join(ckpt, "processor_config.json"), "w") as f:  # what the converter reads
                json.dump({"image_processor": {"image_mean": [0.0] * 3, "image_std": [1.0] * 3}}, f)
            model = gemma4.load(ckpt, dtype="float32", device="cpu")
            folder = str(tmp_path_factory.mktemp(f"gguf-{variant}"))
            export_gguf(model, os.path.join(folder, "model-f32.gguf"), "f32", model_dir=ckpt,
                        chat_template=builtin_template("e-series"))
            export_mmproj(model, os.path.join(folder, "mmproj-f32.gguf"), "f32", model_dir=ckpt)
            made[variant] = ckpt, model, folder
        return made[variant]

    return get


def media_items(variant):
    items = [media.preprocess_image(image(60, 90, 3), 70), media.preprocess_image(image(150, 40, 4), 70)]
    if variant == "edge":
        items.append(media.preprocess_audio(tone(0.8, 500)))
    return items


def prompt(model, items):
    """text, then each item's soft tokens between its delimiters, then text (ids in the tiny vocabulary)."""
    t = model.config.token_ids
    ids = [2, 105, 30, 31]
    for it, soft in zip(items, [model.encode_media([it]) for it in items], strict=True):
        kind = "audio" if isinstance(it, media.AudioInput) else "image"
        start, end = (t["boa_token_id"], t["eoa_token_index"]) if kind == "audio" else (t["boi_token_id"],
                                                                                     t["eoi_token_id"])
        ids += [start] + [t[f"{kind}_token_id"]] * soft.shape[0] + [end] + [40, 41]
    return torch.tensor([ids + list(range(50, 60))])


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_towers_from_mmproj_equal_the_checkpoints(built, variant):
    """The GGUF model finds the mmproj beside it: same tower configs, token ids and attention rule as the
    checkpoint, the same soft tokens and logits (<= 1e-5; in practice exact but for the audio softplus round trip)."""
    _, ours, folder = built(variant)
    model = gemma4.load(os.path.join(folder, "model-f32.gguf"), dtype="float32", device="cpu")
    assert model.mmproj == os.path.join(folder, "mmproj-f32.gguf")
    assert model.config.token_ids == {k: v for k, v in ours.config.token_ids.items() if k != "eoa_token_id"}
    assert model.config.text.bidirectional == ours.config.text.bidirectional == \
        ("vision" if variant == "large" else None)
    for tower in ("vision_tower", "audio_tower"):
        assert hasattr(model, tower) == hasattr(ours, tower) == (tower == "vision_tower" or variant == "edge")
        if hasattr(ours, tower):  # every field the tower reads (not the reference's training-only ones)
            mine, theirs = getattr(model, tower).settings, getattr(ours, tower).settings
            assert mine == {k: theirs[k] for k in mine}
    items = media_items(variant)
    ids = prompt(ours, items)
    with torch.no_grad():
        for item in items:
            assert_close(model.encode_media([item]), ours.encode_media([item]), 1e-6)
        assert_close(model(ids, media=model.encode_media(items)), ours(ids, media=ours.encode_media(items)), 1e-5)


def test_chat_with_an_image_on_a_gguf_model(built):
    """LLM on the GGUF (mmproj found beside it): the same greedy answer to an image as on the checkpoint."""
    ckpt, _, folder = built("edge")
    buf = io.BytesIO()
    image(60, 90, 5).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "a b c"}]}]
    answers = []
    for path in (ckpt, os.path.join(folder, "model-f32.gguf")):
        llm = gemma4.LLM(path, dtype="float32", device="cpu")
        answers.append(llm.chat(messages, max_new_tokens=6, image_budget=70, temperature=0).text)
    assert answers[0] == answers[1] and answers[0]


def test_mmproj_given_or_left_out(built, tmp_path):
    _, ours, folder = built("large")
    alone = str(tmp_path / "model.gguf")
    shutil.copy(os.path.join(folder, "model-f32.gguf"), alone)
    assert not hasattr(gemma4.load(alone, dtype="float32"), "vision_tower")  # nothing beside it: text only
    given = gemma4.load(alone, dtype="float32", mmproj=os.path.join(folder, "mmproj-f32.gguf"))
    assert given.vision_tower.settings["hidden_size"] == ours.vision_tower.settings["hidden_size"]
    beside = os.path.join(folder, "model-f32.gguf")
    assert not hasattr(gemma4.load(beside, dtype="float32", media=False), "vision_tower")
    with pytest.raises(GGUFError, match="no mmproj"):
        gemma4.load(alone, media=True)


def mmproj_with(src, dst, key, value):
    """A copy of an mmproj whose metadata `key` holds another uint32 `value`."""
    def patch(raw):
        k = key.encode()
        at = raw.index(len(k).to_bytes(8, "little") + k) + 8 + len(k)
        assert int.from_bytes(raw[at:at + 4], "little") == 4  # UINT32
        raw[at + 4:at + 8] = value.to_bytes(4, "little")
    return copy_with(src, dst, patch=patch)


def test_bad_mmproj_files(built, tmp_path):
    """One clear error each, through the CLI too (no traceback)."""
    ckpt, _, folder = built("edge")
    model, mm = os.path.join(folder, "model-f32.gguf"), os.path.join(folder, "mmproj-f32.gguf")
    narrow = mmproj_with(mm, str(tmp_path / "mmproj-narrow.gguf"), "clip.vision.projection_dim", 32)
    text_vocab = str(tmp_path / "plain")  # a model whose vocabulary has no media markers
    os.mkdir(text_vocab)
    plain = gemma4.load(ckpt, dtype="float32", media=False)
    tiny_tokenizer(text_vocab)
    export_gguf(plain, os.path.join(text_vocab, "model.gguf"), "f32", model_dir=text_vocab)
    cases = [
        (dict(mmproj=narrow), "projects to width 32, but the model's is 64"),
        (dict(mmproj=model), "not an mmproj file"),  # the model file itself
        (dict(mmproj=copy_with(mm, str(tmp_path / "cut.gguf"), cut=os.path.getsize(mm) - 100)), "truncated"),
        (dict(mmproj=str(tmp_path / "none.gguf")), "No such file"),
    ]
    for kwargs, message in cases:
        with pytest.raises((GGUFError, OSError), match=message):
            gemma4.load(model, dtype="float32", **kwargs)
    with pytest.raises(GGUFError, match="vocabulary has no <|image>"):
        gemma4.load(os.path.join(text_vocab, "model.gguf"), mmproj=mm)
    with pytest.raises(ValueError, match="mmproj= is for GGUF models"):
        gemma4.load(ckpt, mmproj=mm)
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "chat", "--model", model, "--mmproj", narrow],
                         input="/quit\n", capture_output=True, text=True)
    assert out.returncode != 0 and "projects to width 32" in out.stderr and "Traceback" not in out.stderr


def test_export_mmproj_cli(built, ckpt, tmp_path):
    """`gemma4 export --mmproj`: q4_0 writes its towers f16 (as Q4_0 models ship them); a model without towers
    is a clear error."""
    source, ours, _ = built("edge")
    gg, mm = str(tmp_path / "m.gguf"), str(tmp_path / "mmproj-m.gguf")
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "export", "--model", source, "--gguf", gg, "--type",
                          "q4_0", "--mmproj", mm], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fields, tensors = read_header(mm)
    assert fields["general.file_type"] == 1 and {t.tensor_type.name for t in tensors} == {"F16", "F32"}
    model = gemma4.load(gg, dtype="float32")  # the mmproj beside it, f16: close to the f32 towers
    item = media_items("edge")[0]
    with torch.no_grad():
        assert_close(model.encode_media([item]), ours.encode_media([item]), 3e-3)
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "export", "--model", ckpt("e2b")[0], "--gguf",
                          str(tmp_path / "t.gguf"), "--mmproj", str(tmp_path / "mmproj-t.gguf")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no vision or audio tower" in out.stderr and "Traceback" not in out.stderr


def test_hub_gguf_repo_with_quant(built, tmp_path, monkeypatch):
    """`owner/name:Q8_0` (llama.cpp's -hf form) picks that quant's file of a GGUF repository in the hub cache,
    and the mmproj beside it."""
    _, _, folder = built("large")
    snap = tmp_path / "hub" / "models--someone--tiny-GGUF" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for n in ("tiny-Q8_0.gguf", "tiny-F32.gguf"):
        shutil.copy(os.path.join(folder, "model-f32.gguf"), snap / n)
    shutil.copy(os.path.join(folder, "mmproj-f32.gguf"), snap / "mmproj-tiny-f16.gguf")
    (tmp_path / "hub" / "models--someone--tiny-GGUF" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-GGUF" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = gemma4.load("someone/tiny-GGUF:q8_0", dtype="float32")
    assert os.path.basename(model.gguf.path) == "tiny-Q8_0.gguf" and hasattr(model, "vision_tower")
    with pytest.raises(FileNotFoundError, match="no GGUF file ending in Q4_K_M.gguf"):
        gemma4.load("someone/tiny-GGUF:Q4_K_M")


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_converter_mmproj_output(built, tmp_path, kind):
    """Where llama.cpp's converter is at hand: its `--mmproj` file equals ours, key for key and byte for byte."""
    if not os.path.isfile(os.path.join(LLAMA_SRC, "convert_hf_to_gguf.py")):
        pytest.skip("llama.cpp's converter is not unpacked (LLAMA_DIR)")
    for variant in VARIANTS:
        ckpt, model, _ = built(variant)
        theirs, ours = str(tmp_path / f"theirs-{variant}.gguf"), str(tmp_path / f"ours-{variant}.gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_SRC, "gguf-py"))
        subprocess.run([sys.executable, os.path.join(LLAMA_SRC, "convert_hf_to_gguf.py"), ckpt, "--mmproj",
                        "--outtype", kind, "--outfile", theirs], check=True, capture_output=True, env=env)
        export_mmproj(model, ours, kind, model_dir=ckpt)
        (fa, ta), (fb, tb) = read_header(theirs), read_header(ours)
        assert fa == fb
        assert sorted((t.name, t.tensor_type) for t in ta) == sorted((t.name, t.tensor_type) for t in tb)
        tb = {t.name: t for t in tb}
        for t in ta:
            assert np.array_equal(t.data, tb[t.name].data), t.name


def converter_name(ours: str) -> str:
    """Where llama.cpp's converter puts a tower tensor: Gemma4VisionAudioModel.modify_tensors' renames, then
    gguf-py's own name map (the converter's)."""
    import gguf

    name = "model." + ours
    if "audio_tower" in name or "embed_audio" in name:
        name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
        name += ".weight" if name.endswith("per_dim_scale") else ""
    else:
        name = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
        name += ".weight" if name.endswith(("layer_scalar", "position_embedding_table")) else ""
    suffixes = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 128).get_name(name, try_suffixes=suffixes)


@pytest.mark.parametrize("variant", ["edge", "large"])
def test_tower_tensors_sit_where_llama_cpp_maps_them(built, variant):
    """Every tower tensor is written under the converter's name with the converter's values (a swap of two names
    in our tables, applied both ways, passes every round trip and fails here)."""
    import torch.nn.functional as F

    from gemma4.weights.gguf import float_tensor

    _, ours, folder = built(variant)
    tensors = {t.name: t for t in read_header(os.path.join(folder, "mmproj-f32.gguf"))[1]}
    state = {k: v for k, v in ours.state_dict().items()
             if k.startswith(("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio."))}
    assert len(tensors) == len(state)
    for name, t in state.items():
        stored = float_tensor(tensors[converter_name(name)], torch.float32)
        expect = F.softplus(t) if name.endswith("per_dim_scale") else t  # the converter's own changes
        if name.endswith("patch_embedder.input_proj.weight"):
            expect = t.reshape(t.shape[0], 16, 16, 3).permute(0, 3, 1, 2)
        assert torch.equal(stored.reshape(expect.shape), expect), name
