"""Split Gemma 4 generated text into reasoning, content and tool calls (FORMAT.md §3.2, §4.3).

The input is the raw generated text with special tokens kept, e.g.
`<|channel>thought\\n...<channel|>Answer<turn|>` or `<|tool_call>call:f{x:<|"|>a<|"|>}<tool_call|><|tool_response>`.

One state machine, `StreamParser`, does all the work; `parse_output` runs it over the whole text at once. So the
streaming (SSE) and non-streaming answers of the server cannot disagree, however the text was cut into chunks.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Literal

THOUGHT_OPEN = "<|channel>"
THOUGHT_CLOSE = "<channel|>"
CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
QUOTE = '<|"|>'  # the string delimiter inside call bodies (one special token; nothing is escaped)
THOUGHT_LABEL = "thought"  # the channel name after <|channel>, like "user" after <|turn>
# Stop tokens end a generation and carry no text: wherever one shows up it is dropped.
STOP_TOKENS = ("<turn|>", "<eos>", "<|tool_response>")

# The markers each state reacts to; any other text (a lone "<", "<|image|>", ...) is ordinary text.
CONTENT_MARKERS = (THOUGHT_OPEN, THOUGHT_CLOSE, CALL_OPEN, *STOP_TOKENS)  # a stray <channel|> is dropped
# A <|tool_call> inside an unterminated thought ends the thought (the model skipped <channel|>; vLLM does the same).
REASONING_MARKERS = (THOUGHT_CLOSE, CALL_OPEN, *STOP_TOKENS)
# A call body ends at <tool_call|>; a stop token or the next <|tool_call> also ends it (the model skipped
# <tool_call|>, e.g. wrote <turn|> instead). Call bodies are not searched string-aware, as in vLLM and DIALOG.
CALL_ENDS = (CALL_CLOSE, CALL_OPEN, *STOP_TOKENS)
LONGEST_MARKER = max(len(m) for m in (*CONTENT_MARKERS, *CALL_ENDS))

REASONING_SEPARATOR = "\n\n"  # between the texts of several thought blocks in one output


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=new_call_id, compare=False)  # random, so equality ignores it

    def to_openai(self) -> dict:
        """The call as an entry of an OpenAI chat message's `tool_calls`."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass
