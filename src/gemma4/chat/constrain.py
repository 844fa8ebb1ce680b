"""Constrained decoding: make the model's output follow a JSON schema or Gemma's tool-call syntax.

A `Constraint` guards one sequence. The sampler calls `mask_logits(logits)` before each sampling step (tokens the
grammar forbids get -inf) and `accept(token)` after it. Once the structure is complete only the stop tokens stay
allowed, so generation ends there:

    c = json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    while not done:
        token = sample(c.mask_logits(logits))
        c.accept(token)                     # a stop token (<turn|> or <eos>) ends it: c.is_finished()

Factories (each call returns a fresh Constraint; the compiled grammar behind it is cached per schema):

* `json_object()`: any JSON object (OpenAI `response_format={"type": "json_object"}`).
* `json_schema(schema)`: JSON that validates against `schema` (OpenAI `json_schema` response format).
* `tool_call(tools, name=None)`: one or more Gemma tool calls (FORMAT.md §4.3),
  `<|tool_call>call:NAME{key:value,...}<tool_call|>`, whose arguments follow the tool's JSON-schema `parameters`
  in Gemma's syntax (bare keys, strings between `<|"|>` tokens, §4.1); then `<|tool_response>` (id 50) ends the
  output. `name` forces that function (OpenAI `tool_choice={"type":"function",...}`); None means any of them
  (`tool_choice="required"`).

The grammar engine is llguidance: it reads the real 262,144-token vocabulary (byte-fallback `<0xNN>` tokens, `▁`
spaces), refers to special tokens such as `<|"|>` by id so that no run of ordinary tokens can spell them, and
computes a mask in well under a millisecond. Its tokenizer view takes about 3 s to build, once per process.

How stop tokens work: llguidance's own end token is `<eos>` (id 1); it is allowed exactly when the grammar may end.
A Constraint allows its stop tokens wherever `<eos>` is allowed, and accepting any of them ends the grammar.

JSON output is compact apart from the separators `", "` and `": "` (as `json.dumps` writes them); no other
whitespace is allowed, so that a model cannot pad forever. In tool calls object members come in the order the
chat template renders them (keys sorted case-insensitively, FORMAT.md §4.1), and an object schema with
`properties` gets only those keys.
"""
from __future__ import annotations

import functools
import json
import re

import llguidance
import numpy as np
import torch

from ..tokenizer import load_tokenizer

__all__ = ["Constraint", "ConstraintError", "json_object", "json_schema", "tool_call", "EOS_ID", "TURN_END_ID",
           "TOOL_RESPONSE_ID"]

EOS_ID = 1  # <eos>
TURN_END_ID = 106  # <turn|>: ends a model turn
TOOL_RESPONSE_ID = 50  # <|tool_response>: written after the last tool call, a stop token (FORMAT.md §4.3)

_JSON_SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """The grammar cannot go on: a schema that recurses without end, or one too large for the parser. It is
    the request's schema that fails, so it is the request's error."""


