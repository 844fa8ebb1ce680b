"""GGUF (issue 25): llama.cpp's layout read and written for all four shapes, Q4_0 / Q8_0 straight into our
int4 / int8 format, the file's tokenizer and chat template, and one clear error per bad file."""
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import gemma4
from gemma4.chat.template import builtin_template
from gemma4.weights.gguf import (
    GGUFError,
    GGUFModel,
    export_gguf,
    gguf_tokenizer,
    read_header,
    tokenizer_from_vocab,
)

SHAPES = ["e2b", "e4b", "26b", "31b"]

# What llama.cpp's converter (llama-cpp-python 0.3.36's convert_hf_to_gguf.py, Gemma4Model) writes for the tiny
# shapes of tests/reference.py: `gemma4.*` keys, and tensor names per layer group (`test_converter_output` checks
# these tables against the converter itself where it is at hand).
KEYS = {f"gemma4.{k}" for k in [
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.key_length_swa",
    "attention.layer_norm_rms_epsilon", "attention.shared_kv_layers", "attention.sliding_window",
    "attention.sliding_window_pattern", "attention.value_length", "attention.value_length_swa", "block_count",
    "context_length", "embedding_length", "embedding_length_per_layer_input", "feed_forward_length",
    "final_logit_softcapping", "rope.dimension_count", "rope.dimension_count_swa", "rope.freq_base",
    "rope.freq_base_swa"]}
MOE_KEYS = {"gemma4.expert_count", "gemma4.expert_feed_forward_length", "gemma4.expert_used_count"}
OTHER_KEYS = {"general.architecture", "general.file_type", "general.name", "general.quantization_version",
              "general.size_label", "general.type", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.merges", "tokenizer.ggml.model", "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens",
              "tokenizer.ggml.unknown_token_id"}
LAYER = {"attn_norm.weight", "attn_q.weight", "attn_q_norm.weight", "attn_output.weight", "post_attention_norm.weight",
         "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight",
         "layer_output_scale.weight"}
OWN_KV, V = {"attn_k.weight", "attn_k_norm.weight"}, {"attn_v.weight"}
PLE = {"inp_gate.weight", "proj.weight", "post_norm.weight"}
MOE = {"ffn_gate_inp.weight", "ffn_gate_inp.scale", "ffn_down_exps.scale", "ffn_gate_up_exps.weight",
       "ffn_down_exps.weight", "post_ffw_norm_1.weight", "pre_ffw_norm_2.weight", "post_ffw_norm_2.weight"}
LAYERS = {  # layer indices -> tensor names
    "e2b": {range(0, 6): LAYER | OWN_KV | V | PLE, range(6, 10): LAYER | PLE},
    "e4b": {range(0, 8): LAYER | OWN_KV | V | PLE, range(8, 12): LAYER | PLE},
    "26b": {(0, 1, 3, 4): LAYER | OWN_KV | V | MOE, (2, 5): LAYER | OWN_KV | MOE},  # K=V on the global layers
    "31b": {range(0, 5): LAYER | OWN_KV | V, (5,): LAYER | OWN_KV},
}
GLOBAL = {"output_norm.weight", "rope_freqs.weight", "token_embd.weight"}
GLOBAL_PLE = GLOBAL | {"per_layer_model_proj.weight", "per_layer_proj_norm.weight", "per_layer_token_embd.weight"}


def tiny_tokenizer(directory, size=512, media_ids=None):
    """Gemma 4's tokenizer cut to the tiny models' 512 ids (tokenizer.json + tokenizer_config.json), so that a
    file's vocabulary matches its embedding (and writing it takes milliseconds, not 262K tokens' seconds).
    `media_ids` {config field: id}: put the media markers (`<|image|>`, ...) at the tiny model's ids."""
    import json

    from gemma4.tokenizer import builtin_json
    from gemma4.weights.mmproj import MEDIA_TOKENS

    spec = json.loads(builtin_json())
    markers = {MEDIA_TOKENS[k]: i for k, i in (media_ids or {}).items() if k in MEDIA_TOKENS}
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size and i not in markers.values()}
    vocab.update(markers)
    for t in spec["added_tokens"]:
        if t["content"] in markers:
            t["id"] = markers[t["content"]]
        elif t["id"] in markers.values():
            t["id"] = size  # dropped below
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if all(p in vocab for p in m.split(" ", 1)) and m.replace(" ", "", 1) in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "chat_template": builtin_template("e-series"),  # control tokens, as the published file lists
                   "extra_special_tokens": [t["content"] for t in spec["added_tokens"] if t["special"]
                                            and t["content"] not in ("<bos>", "<eos>", "<pad>", "<unk>")]}, f)


