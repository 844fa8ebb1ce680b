"""Build src/gemma4/data/tokenizer.json.gz from the released Gemma 4 GGUF vocabulary.

Dev-only script (needs the `gguf` package and the vocabulary file; users of the package do not):

    python tools/build_tokenizer.py [--gguf PATH] [--out PATH]

The result is a Hugging Face `tokenizers` tokenizer.json with the same pipeline as the published Gemma 4
`tokenizer.json` (transformers' `GemmaTokenizer`, which Google's conversion script instantiates):

* normalizer   Replace(" " -> "▁")        -- SentencePiece whitespace escaping, no add_space_prefix
* pre-tokenizer Split(" ", merged_with_previous) -- kept to match GemmaTokenizer; after the normalizer no " "
                                              is left, so the whole text reaches BPE as one word
* model        BPE over the GGUF vocabulary and its 514906 merges, byte_fallback=True (<0x00>..<0xFF>),
               fuse_unk=True, unk "<unk>"
* decoder      Replace("▁" -> " "), ByteFallback, Fuse
* added tokens every CONTROL (type 3) and USER_DEFINED (type 4) token, unnormalized and special, so each
               special string maps to its one id wherever it occurs. Google's conversion registers the
               user-defined ones (<|tool_call>, <|"|>, <|channel>, ...) as `extra_special_tokens`, i.e.
               special as well (transformers' own GGUF loader marks them non-special; ids are the same).
* no post-processor: no BOS is added (the chat template writes "<bos>" itself).

llama.cpp additionally splits runs of "\\n" off before BPE. No token and no merge mixes "\\n" with any other
character (asserted below), so BPE can never merge across a newline run and that split changes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = ROOT.parent / "shared" / "gemma4" / "tokenizer" / "ggml-vocab-gemma-4.gguf"
DEFAULT_OUT = ROOT / "src" / "gemma4" / "data" / "tokenizer.json.gz"

# GGUF token types (llama.cpp `llama_token_type`).
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
VOCAB_SIZE = 262144
NUM_MERGES = 514906


def read_gguf(path: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from a GGUF vocabulary file."""
    from gguf import GGUFReader  # dev dependency only

    reader = GGUFReader(str(path))
    fields = reader.fields
    if fields["tokenizer.ggml.model"].contents() != "gemma4":
        raise ValueError(f"{path}: not a gemma4 vocabulary")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    special_ids = {
        key: fields[f"tokenizer.ggml.{key}"].contents()
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
    }
    assert special_ids == {"bos_token_id": 2, "eos_token_id": 1, "padding_token_id": 0, "unknown_token_id": 3}
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    return tokens, types, merges


def check_vocab(tokens: list[str], types: list[int], merges: list[str]) -> None:
    """The facts the pipeline relies on; fail loudly if a different vocabulary is fed in."""
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE, "vocab size / duplicate tokens"
    assert len(merges) == NUM_MERGES, len(merges)
    byte_ids = [i for i, t in enumerate(types) if t == BYTE]
    assert byte_ids == list(range(238, 494)), "byte-fallback tokens must be ids 238..493"
    assert [tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    # No real spaces in the vocabulary: merges are "left right" with exactly one separator.
    assert not any(" " in t for t in tokens)
    assert all(m.count(" ") == 1 for m in merges)
    # Newline runs never merge with anything else, so llama.cpp's "\n+" pre-split is implied by BPE.
    assert all(set(t) == {"\n"} for t in tokens if "\n" in t)


def build(tokens: list[str], types: list[int], merges: list[str]) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ")) for m in merges],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [
        AddedToken(token, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    # Adding tokens that are already in the vocabulary must not create new ids.
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    for t in specials:
        assert tok.token_to_id(t.content) == vocab[t.content]
    return tok


def serialize(tok: Tokenizer) -> bytes:
    data = json.loads(tok.to_str())
    # Merges as "left right" strings (the classic tokenizer.json spelling, also accepted by `tokenizers`)
    # instead of two-element lists: about a third smaller, and unambiguous since no token contains " ".
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # Round-trip check: the compact form must load to the very same tokenizer.
    assert Tokenizer.from_str(text).to_str() == tok.to_str()
    return text.encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tokens, types, merges = read_gguf(args.gguf)
    print(f"read {args.gguf} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    check_vocab(tokens, types, merges)
    tok = build(tokens, types, merges)
    raw = serialize(tok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 (and no file name in the header) keeps the archive byte-identical across rebuilds.
    args.out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    print(
        f"wrote {args.out}: {len(raw) / 1e6:.1f} MB json, {args.out.stat().st_size / 1e6:.1f} MB gzip",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