class Constraint:
    """The grammar state of one sequence. Get one from `json_object`, `json_schema` or `tool_call`."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids=(TURN_END_ID,)):
        """`matcher`: this sequence's own llguidance matcher (not shared). `stop_ids`: the tokens allowed once the
        structure is complete; <eos> is always one of them."""
        self._matcher = matcher
        self.stop_ids = tuple(dict.fromkeys([*stop_ids, EOS_ID]))
        self._vocab_size = _ll_tokenizer().vocab_size
        self._bits = torch.zeros((self._vocab_size + 31) // 32, dtype=torch.int32)
        self._allowed: torch.Tensor | None = None  # mask for the current state, dropped by accept()

    def allowed_tokens(self) -> torch.Tensor:
        """Boolean [vocab] mask: True for each token the grammar allows next."""
        if self._allowed is None:
            self._check_state()
            self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.nbytes)
            self._check_state()  # a mask it cannot compute leaves the matcher in an error state
            bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")[:self._vocab_size]
            allowed = torch.from_numpy(bits).bool()
            if allowed[EOS_ID]:
                allowed[list(self.stop_ids)] = True
            self._allowed = allowed
        return self._allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., vocab] -> a copy with the disallowed tokens at -inf. Logits past the tokenizer's
        vocabulary (a padded embedding) are disallowed too."""
        allowed = self.allowed_tokens()
        n = logits.shape[-1]
        if n != allowed.numel():
            allowed = torch.cat([allowed, allowed.new_zeros(max(0, n - allowed.numel()))])[:n]
        return torch.where(allowed.to(logits.device), logits, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; ValueError if the grammar does not allow it here (the state is unchanged)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size or not self.allowed_tokens()[token_id]:
            raise ValueError(f"token {token_id} ({_token_text(token_id)!r}) is not allowed here by the constraint")
        # A stop token stands for llguidance's end token (allowed only where the grammar may end).
        self._matcher.consume_token(EOS_ID if token_id in self.stop_ids else token_id)
        self._check_state()
        self._allowed = None

    def rollback(self, k: int) -> None:
        """Forget the last k accepted tokens."""
        self._matcher.rollback(k)
        self._check_state()
        self._allowed = None

    def is_finished(self) -> bool:
        """True once the structure is complete and only a stop token may follow (or one was accepted)."""
        return self._matcher.is_stopped()

    def _check_state(self) -> None:
        if self._matcher.is_error():  # llguidance never raises; it parks the matcher in an error state
            raise ConstraintError(f"the output grammar failed: {_first_line(self._matcher.get_error())}")


def json_object(stop_ids=(TURN_END_ID,)) -> Constraint:
    """Any JSON object."""
    return Constraint(_compiled("json", json.dumps({"type": "object"})), stop_ids)


def json_schema(schema: dict, stop_ids=(TURN_END_ID,)) -> Constraint:
    """JSON that validates against `schema`; ValueError for a schema that is malformed or uses a keyword that
    llguidance does not implement."""
    if not isinstance(schema, dict):
        raise ValueError(f"JSON schema must be a dict, got {type(schema).__name__}")
    return Constraint(_compiled("json", _dumps(schema, "JSON schema")), stop_ids)


def tool_call(tools: list[dict], name: str | None = None, stop_ids=(TOOL_RESPONSE_ID,),
              max_calls: int | None = None) -> Constraint:
    """Gemma tool calls to `tools` (OpenAI format: `{"type": "function", "function": {"name", "description",
    "parameters"}}`), only to `name` if given. One call at least, at most `max_calls` in a row (None: no limit;
    1 for OpenAI's `parallel_tool_calls=False`)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of OpenAI tool definitions")
    if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 1):
        raise ValueError(f"max_calls must be a positive integer or None, got {max_calls!r}")
    key = _dumps({"tools": tools, "name": name, "max_calls": max_calls}, "tools")
    return Constraint(_compiled("tools", key), stop_ids)


# ---- compiling, cached ----

@functools.lru_cache(maxsize=1)
def _ll_tokenizer() -> llguidance.LLTokenizer:
    # The expensive part (~3 s): llguidance indexes all 262,144 token byte strings. Once per process.
    tok = load_tokenizer()
    return llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=EOS_ID)


@functools.lru_cache(maxsize=256)
def _pristine_matcher(kind: str, key: str) -> llguidance.LLMatcher:
    """The compiled grammar for a schema (key: its JSON text), as a matcher at the start state."""
    spec = json.loads(key)
    if kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_SEPARATORS)
        what = "invalid JSON schema"
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(_tool_call_lark(spec["tools"], spec["name"],
                                                                         spec["max_calls"]))
        what = "cannot build the tool-call grammar"
    matcher = llguidance.LLMatcher(_ll_tokenizer(), grammar, log_level=0)
    probe = matcher.deep_copy()
    probe.compute_bitmask()  # a grammar with no way to start (e.g. {"$ref": "#"}) fails at its first mask
    if probe.is_error():
        raise ValueError(f"{what}: {_first_line(probe.get_error())}")
    return matcher


def _compiled(kind: str, key: str) -> llguidance.LLMatcher:
    return _pristine_matcher(kind, key).deep_copy()  # a copy shares the compiled grammar: ~1 us


def _dumps(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)  # key order kept: it decides the order of JSON properties
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not plain JSON: {e}") from None


def _first_line(error: str) -> str:
    return error.split("\n<state>")[0].strip()  # llguidance appends a parser-state dump


def _token_text(token_id: int) -> str:
    try:
        return load_tokenizer().id_to_token(token_id)
    except ValueError:
        return "<out of range>"


# ---- Gemma tool-call grammar (a Lark grammar for llguidance) ----

_SPECIAL = {"quote": '<|"|>', "call_start": "<|tool_call>", "call_end": "<tool_call|>"}
# The JSON-schema keywords that restrict values in tool arguments. Others (description, title, default,
# `format`, which is not enforced, ...) are ignored, like llguidance does for JSON, except these:
_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
             "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "multipleOf", "anyOf", "oneOf", "$ref"}
_UNSUPPORTED = {"allOf", "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
                "prefixItems", "additionalItems", "unevaluatedItems", "unevaluatedProperties", "patternProperties",
                "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
                "dependencies"}
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# String text may not contain the delimiter's text, nor the markers that end a call body for a parser that does
# not track strings (gemma4.chat.parse, vLLM): <tool_call|>, <|tool_call> and the stop tokens.
_NOT_IN_STRINGS = (r'~/(?s:.*)(<\|"\|>|<tool_call\|>|<\|tool_call>|<turn\|>|<eos>|<\|tool_response>)(?s:.*)/')


def _tool_call_lark(tools: list, name: str | None, max_calls: int | None) -> str:
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] is not an OpenAI function tool "
                             '{"type": "function", "function": {"name": ..., "parameters": ...}}')
        fname = fn.get("name")
        if not isinstance(fname, str) or not re.fullmatch(r"[\w./-]+", fname):  # what parsers read as a name
            raise ValueError(f"tools[{i}]: function name {fname!r} is not made of letters, digits and _ . / -")
        if fname in functions:
            raise ValueError(f"tools[{i}]: duplicate function name {fname!r}")
        functions[fname] = fn.get("parameters") or {"type": "object", "properties": {}}  # no arguments: {}
    if name is not None:
        if name not in functions:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools {sorted(functions)}")
        functions = {name: functions[name]}

    g = _LarkBuilder()
    bodies = []
    for fname, params in functions.items():
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ValueError(f"tool {fname!r}: parameters must be a JSON schema of type object")
        bodies.append(f"{_lit(fname)} {g.value(params, params, f'{fname}.parameters')}")
    g.rules["call"] = f"{g.special('call_start')} {_lit('call:')} ({' | '.join(bodies)}) {g.special('call_end')}"
    g.rules["start"] = "call+" if max_calls is None else "call" if max_calls == 1 else f"call{{1,{max_calls}}}"
    return g.text()


def _lit(s: str) -> str:
    """A Lark string literal."""
    return json.dumps(s, ensure_ascii=False)


class _LarkBuilder:
    """Turns JSON schemas into Lark rules for Gemma values (FORMAT.md §4.1): objects `{key:value,...}` with bare
    keys, arrays `[v,...]`, strings `<|"|>text<|"|>` (no escapes; see _NOT_IN_STRINGS), and JSON
    numbers, true, false, null. Number leaves are delegated to llguidance's own JSON-schema compiler (`%json`),
    which handles integer and number ranges; their text is the same in both syntaxes."""

    def __init__(self):
        self.rules: dict[str, str] = {}
        self.terminals: dict[str, str] = {}
        self._refs: dict[str, str] = {}
        tok = load_tokenizer()
        self._special_ids = {k: tok.token_to_id(v) for k, v in _SPECIAL.items()}

    def special(self, what: str) -> str:
        return f"<[{self._special_ids[what]}]>"

    def text(self) -> str:
        order = ["start", *(k for k in self.rules if k != "start")]
        return "\n".join([*(f"{k}: {self.rules[k]}" for k in order),
                          *(f"{k}: {v}" for k, v in self.terminals.items())])

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules[name] = body
        return name

    # -- values --

    def value(self, schema, root: dict, path: str) -> str:
        """A Lark expression for the values that `schema` (at `path` inside `root`) accepts."""
        if schema is True:
            return self.any_value()
        if not isinstance(schema, dict):
            raise ValueError(f"{path}: a schema must be an object, got {schema!r}")
        unsupported = sorted(set(schema) & _UNSUPPORTED)
        if unsupported:
            raise ValueError(f"{path}: unsupported JSON-schema keyword(s) {unsupported} in a tool's parameters")
        if not set(schema) & _KEYWORDS:
            return self.any_value()
        if "$ref" in schema:
            return self.ref(schema["$ref"], root, path)
        if "const" in schema:
            return self.literal(schema["const"], path)
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ValueError(f"{path}: enum must be a non-empty list")
            return "(" + " | ".join(self.literal(v, path) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise ValueError(f"{path}: {key} must be a non-empty list of schemas")
                base = {k: v for k, v in schema.items() if k != key}
                alts = [self.value({**base, **option} if isinstance(option, dict) else option, root,
                                   f"{path}.{key}[{i}]") for i, option in enumerate(options)]
                return "(" + " | ".join(alts) + ")"
        types = schema.get("type") or _implied_type(schema)
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types:
            raise ValueError(f"{path}: type must be a type name or a non-empty list of them, got {types!r}")
        if schema.get("nullable") is True and "null" not in types:
            types = [*types, "null"]
        alts = [self.typed(t, schema, root, path) for t in types]
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def typed(self, kind: str, schema: dict, root: dict, path: str) -> str:
        if kind == "string":
            return self.string(schema, path)
        if kind in ("integer", "number"):
            leaf = {"type": kind, **{k: schema[k] for k in _NUMBER_KEYWORDS if k in schema}}
            return self.rule(f"%json {json.dumps({**leaf, 'x-guidance': {'whitespace_flexible': False}})}")
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            lo, hi = _bounds(schema, "minItems", "maxItems", path)
            if hi == 0:
                return '"[]"'
            item = self.value(schema.get("items", True), root, f"{path}.items")
            inner = item if hi == 1 else f'{item} ("," {item}){{{max(lo - 1, 0)},{"" if hi is None else hi - 1}}}'
            return self.rule(f'"[" {inner if lo > 0 else f"({inner})?"} "]"')
        if kind == "object":
            if "properties" in schema:
                return self.object(schema["properties"], schema.get("required", []), root, path)
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return '"{}"'
            # a map: any bare keys, values per additionalProperties
            value = self.value(extra, root, f"{path}.additionalProperties")
            self.terminals.setdefault("ANY_KEY", "/[A-Za-z_][A-Za-z0-9_]*/")
            return self.rule(f'"{{" (ANY_KEY ":" {value} ("," ANY_KEY ":" {value})*)? "}}"')
        raise ValueError(f"{path}: unknown type {kind!r}")

    def object(self, props, required, root: dict, path: str) -> str:
        if not isinstance(props, dict) or not isinstance(required, list):
            raise ValueError(f"{path}: properties must be an object and required a list")
        missing = sorted(set(required) - set(props))
        if missing:
            raise ValueError(f"{path}: required properties {missing} are not in properties")
        # Members in template order; `first` derives the members from here on, `rest` the same with each
        # preceded by a comma. Built back to front so that an optional member may be skipped.
        first = rest = ""
        for key in sorted(props, key=str.lower, reverse=True):
            if not key or any(c in key for c in ":{},[]<> \n"):
                raise ValueError(f"{path}: property name {key!r} cannot be written as a bare Gemma key")
            member = f"{_lit(key + ':')} {self.value(props[key], root, f'{path}.{key}')}"
            head = f"{member} {rest}".strip()
            if key in required:
                first = self.rule(head)
                rest = self.rule(f'"," {head}')
            else:
                first = self.rule(f"{head} | {first}" if first else f"({head})?")
                rest = self.rule(f'("," {member})? {rest}'.strip())
        return self.rule(f'"{{" {first} "}}"' if first else '"{}"')

    def string(self, schema: dict, path: str) -> str:
        lo, hi = _bounds(schema, "minLength", "maxLength", path)
        parts = [f"/(?s:.{{{lo},{'' if hi is None else hi}}})/", _NOT_IN_STRINGS]
        if "pattern" in schema:  # JSON Schema semantics: a match anywhere, unless anchored by ^ / $
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise ValueError(f"{path}: pattern must be a string")
            at_start, at_end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
            core = pattern[1 if at_start else 0:-1 if at_end else None]
            regex = ("" if at_start else "(?s:.*)") + f"(?:{core})" + ("" if at_end else "(?s:.*)")
            parts.append("/" + llguidance.regex_to_lark(regex, "dw") + "/")  # "dw": ASCII \d, \w as in JS
        body = " & ".join(parts)
        name = next((k for k, v in self.terminals.items() if v == body), None)
        if name is None:
            name = f"STR{len(self.terminals)}"
            self.terminals[name] = body
        q = self.special("quote")
        return f"{q} {name} {q}"

    def literal(self, v, path: str) -> str:
        """The Gemma rendering of a constant (enum / const value), as a Lark expression."""
        if isinstance(v, str):
            if _SPECIAL["quote"] in v:
                raise ValueError(f'{path}: a string value cannot contain <|"|>')
            q = self.special("quote")
            return f"{q} {_lit(v)} {q}" if v else f"{q} {q}"
        if v is None or isinstance(v, (bool, int, float)):
            return _lit(json.dumps(v))
        if isinstance(v, list):
            return '"[" ' + ' "," '.join(self.literal(x, path) for x in v) + ' "]"'
        if isinstance(v, dict):
            members = [f"{_lit(str(k) + ':')} {self.literal(v[k], path)}" for k in sorted(v, key=str.lower)]
            return '"{" ' + ' "," '.join(members) + ' "}"'
        raise ValueError(f"{path}: {v!r} is not a JSON value")

    def ref(self, ref, root: dict, path: str) -> str:
        if ref not in self._refs:
            parts = ref.split("/") if isinstance(ref, str) else []
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions") \
                    or parts[2] not in root.get(parts[1], {}):
                raise ValueError(f"{path}: unsupported or dangling $ref {ref!r} (only #/$defs/NAME)")
            self._refs[ref] = name = self.rule("")  # reserved first: a definition may refer to itself
            self.rules[name] = self.value(root[parts[1]][parts[2]], root, ref)
        return self._refs[ref]

    # -- unconstrained values (a schema of `{}` or `true`) --

    def any_value(self) -> str:
        if "any_value" not in self.rules:
            self.rules["any_value"] = ""  # reserved: the rules below refer to it
            q = self.special("quote")
            self.terminals.setdefault("ANY_KEY", "/[A-Za-z_][A-Za-z0-9_]*/")
            self.terminals.setdefault("ANY_STR", f"/(?s:.*)/ & {_NOT_IN_STRINGS}")
            number = self.typed("number", {}, {}, "")
            obj = self.rule('"{" (ANY_KEY ":" any_value ("," ANY_KEY ":" any_value)*)? "}"')
            arr = self.rule('"[" (any_value ("," any_value)*)? "]"')
            self.rules["any_value"] = f'{q} ANY_STR {q} | {number} | {obj} | {arr} | "true" | "false" | "null"'
        return "any_value"


def _implied_type(schema: dict) -> str:
    """The type a schema without `type` means, from its keywords."""
    if {"properties", "required", "additionalProperties"} & set(schema):
        return "object"
    if "items" in schema or "minItems" in schema or "maxItems" in schema:
        return "array"
    if {"minLength", "maxLength", "pattern"} & set(schema):
        return "string"
    return "number"  # the keywords left that constrain a value without $ref/const/enum/anyOf are numeric


def _bounds(schema: dict, lo_key: str, hi_key: str, path: str) -> tuple[int, int | None]:
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for k, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{path}: {k} must be a non-negative integer, got {v!r}")
    if hi is not None and hi < lo:
        raise ValueError(f"{path}: {hi_key} ({hi}) is less than {lo_key} ({lo})")
    return lo, hi