@pytest.fixture(scope="session")
def model_dir(ckpt, tmp_path_factory):
    """model_dir(shape): the tiny checkpoint with a 512-token tokenizer, as a directory the converter reads."""
    import shutil

    made = {}

    def make(shape):
        if shape not in made:
            out = tmp_path_factory.mktemp("model") / f"tiny-{shape}"
            shutil.copytree(ckpt(shape)[0], out)
            tiny_tokenizer(out)
            made[shape] = str(out)
        return made[shape]

    return make


@pytest.fixture(scope="session")
def exported(model_dir, tmp_path_factory):
    """exported(shape, type) -> (GGUF path, checkpoint dir): our export of the tiny checkpoint, made once."""
    made = {}

    def make(shape, kind):
        if (shape, kind) not in made:
            path = model_dir(shape)
            out = str(tmp_path_factory.mktemp(f"gguf-{shape}") / f"{shape}-{kind}.gguf")
            model = gemma4.load(path, dtype="float32")
            export_gguf(model, out, kind, model_dir=path, chat_template=builtin_template("e-series"))
            made[shape, kind] = out, path
        return made[shape, kind]

    return make


def names_expected(shape):
    names = set(GLOBAL_PLE if shape.startswith("e") else GLOBAL)
    for layers, suffixes in LAYERS[shape].items():
        names |= {f"blk.{i}.{s}" for i in layers for s in suffixes}
    return names


@pytest.mark.parametrize("shape", SHAPES)
def test_export_layout_is_the_converters(exported, shape):
    fields, tensors = read_header(exported(shape, "f32")[0])
    named = {"general.finetune", "general.basename", "general.version"}  # from the directory's name, as theirs
    assert set(fields) - named == KEYS | OTHER_KEYS | (MOE_KEYS if shape == "26b" else set())
    assert {t.name for t in tensors} == names_expected(shape)
    kinds = {t.name: t.tensor_type for t in tensors}
    assert set(kinds.values()) == {gguf.GGMLQuantizationType.F32}
    _, q4 = read_header(exported(shape, "q4_0")[0])
    for t in q4:  # the converter's rule: norms, 1-D tensors, the router and .scale stay F32; rows not of 32: F16
        one_d = len(t.shape) == 1 or t.name.endswith("_norm.weight") or "ffn_gate_inp" in t.name \
            or not t.name.endswith(".weight")
        want = "F32" if one_d else "Q4_0" if t.shape[0] % 32 == 0 else "F16"
        assert t.tensor_type.name == want, t.name
    layers = gemma4.load(exported(shape, "f32")[1]).config.text.layers
    assert fields["gemma4.attention.sliding_window_pattern"] == [s.sliding for s in layers]


@pytest.mark.parametrize("shape", SHAPES)
def test_tensors_sit_where_llama_cpp_maps_them(exported, shape):
    """Each checkpoint tensor is written under the name gguf-py's own name map (llama.cpp's, what its converter
    uses) gives it, with its values: a round trip alone would not see two tensors swapped both ways."""
    from safetensors.torch import load_file

    path, ckpt_dir = exported(shape, "f32")
    tensors = {t.name: t for t in read_header(path)[1]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, 12)
    special = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}
    seen = {"rope_freqs.weight"}
    for key, value in load_file(os.path.join(ckpt_dir, "model.safetensors")).items():
        key = key.replace("model.language_model.", "model.")
        suffix = key.split(".", 3)[-1] if key.startswith("model.layers.") else None
        if suffix in special:
            name = f"blk.{key.split('.')[2]}.{special[suffix]}"
        else:
            base = key if key.endswith(".weight") else key + ".weight"
            name = names.get_name(base, try_suffixes=(".weight",))
            name = name + ".weight" if name and not name.endswith(".weight") else name
        assert name in tensors, key
        assert np.array_equal(tensors[name].data.reshape(value.shape), value.float().numpy()), key
        seen.add(name)
    assert seen == set(tensors)


def dequantized_reference(ckpt_dir, gguf_path):
    """The safetensors model with every tensor replaced by gguf.quants' dequantization of the file's."""
    model = gemma4.load(ckpt_dir, dtype="float32")
    state = model.state_dict()
    for name, t in GGUFModel(gguf_path).our_tensors():
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        state[name].copy_(torch.from_numpy(w).view(state[name].shape))
    model.language_model.ple_rows = None  # the (replaced) table, not the file
    return model


