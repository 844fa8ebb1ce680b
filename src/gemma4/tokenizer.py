"""The Gemma 4 text tokenizer: text <-> token ids.

A thin wrapper around a Hugging Face `tokenizers` pipeline (SentencePiece-style BPE with byte fallback, 262144
tokens). The package ships the vocabulary as `data/tokenizer.json.gz`, built from the released GGUF vocabulary by
`tools/build_tokenizer.py`; a checkpoint's own `tokenizer.json` loads the same way.

    tok = load_tokenizer()
    ids = tok.encode("<bos><|turn>user\\nHi<turn|>\\n")   # [2, 105, 2364, 107, 10979, 106, 107]
    tok.decode(ids)                                       # the same text back

Special-token strings (`<bos>`, `<|turn>`, `<|tool_call>`, `<|"|>`, `<|image|>`, ...) become their single id
wherever they occur, because the chat template writes them as plain text. No BOS is added unless asked for: the
template writes `<bos>` itself.
"""

from __future__ import annotations

import functools
import gzip
import operator
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import tokenizers

from .memory import return_freed_heap

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer"]

_BUILTIN = "data/tokenizer.json.gz"


class Tokenizer:
    """Encode/decode with a Gemma tokenizer. Get one from `load_tokenizer()`."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend  # the underlying `tokenizers.Tokenizer`, for batch or offset work
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        ids = {name: backend.token_to_id(name) for name in ("<bos>", "<eos>", "<pad>")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"not a Gemma tokenizer: no {', '.join(missing)} token")
        self.bos_id: int = ids["<bos>"]  # 2
        self.eos_id: int = ids["<eos>"]  # 1
        self.pad_id: int = ids["<pad>"]  # 0

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        # add_special_tokens=False: a checkpoint's tokenizer.json may carry a post-processor that adds <bos>;
        # BOS is controlled here only, so the built-in and any checkpoint file behave the same.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (31 in Gemma 4: runs of spaces, tabs or newlines)."""
        return max(len(token) for token in self.backend.get_vocab())

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) from the text's length alone, without tokenizing it: no token
        stands for more than `max_token_chars` characters (the normalizer maps one character to one)."""
        return -(-len(text) // self.max_token_chars)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(self._check_id(token_id))

    def decode_stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for generated tokens, fed one id at a time (see `StreamDecoder`)."""
        return StreamDecoder(self, skip_special_tokens)

    def _check_id(self, token_id) -> int:
        # operator.index accepts ints, numpy ints and integer 0-d tensors, but rejects floats and strings.
        try:
            token_id = operator.index(token_id)
        except TypeError:
            raise TypeError(f"token id must be an int, got {type(token_id).__name__}: {token_id!r}") from None
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return token_id

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode() expects a sequence of token ids, got {type(ids).__name__}")
        return [self._check_id(i) for i in ids]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer for generation: `step(id)` returns the text that id completes.

    A character outside the vocabulary is generated as 2-4 byte-fallback tokens (`<0xF0>`...); `step` returns ""
    until the UTF-8 sequence is complete, then the whole character, so the concatenated steps equal `decode(ids)`.
    Each step decodes only a short window of recent ids (the "prefix/read offsets" scheme of vLLM). We do not use
    tokenizers' DecodeStream: it raises "Invalid prefix encountered" on byte tokens that never form valid UTF-8,
    which a sampled (or random-weight) model does produce.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this have been emitted

    def step(self, token_id: int) -> str:
        self._ids.append(self._tokenizer._check_id(token_id))
        backend = self._tokenizer.backend
        before = backend.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = backend.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence (or nothing new): wait for more bytes
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The built-in Gemma 4 tokenizer (`path=None`), or the one in a checkpoint directory or tokenizer.json file."""
    if path is None:
        return _builtin()
    path = Path(path)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {path}")
    elif path.is_file():
        file = path
    else:
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    raw = file.read_bytes()
    return _from_json(gzip.decompress(raw) if file.suffix == ".gz" else raw, file)


@functools.lru_cache(maxsize=1)
def _builtin() -> Tokenizer:
    # Cached: parsing 262144 tokens and 514906 merges takes about a second.
    return _from_json(builtin_json(), _BUILTIN)


def builtin_json() -> bytes:
    """The built-in tokenizer.json (Gemma 4's, as published)."""
    return gzip.decompress(resources.files(__package__).joinpath(_BUILTIN).read_bytes())


def _from_json(raw: bytes, origin) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{origin}: not a valid tokenizer.json ({e})") from e
    # Parsing the 262,144 tokens and 514,906 merges leaves ~50 MB of freed heap behind (RSS +142 MB, +92 after).
    return_freed_heap()
    try:
        return Tokenizer(backend)
    except ValueError as e:
        raise ValueError(f"{origin}: {e}") from None