class ParsedOutput:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Delta:
    """One piece of streamed output: reasoning text, content text, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    tool_call: ToolCall | None = None


def parse_output(text: str) -> ParsedOutput:
    """Parse a complete generation (special tokens kept) into reasoning, content and tool calls."""
    parser = StreamParser()
    return merge_deltas(parser.feed(text) + parser.finish())


def merge_deltas(deltas: list[Delta]) -> ParsedOutput:
    """What a client gets by concatenating streamed deltas; empty text becomes None."""
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [d.tool_call for d in deltas if d.kind == "tool_call"]
    return ParsedOutput(reasoning or None, content or None, calls)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


class StreamParser:
    """Incremental parser: `feed` chunks of generated text, then call `finish` once.

    Text is passed on as soon as it cannot be part of a marker; only a tail that could still grow into one
    (`<|`, `<|tool_ca`), trailing whitespace (it is stripped if the text ends there), a possible `thought` label and
    an open tool call are held back. Any split of a text gives the same concatenated result as `parse_output`.
    """

    def __init__(self) -> None:
        self._buffer = ""  # received, not yet decided
        self._state: Literal["content", "reasoning", "call"] = "content"
        self._call_searched = 0  # how much of an open call's buffer holds no complete end marker
        self._content = _StrippedStream()
        self._reasoning = _StrippedStream(separator=REASONING_SEPARATOR)
        self._deltas: list[Delta] = []
        # A channel label that may open the next text: (what may follow the label, strip it at the very end too).
        # At the start of the output a bare "thought\n" can appear without <|channel> when thinking is off
        # (FORMAT.md §3.2, vLLM `_strip_thought_label`); inside a thought block the label names the channel.
        self._label: tuple[tuple[str, ...], bool] | None = (("\n", THOUGHT_CLOSE), False)

    def feed(self, delta: str) -> list[Delta]:
        self._buffer += delta
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        """End of generation: release everything held back (an unterminated thought is reasoning, an
        unfinished tool call is content as written)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Delta]:
        while self._step(final):
            pass
        deltas, self._deltas = self._deltas, []
        return deltas

    def _step(self, final: bool) -> bool:
        """Decide what can be decided at the front of the buffer; False when more input is needed."""
        if self._state == "call":
            return self._step_call(final)
        if self._label is not None:
            if not self._drop_label(final):
                return False
            self._label = None
        markers = CONTENT_MARKERS if self._state == "content" else REASONING_MARKERS
        pos, marker = find_first(self._buffer, markers)
        if pos < 0:
            held = 0 if final else partial_marker_length(self._buffer, markers)
            self._emit(self._buffer[: len(self._buffer) - held])
            self._buffer = self._buffer[len(self._buffer) - held :]
            return False
        self._emit(self._buffer[:pos])
        self._buffer = self._buffer[pos + len(marker) :]
        if marker == THOUGHT_OPEN:
            self._state = "reasoning"
            self._reasoning.new_block()
            self._label = (("\n", *REASONING_MARKERS), True)
        elif marker == THOUGHT_CLOSE:
            self._state = "content"
        elif marker == CALL_OPEN:
            self._state = "call"
            self._call_searched = 0
        return True  # stop tokens are simply dropped

    def _drop_label(self, final: bool) -> bool:
        """Drop a leading `thought` label if one is there; False while it is too early to tell."""
        followers, at_end_too = self._label
        if any(self._buffer.startswith(THOUGHT_LABEL + f) for f in followers):
            self._buffer = self._buffer[len(THOUGHT_LABEL) :].removeprefix("\n")
            return True
        if final:
            if at_end_too and self._buffer == THOUGHT_LABEL:
                self._buffer = ""
            return True
        return not any((THOUGHT_LABEL + f).startswith(self._buffer) for f in followers)

    def _step_call(self, final: bool) -> bool:
        start = max(0, self._call_searched - (LONGEST_MARKER - 1))  # a marker may straddle two chunks
        end, marker = find_first(self._buffer, CALL_ENDS, start)
        if end < 0:
            if not final:
                self._call_searched = len(self._buffer)
                return False
            end, marker = len(self._buffer), ""
        used = end + len(marker) if marker == CALL_CLOSE else end  # other end markers are handled as content
        raw = CALL_OPEN + self._buffer[:used]
        body = self._buffer[:end]
        self._buffer = self._buffer[used:]
        self._state = "content"
        try:
            call = parse_tool_call(body)
        except GemmaSyntaxError:
            self._emit(raw)  # never drop text: a call we cannot read goes to the content as it was written
        else:
            self._deltas.append(Delta("tool_call", tool_call=call))
        return True

    def _emit(self, text: str) -> None:
        kind = "reasoning" if self._state == "reasoning" else "content"
        stream = self._reasoning if kind == "reasoning" else self._content
        visible = stream.push(text)
        if visible:
            self._deltas.append(Delta(kind, visible))


class _StrippedStream:
    """Passes a stream of text on with its outer whitespace stripped.

    Leading whitespace is dropped and trailing whitespace is held until text follows it, so whatever has been
    passed on when the stream ends is exactly the stripped whole. `new_block` starts a part that is stripped on
    its own and joined to the earlier text with `separator` (several thought blocks).
    """

    def __init__(self, separator: str = "") -> None:
        self.separator = separator
        self.passed_any = False
        self.in_block = False  # the current block has shown non-whitespace text
        self.held = ""

    def new_block(self) -> None:
        self.in_block = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.in_block:
            text = text.lstrip()
            if not text:
                return ""
            self.in_block = True
            self.held = self.separator if self.passed_any else ""
        text = self.held + text
        visible = text.rstrip()
        self.held = text[len(visible) :]
        self.passed_any = self.passed_any or bool(visible)
        return visible


def find_first(text: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str]:
    """Position and text of the earliest marker in text[start:], or (-1, "")."""
    found = (-1, "")
    for marker in markers:
        pos = text.find(marker, start)
        if pos >= 0 and (found[0] < 0 or pos < found[0]):
            found = (pos, marker)
    return found


def partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into one of `markers`."""
    for n in range(min(len(text), LONGEST_MARKER - 1), 0, -1):
        tail = text[-n:]
        if any(marker.startswith(tail) for marker in markers):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Tool-call bodies: `call:NAME{key:value,...}` with the "Gemma JSON" values of FORMAT.md §4.1


class GemmaSyntaxError(ValueError):
    pass


# Lenient head (FORMAT.md §4.3): `call:name{`, also a bare `:name{` or `name{`, and `(` instead of `{`.
CALL_HEAD = re.compile(r"\s*(?:call:|:)?\s*([\w./-]+)\s*([{(])")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
WORD = re.compile(r"[A-Za-z_]\w*")
# null/true/false as the templates print them, plus the Python spellings that templates before 2026-07-09 printed.
LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
BARE_KEY = re.compile(r"[^\s:{}\[\],\"]+")
WHITESPACE = re.compile(r"\s*")
JSON_DECODER = json.JSONDecoder()


def parse_tool_call(body: str) -> ToolCall:
    """Parse the text between <|tool_call> and <tool_call|>; raises GemmaSyntaxError if it is not one call."""
    head = CALL_HEAD.match(body)
    if not head:
        raise GemmaSyntaxError(f"no `call:NAME{{` in {body[:40]!r}")
    closer = "}" if head.group(2) == "{" else ")"
    arguments, pos = parse_object(body, head.end(), closer)
    if body[pos:].strip():
        raise GemmaSyntaxError(f"text after the arguments: {body[pos:pos + 40]!r}")
    return ToolCall(head.group(1), arguments)


def skip_whitespace(text: str, pos: int) -> int:
    # The canonical form has no whitespace, but llama.cpp and vLLM accept it after `{`, `,` and `:`.
    return WHITESPACE.match(text, pos).end()


def parse_object(text: str, pos: int, closer: str = "}") -> tuple[dict, int]:
    """Parse the members of an object whose opening bracket ends before `pos`; return it and the position after
    its closer."""
    result: dict = {}
    pos = skip_whitespace(text, pos)
    if text.startswith(closer, pos):
        return result, pos + 1
    while True:
        key, pos = parse_key(text, pos)
        pos = skip_whitespace(text, pos)
        if not text.startswith(":", pos):
            raise GemmaSyntaxError(f"expected ':' after key {key!r} at {pos}")
        result[key], pos = parse_value(text, pos + 1)
        pos = skip_whitespace(text, pos)
        if text.startswith(",", pos):
            pos = skip_whitespace(text, pos + 1)
        elif text.startswith(closer, pos):
            return result, pos + 1
        else:
            raise GemmaSyntaxError(f"expected ',' or {closer!r} at {pos}")


def parse_key(text: str, pos: int) -> tuple[str, int]:
    # Keys are bare in calls; vLLM also accepts them quoted with <|"|>, and "..." costs nothing to accept.
    if text.startswith(QUOTE, pos) or text.startswith('"', pos):
        return parse_string(text, pos)
    match = BARE_KEY.match(text, pos)
    if not match:
        raise GemmaSyntaxError(f"expected a key at {pos}")
    return match.group(), match.end()


def parse_array(text: str, pos: int) -> tuple[list, int]:
    """Parse the items of an array whose `[` ends before `pos`."""
    result: list = []
    pos = skip_whitespace(text, pos)
    if text.startswith("]", pos):
        return result, pos + 1
    while True:
        item, pos = parse_value(text, pos)
        result.append(item)
        pos = skip_whitespace(text, pos)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            return result, pos + 1
        else:
            raise GemmaSyntaxError(f"expected ',' or ']' at {pos}")


def parse_string(text: str, pos: int) -> tuple[str, int]:
    if text.startswith(QUOTE, pos):
        # No escapes: the first following delimiter closes the string, so `}`, `,`, `"` and newlines are literal.
        end = text.find(QUOTE, pos + len(QUOTE))
        if end < 0:
            raise GemmaSyntaxError(f"unterminated string at {pos}")
        return text[pos + len(QUOTE) : end], end + len(QUOTE)
    try:  # a JSON "..." string, in case the model falls back to JSON
        return JSON_DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as error:
        raise GemmaSyntaxError(f"bad string at {pos}") from error


def parse_value(text: str, pos: int) -> tuple[object, int]:
    pos = skip_whitespace(text, pos)
    if text.startswith(QUOTE, pos) or text.startswith('"', pos):
        return parse_string(text, pos)
    if text.startswith("{", pos):
        return parse_object(text, pos + 1)
    if text.startswith("[", pos):
        return parse_array(text, pos + 1)
    number = NUMBER.match(text, pos)
    if number:
        token = number.group()
        is_float = any(c in token for c in ".eE")
        return (float(token) if is_float else int(token)), number.end()
    word = WORD.match(text, pos)
    if word and word.group() in LITERALS:
        return LITERALS[word.group()], word.end()
    raise GemmaSyntaxError(f"expected a value at {pos}: {text[pos:pos + 20]!r}")