def greedy(model, ids, n=6):
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_gguf_logits(exported, no_kernels, shape, kind):
    """F32: the safetensors model's logits; Q8_0 / Q4_0: those of the dequantized weights (without our kernels,
    whose few-row products round activations to int8 as llama.cpp's do), greedy tokens the same."""
    path, ckpt_dir = exported(shape, kind)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    model = gemma4.load(path, dtype="float32")
    with torch.no_grad():
        got = model(ids)
    ref = dequantized_reference(ckpt_dir, path)
    with torch.no_grad():
        want = ref(ids)
    assert (got - want).abs().max() <= 1e-5
    assert greedy(model, ids) == greedy(ref, ids)
    if kind == "f32":
        with torch.no_grad():
            assert (got - gemma4.load(ckpt_dir, dtype="float32")(ids)).abs().max() <= 1e-5
    else:  # Q4_0 / Q8_0 in our format, not dequantized at load
        assert model.quantization["bits"] == {"q8_0": 8, "q4_0": 4}[kind]
        assert type(model.language_model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


def test_q4_0_written_again_unchanged(exported, tmp_path):
    """A Q4_0 file loaded (our int4 at group 32) and exported as q4_0: the same blocks, no float round trip."""
    path, ckpt_dir = exported("e2b", "q4_0")
    model = gemma4.load(path, dtype="float32")
    out = str(tmp_path / "again.gguf")
    export_gguf(model, out, "q4_0", model_dir=ckpt_dir, chat_template=builtin_template("e-series"))
    a, b = read_header(path)[1], {t.name: t for t in read_header(out)[1]}
    for t in a:
        assert t.tensor_type == b[t.name].tensor_type and np.array_equal(t.data, b[t.name].data), t.name


def test_header_reader_matches_gguf_reader(tmp_path):
    """read_header gives what gguf.GGUFReader gives: every value type, and tensors of each type we read."""
    path = str(tmp_path / "x.gguf")
    w = gguf.GGUFWriter(path, "gemma4")
    w.add_uint32("a.u32", 7)
    w.add_int32("a.i32", -3)
    w.add_float32("a.f32", 0.25)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "héllo")
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.strs", ["x", "yz", ""])
    w.add_array("a.bools", [True, False])
    g = np.random.default_rng(0)
    data = g.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("f32", data)
    w.add_tensor("f16", data.astype(np.float16))
    for kind in ("Q8_0", "Q4_0", "BF16"):
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(kind, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.add_tensor("Q6_K", g.integers(0, 256, (4, 210), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fields, tensors = read_header(path)
    reader = gguf.GGUFReader(path)
    assert fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for ours, theirs in zip(tensors, reader.tensors, strict=True):
        assert (ours.name, ours.tensor_type, list(ours.shape), ours.data_offset, ours.n_bytes) == \
               (theirs.name, theirs.tensor_type, list(theirs.shape), theirs.data_offset, theirs.n_bytes)
        assert np.array_equal(ours.data, theirs.data)


def test_llm_on_gguf(exported):
    """gemma4.LLM and the CLI take a .gguf: the file's tokenizer and chat template, the same greedy tokens."""
    path, ckpt_dir = exported("e4b", "f32")
    a, b = gemma4.LLM(path, dtype="float32"), gemma4.LLM(ckpt_dir, dtype="float32")
    prompt = [[2, 17, 99, 5]]
    assert a.generate(prompt, 8, temperature=0.0)[0].token_ids == b.generate(prompt, 8, temperature=0.0)[0].token_ids
    assert a.chat_template == builtin_template("e-series")
    from gemma4.tokenizer import load_tokenizer

    text = "<start_of_turn>user\nHello <b>world</b><end_of_turn>"
    assert a.tokenizer.vocab_size == 512 and a.tokenizer.encode(text) == load_tokenizer(ckpt_dir).encode(text)
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "info", "--model", path],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "12: 10 sliding" in out.stdout


def vocab_file(path):
    """A vocab-only GGUF, its tokenizer written as llama.cpp's converter writes Gemma 4's."""
    import tempfile

    from gemma4.tokenizer import builtin_json
    from gemma4.weights.gguf import _write_vocab

    w = gguf.GGUFWriter(path, "gemma4")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "tokenizer.json"), "wb") as f:
            f.write(builtin_json())
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            f.write('{"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}')
        _write_vocab(w, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SHARED_VOCAB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "gemma4", "tokenizer",
                            "ggml-vocab-gemma-4.gguf")


