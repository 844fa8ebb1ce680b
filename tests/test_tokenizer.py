"""Tests for gemma4.tokenizer: llama.cpp's Gemma 4 vectors, special tokens, round trips, streaming, errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
GGUF = ROOT.parent / "shared" / "gemma4" / "tokenizer" / "ggml-vocab-gemma-4.gguf"  # dev/CI machines only

from gemma4.tokenizer import StreamDecoder, Tokenizer, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


# --- llama.cpp's test vectors (models/ggml-vocab-gemma-4.gguf.inp/.out), tokenized without BOS -----------------


def _vectors() -> list[tuple[str, list[int]]]:
    inputs = (DATA / "vocab-tests.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (DATA / "vocab-tests.out").read_text(encoding="utf-8").split("\n")[: len(inputs)]
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inputs, outputs, strict=True)]


VECTORS = _vectors()


def test_vector_file_count():
    assert len(VECTORS) == 46


@pytest.mark.parametrize("text,ids", VECTORS, ids=[f"{i:02d}:{t[:20]!r}" for i, (t, _) in enumerate(VECTORS)])
def test_llama_cpp_vectors(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


# --- special tokens (FORMAT.md §1) ------------------------------------------------------------------------------

SPECIAL_TOKENS = [
    (0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>"), (4, "<mask>"),
    (46, "<|tool>"), (47, "<tool|>"), (48, "<|tool_call>"), (49, "<tool_call|>"),
    (50, "<|tool_response>"), (51, "<tool_response|>"), (52, '<|"|>'), (98, "<|think|>"),
    (100, "<|channel>"), (101, "<channel|>"), (105, "<|turn>"), (106, "<turn|>"),
    (255999, "<|image>"), (256000, "<|audio>"), (258880, "<|image|>"), (258881, "<|audio|>"),
    (258882, "<image|>"), (258883, "<audio|>"), (258884, "<|video|>"),
]  # fmt: skip


@pytest.mark.parametrize("token_id,text", SPECIAL_TOKENS, ids=[t for _, t in SPECIAL_TOKENS])
def test_special_token_is_one_id_anywhere(tok, token_id, text):
    assert tok.token_to_id(text) == token_id
    assert tok.id_to_token(token_id) == text
    assert tok.encode(text) == [token_id]
    # Glued to words on both sides, and after a space: still one id, and the neighbours are unaffected.
    assert tok.encode(f"Hi{text}Hi") == [10979, token_id, 10979]
    assert tok.encode(f"a {text}\n") == [236746, 236743, token_id, 107]


PLAIN_TOKENS = [(107, "\n"), (108, "\n\n"), (109, "\n\n\n"), (2364, "user"), (4368, "model"), (9731, "system"),
                (45518, "thought"), (5, "[multimodal]")]  # fmt: skip


@pytest.mark.parametrize("token_id,text", PLAIN_TOKENS, ids=[repr(t) for _, t in PLAIN_TOKENS])
def test_plain_token_ids(tok, token_id, text):
    assert tok.token_to_id(text) == token_id
    if text != "[multimodal]":  # a NORMAL token that BPE never produces from text
        assert tok.encode(text) == [token_id]


PROMPTS = [
    ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n", [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]),
    (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nWhat's 2+2?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>4<turn|>\n",
        [2, 105, 9731, 107, 98, 107, 3912, 8652, 236761, 106, 107, 105, 2364, 107, 3689, 236789, 236751, 236743,
         236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107, 100, 45518, 107, 101, 236812, 106, 107],
    ),
    (
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>London<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>12°C<|"|>}<tool_response|>',
        [105, 4368, 107, 48, 6639, 236787, 828, 236779, 19323, 236782, 13319, 236787, 52, 27822, 52, 236783, 49,
         50, 6275, 236787, 828, 236779, 19323, 236782, 2394, 236787, 52, 236770, 236778, 237366, 236780, 52,
         236783, 51],
    ),
    (
        '<|turn>system\n<|tool>declaration:f{parameters:{type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n',
        [105, 9731, 107, 46, 163688, 236787, 236760, 236782, 19031, 29616, 2084, 236787, 52, 60688, 52, 1807, 47,
         106, 107],
    ),
    (
        "<|turn>user\n<|image><|image|><|image|><image|><|audio><|audio|><audio|><|video|>Describe.<turn|>\n",
        [105, 2364, 107, 255999, 258880, 258880, 258882, 256000, 258881, 258883, 258884, 82858, 236761, 106, 107],
    ),
]  # fmt: skip


@pytest.mark.parametrize("text,ids", PROMPTS, ids=range(len(PROMPTS)))
def test_rendered_prompts(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_add_bos_and_constants(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (262144, 2, 1, 0)
    assert tok.encode("Hi") == [10979]
    assert tok.encode("Hi", add_bos=True) == [2, 10979]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [2]


SKIP_SPECIAL = [
    ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n", "user\nHi\nmodel\n"),
    ("<|channel>thought\nhmm<channel|>Yes.<turn|>", "thought\nhmmYes."),
    ('<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|><eos>', "call:f{a:x}"),
    ("<|image><|image|><image|>pic", "pic"),
]


@pytest.mark.parametrize("text,expected", SKIP_SPECIAL, ids=range(len(SKIP_SPECIAL)))
def test_decode_skip_special_tokens(tok, text, expected):
    # All 24 control/user-defined tokens are special, as in the published tokenizer.json.
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == expected


# --- round trips ------------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  two  spaces   three    four",
    "\ttabs\t\tand\r\nCRLF\n",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",  # 40 newlines
    " " * 50,
    "Äpfel, Größe, ñandú, Cửa Việt, naïve café",
    "нещо на Български; Ελληνικά; עברית; العربية; हिन्दी",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어 텍스트",
    "🦙🚀😁 😶\u200d🌫️ 👩🏽\u200d💻 🇫🇷 ✅",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff \x00\x01\x7f control chars \u200b\ufeff",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\nif __name__ == \"__main__\":\n\tf(1)\n",
    '<html><body class="x">&nbsp;</body></html>',
    "<unused5> <mask > <|turn <turn|>> <<bos>>",
    "3.14159 1e-10 -42 0x7fff 1,000,000",
]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_literal_metaspace_decodes_as_space(tok):
    # SentencePiece's space marker in the input is indistinguishable from an escaped space (same as HF).
    assert tok.encode("a\u2581b") == tok.encode("a b") == [236746, 518]
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


# --- streaming decode -------------------------------------------------------------------------------------------


def test_stream_emoji_split_into_bytes(tok):
    ids = tok.encode("🦙")
    assert [tok.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    stream = tok.decode_stream()
    assert isinstance(stream, StreamDecoder)
    assert [stream.step(i) for i in ids] == ["", "", "", "🦙"]


STREAM_TEXTS = [
    " this is 🦙.cpp",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🦙🦙 and \U0010ffff!",
    "<bos><|turn>model\nHello,  world!\n\n<|tool_call>call:f{}<tool_call|><turn|>",
    "日本語 🚀😶\u200d🌫️ Cửa Việt\n\t end",
]


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=range(len(STREAM_TEXTS)))
@pytest.mark.parametrize("skip", [False, True], ids=["keep", "skip"])
def test_stream_equals_full_decode(tok, text, skip):
    ids = tok.encode(text)
    stream = tok.decode_stream(skip_special_tokens=skip)
    pieces = [stream.step(i) for i in ids]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"bytes", None, 123, ["a"]], ids=["bytes", "None", "int", "list"])
def test_encode_rejects_non_str(tok, bad):
    with pytest.raises(TypeError, match="encode\\(\\) expects str"):
        tok.encode(bad)


@pytest.mark.parametrize("bad_id", [262144, -1, 10**12], ids=str)
def test_decode_rejects_out_of_range(tok, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} out of range"):
        tok.decode([2, bad_id])
    with pytest.raises(ValueError, match=f"token id {bad_id} out of range"):
        tok.id_to_token(bad_id)
    with pytest.raises(ValueError, match=f"token id {bad_id} out of range"):
        tok.decode_stream().step(bad_id)


@pytest.mark.parametrize("bad", [[1.5], ["2"], "abc", 7], ids=["float", "str-id", "str", "int"])
def test_decode_rejects_non_ids(tok, bad):
    with pytest.raises(TypeError):
        tok.decode(bad)


def test_token_to_id_unknown(tok):
    assert tok.token_to_id("definitely-not-a-token") is None


# --- loading ----------------------------------------------------------------------------------------------------


def _tiny_tokenizer_json(tokens=("<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab")) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [("a", "b")] if "ab" in vocab else []
    return HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>")).to_str()


def test_builtin_is_cached(tok):
    assert load_tokenizer() is tok


def test_load_checkpoint_dir_and_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_tiny_tokenizer_json(), encoding="utf-8")
    for path in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        t = load_tokenizer(path)
        assert (t.vocab_size, t.bos_id, t.encode("abab", add_bos=True)) == (7, 2, [2, 6, 6])


def test_load_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist.*nope"):
        load_tokenizer(missing)


def test_load_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tokenizer.json in checkpoint directory {tmp_path}")):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "not a valid tokenizer.json"), (None, "not a Gemma tokenizer: no <bos>")],
    ids=["garbage", "no-bos"],
)
def test_load_invalid_file(tmp_path, content, message):
    file = tmp_path / "tokenizer.json"
    file.write_text(content or _tiny_tokenizer_json(("<pad>", "<eos>", "<unk>", "a")), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        load_tokenizer(file)
    assert str(file) in str(err.value)


# --- against the GGUF and transformers' conversion of it (dev/CI only) -------------------------------------------


@pytest.fixture(scope="module")
def gguf_vocab():
    """transformers' reading of the GGUF: (architecture, tokenizer dict). Much faster than gguf.GGUFReader."""
    pytest.importorskip("transformers")
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} not available")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

    architecture, vocab, _ = get_gguf_tokenizer(str(GGUF))
    return architecture, vocab