@pytest.mark.parametrize("source", ["converter-layout", "llama.cpp's vocab file"])
def test_tokenizer_from_gguf(tmp_path, source):
    """The file's vocabulary rebuilt as a tokenizer passes llama.cpp's own test vectors for Gemma 4."""
    from pathlib import Path

    from gemma4.tokenizer import load_tokenizer

    if source == "converter-layout":
        path = str(tmp_path / "vocab.gguf")
        vocab_file(path)
    else:
        path = SHARED_VOCAB
        if not os.path.isfile(path):
            pytest.skip("llama.cpp's ggml-vocab-gemma-4.gguf is not beside this checkout")
    assert gguf_tokenizer(path) is load_tokenizer()  # the published vocabulary: the built-in tokenizer
    fields = read_header(path)[0]
    tok = tokenizer_from_vocab(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"],
                               fields["tokenizer.ggml.token_type"])
    data = Path(__file__).parent / "data"
    inputs = (data / "vocab-tests.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (data / "vocab-tests.out").read_text(encoding="utf-8").split("\n")[: len(inputs)]
    for text, ids in zip(inputs, outputs, strict=True):
        assert tok.encode(text) == [int(x) for x in ids.split()], text
    chat = "<start_of_turn>user\nhi<|channel>x<channel|><end_of_turn> <|tool_call>call:f{}<tool_call|>"
    assert tok.encode(chat) == load_tokenizer().encode(chat)


def copy_with(src, dst, cut=None, patch=None):
    raw = bytearray(open(src, "rb").read())
    if patch:
        patch(raw)
    with open(dst, "wb") as f:
        f.write(raw[:cut] if cut else raw)
    return dst


def test_bad_gguf_files(exported, tmp_path):
    path, _ = exported("31b", "f32")
    other = str(tmp_path / "llama.gguf")
    w = gguf.GGUFWriter(other, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def int16_type(raw):  # retype blk.0.attn_q.weight (F32) as I16 of the same shape
        name = b"blk.0.attn_q.weight"
        at = raw.index(name) + len(name)
        n_dims = int.from_bytes(raw[at:at + 4], "little")
        at += 4 + 8 * n_dims
        raw[at:at + 4] = int(gguf.GGMLQuantizationType.I32).to_bytes(4, "little")

    cases = {
        "architecture 'llama', not Gemma 4": other,
        "truncated": copy_with(path, str(tmp_path / "cut.gguf"), cut=os.path.getsize(path) * 3 // 4),
        "not a GGUF file": copy_with(path, str(tmp_path / "zero.gguf"), patch=lambda r: r.__setitem__(
            slice(0, 4), b"\0\0\0\0")),
        "type I32, which gemma4 cannot read": copy_with(path, str(tmp_path / "i32.gguf"), patch=int16_type),
    }
    for message, bad in cases.items():
        with pytest.raises(GGUFError, match=message):
            gemma4.load(bad)
        out = subprocess.run([sys.executable, "-m", "gemma4.cli", "generate", "hi", "--model", bad],
                             capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ValueError, match="no mmproj GGUF beside it"):
        gemma4.load(path, media=True)


def test_export_errors_leave_nothing(exported, tmp_path, monkeypatch):
    from gemma4.weights import gguf as gguf_module

    path, ckpt_dir = exported("31b", "f32")
    model = gemma4.load(path)
    with pytest.raises(ValueError, match="GGUF type must be one of"):
        export_gguf(model, str(tmp_path / "x.gguf"), "q5_k")
    monkeypatch.setattr(gguf_module, "_tensor_bytes", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, str(tmp_path / "y.gguf"), "f16")
    assert os.listdir(tmp_path) == []
    out = subprocess.run([sys.executable, "-m", "gemma4.cli", "export", "--model", ckpt_dir, "--gguf", path],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "exists" in out.stderr and "Traceback" not in out.stderr


LLAMA_SRC = os.path.join(os.environ.get("LLAMA_DIR", "/tmp/llama"), "llama_cpp_python-0.3.36", "vendor", "llama.cpp")


@pytest.mark.parametrize("shape", SHAPES)
def test_converter_output(model_dir, tmp_path, shape):
    """Where llama.cpp's converter is at hand (`../shared/tools/llama_cpp.sh build` unpacks it), its F32 and Q8_0
    files equal ours: every key and value (but general.name, from the directory's name), tensor and byte."""
    if not os.path.isfile(os.path.join(LLAMA_SRC, "convert_hf_to_gguf.py")):
        pytest.skip("llama.cpp's converter is not unpacked (LLAMA_DIR)")
    model_dir = model_dir(shape)
    for kind in ("f32", "q8_0"):
        theirs = str(tmp_path / f"theirs-{kind}.gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_SRC, "gguf-py"))
        subprocess.run([sys.executable, os.path.join(LLAMA_SRC, "convert_hf_to_gguf.py"), model_dir,
                        "--outtype", kind, "--outfile", theirs], check=True, capture_output=True, env=env)
        ours = str(tmp_path / f"ours-{kind}.gguf")
        export_gguf(gemma4.load(model_dir, dtype="float32"), ours, kind, model_dir=model_dir,
                    chat_template=builtin_template("e-series"))
        (fa, ta), (fb, tb) = read_header(theirs), read_header(ours)
        fa.pop("general.name"), fb.pop("general.name")
        assert fa == fb
        assert sorted((t.name, t.tensor_type) for t in ta) == sorted((t.name, t.tensor_type) for t in tb)
        tb = {t.name: t for t in tb}
        for t in ta:
            assert np.array_equal(t.data, tb[t.name].data), t.name