def _parts(backend) -> dict:
    """The pipeline as serialized bytes (model = vocab + merges + options); comparing bytes avoids JSON parsing."""
    parts = {
        name: getattr(backend, name).__getstate__() for name in ("normalizer", "pre_tokenizer", "decoder", "model")
    }
    parts["added"] = {i: (t.content, t.special, t.normalized) for i, t in backend.get_added_tokens_decoder().items()}
    return parts


def test_matches_transformers_gguf_conversion(tok, gguf_vocab):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    ref, _ = convert_gguf_tokenizer(*gguf_vocab)
    ours, theirs = _parts(tok.backend), _parts(ref)
    # transformers marks the 7 USER_DEFINED tokens non-special; Google's conversion (and we) mark them special.
    assert {i for i, (_, special, _) in theirs["added"].items() if not special} == {48, 49, 50, 51, 52, 100, 101}
    theirs["added"] = {i: (content, True, normalized) for i, (content, _, normalized) in theirs["added"].items()}
    assert ours == theirs
    texts = [t for t, _ in VECTORS] + [t for t, _ in PROMPTS] + ROUND_TRIP
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_shipped_file_matches_build_script(tok, gguf_vocab):
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "tools" / "build_tokenizer.py")
    build_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_tokenizer)
    _, vocab = gguf_vocab
    tokens, types, merges = vocab["tokens"], vocab["token_type"], vocab["merges"]
    build_tokenizer.check_vocab(tokens, types, merges)
    built = build_tokenizer.build(tokens, types, merges)
    assert built.to_str() == tok.backend.to_str()  # tok is the shipped data file


def test_stream_survives_invalid_byte_sequences():
    """Sampled models emit byte tokens that never form valid UTF-8 (a lone continuation byte, a lead byte
    followed by a word): streaming must not fail, and must go on emitting the text of ordinary tokens.
    (It need not equal the full decode there: tokenizers replaces an invalid byte run, ASCII bytes in it
    included, depending on where the run starts.)"""
    import random

    tok = load_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.choice([rng.randrange(238, 494), rng.randrange(494, 262144)]) for _ in range(40)] + [1596]
        stream = tok.decode_stream()
        for i in ids[:-1]:
            assert isinstance(stream.step(i), str)
        assert stream.step(ids[-1]).endswith(tok.decode([ids[-1]]))
