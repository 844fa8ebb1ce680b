"""Constrained decoding (gemma4.chat.constrain): the built-in tiny random-weight model, sampled at temperature 1.0
through a constraint, writes output that parses and validates in 100 of 100 samples, for any JSON object, a JSON
schema and Gemma tool calls (named and `required`); plus the constraint's error and end-of-structure behaviour.

A random model never chooses to close a string, array or number: its output is bounded here by the schemas
(maxLength, maxItems, enums, integer ranges). "Any JSON object" has no such bounds, so that case adds a fixed
logit bias toward `"`, `}`, `]` and `,` to the model, a stand-in for a trained model's habit of closing them."""
import json
import re
import time

import jsonschema
import pytest
import torch
from oracle import ContiguousCache, step_logits

from gemma4.chat import constrain
from gemma4.chat.parse import parse_output
from gemma4.tokenizer import load_tokenizer

N = 100  # samples per case
BATCH = 25  # rows per model call: a [25, 262144] float tensor stays under glibc's 32 MB mmap threshold, so
# the per-step temporaries are reused instead of page-faulted in anew (which cost more than the model at 100)
MAX_NEW = 256  # per sample; a sample that reaches it counts as a failure

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "admin": {"type": "boolean"},
        "role": {"enum": ["user", "admin", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8},
                           "zip": {"type": "integer", "minimum": 100, "maximum": 999}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 10},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "details": {"type": "object",
                            "properties": {"hourly": {"type": "boolean"},
                                           "fields": {"type": "array", "items": {"enum": ["wind", "rain", "uv"]},
                                                      "maxItems": 2}},
                            "required": ["hourly"]},
            },
            "required": ["city", "unit"],
        }}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 12},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                "safe": {"type": "boolean"},
                "lang": {"type": ["string", "null"], "maxLength": 5},
            },
            "required": ["query"],
        }}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Every step here is a few hundred small full-vocabulary ops per row: on 2 shared cores a second thread
    # only adds synchronisation (measured: 3-10x slower when the other core is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm():
    from gemma4.llm import LLM

    return LLM()  # no path: the tiny random model with the real 262K tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def prompt_ids(tok, text):
    return tok.encode(f"<bos><|turn>user\n{text}<turn|>\n<|turn>model\n")


def sample(llm, make_constraint, prompt, seed, bias=None):
    """N sequences from `prompt`, BATCH at a time. -> (token lists, how many hit MAX_NEW)."""
    gen = torch.Generator().manual_seed(seed)
    outputs, hits = [], 0
    for _ in range(0, N, BATCH):
        out, h = sample_batch(llm, [make_constraint() for _ in range(BATCH)], prompt, gen, bias)
        outputs += out
        hits += h
    return outputs, hits


def sample_batch(llm, constraints, prompt, gen, bias):
    """One sequence per constraint, together: temperature-1.0 sampling over the masked logits, a shared K/V
    cache whose finished rows are dropped."""
    model, cfg, B = llm.model, llm.model.config.text, len(constraints)
    cache = ContiguousCache(cfg, B, len(prompt) + MAX_NEW, model.dtype, model.device)
    logits = step_logits(model, torch.tensor([prompt] * B), torch.arange(len(prompt)).expand(B, -1), cache)
    outputs = [[] for _ in range(B)]
    rows = list(range(B))  # the sequence in each cache row
    for step in range(MAX_NEW):
        if bias is not None:
            logits = logits + bias
        masked = torch.stack([constraints[b].mask_logits(logits[r]) for r, b in enumerate(rows)])
        cdf = torch.softmax(masked.float(), dim=-1).cumsum(dim=-1)  # inverse-CDF sampling: faster than multinomial
        u = torch.rand(len(rows), 1, generator=gen) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)[:, 0].tolist()
        keep = []
        for r, (b, token) in enumerate(zip(rows, tokens)):
            constraints[b].accept(token)
            outputs[b].append(token)
            if token not in constraints[b].stop_ids:
                keep.append(r)
        if not keep:
            return outputs, 0
        if len(keep) < len(rows):
            cache.keep_rows(torch.tensor(keep))
            rows = [rows[r] for r in keep]
        ids = torch.tensor([[tokens[r]] for r in keep])
        logits = step_logits(model, ids, torch.full((len(keep), 1), len(prompt) + step), cache)
    return outputs, len(rows)


def finished_text(tok, ids, stop_ids):
    assert ids[-1] in stop_ids
    return tok.decode(ids[:-1])


def report(name, outputs, hits, seconds):
    lengths = sorted(len(o) for o in outputs)
    print(f"\n{name}: {N} samples in {seconds:.1f} s, tokens min/median/max "
          f"{lengths[0]}/{lengths[N // 2]}/{lengths[-1]}, hit max_new_tokens={MAX_NEW}: {hits}")


# ---- a tiny strict parser for Gemma tool calls (FORMAT.md §4.3, §4.1) ----

QUOTE = '<|"|>'
_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_tool_calls(text):
    """'<|tool_call>call:NAME{...}<tool_call|>...' -> [(name, arguments)]; AssertionError if malformed."""
    calls, i = [], 0
    while i < len(text):
        assert text.startswith("<|tool_call>call:", i), text[i:]
        i += len("<|tool_call>call:")
        brace = text.index("{", i)
        name = text[i:brace]
        arguments, i = parse_value(text, brace)
        assert text.startswith("<tool_call|>", i), text[i:]
        i += len("<tool_call|>")
        calls.append((name, arguments))
    return calls


def parse_value(s, i):
    if s.startswith(QUOTE, i):
        end = s.index(QUOTE, i + len(QUOTE))
        return s[i + len(QUOTE):end], end + len(QUOTE)
    if s[i] in "{[":
        close, items = "}]"["{[".index(s[i])], []
        i += 1
        while s[i] != close:
            if items:
                assert s[i] == ",", s[i:]
                i += 1
            if close == "}":
                key = _KEY.match(s, i)
                assert key and s[key.end()] == ":", s[i:]
                value, i = parse_value(s, key.end() + 1)
                items.append((key.group(), value))
            else:
                value, i = parse_value(s, i)
                items.append(value)
        return (dict(items) if close == "}" else items), i + 1
    m = _SCALAR.match(s, i)
    assert m, s[i:]
    return json.loads(m.group()), m.end()


# ---- the 100-sample proofs ----

def test_json_object_100_of_100(llm, tok):
    bias = torch.zeros(llm.config.text.vocab_size)
    bias[[tok.token_to_id(c) for c in '"}],']] = 16.0
    t0 = time.perf_counter()
    outputs, hits = sample(llm, constrain.json_object, prompt_ids(tok, "Reply with a JSON object."), 1, bias)
    report("json_object", outputs, hits, time.perf_counter() - t0)
    assert hits == 0
    values = [json.loads(finished_text(tok, o, (1, 106))) for o in outputs]
    assert all(isinstance(v, dict) for v in values)
    assert sum(len(v) > 0 for v in values) >= 20  # not only "{}"


def test_json_schema_100_of_100(llm, tok):
    t0 = time.perf_counter()
    outputs, hits = sample(llm, lambda: constrain.json_schema(PERSON), prompt_ids(tok, "Make up a person."), 2)
    report("json_schema", outputs, hits, time.perf_counter() - t0)
    assert hits == 0
    values = [json.loads(finished_text(tok, o, (1, 106))) for o in outputs]
    for v in values:
        jsonschema.validate(v, PERSON)
    assert {v["role"] for v in values} == {"user", "admin", "guest"}
    assert any("tags" in v for v in values) and any("tags" not in v for v in values)  # optional: both ways


@pytest.mark.parametrize("name", ["get_weather", None], ids=["named", "required"])
def test_tool_call_100_of_100(llm, tok, name):
    t0 = time.perf_counter()
    # Forced function: one call (OpenAI parallel_tool_calls=False). Any function: up to 2 parallel calls; a
    # random model would otherwise chain calls without end (another <|tool_call> is 1 of 3 allowed tokens).
    max_calls = 1 if name else 2
    make = lambda: constrain.tool_call(TOOLS, name, max_calls=max_calls)  # noqa: E731
    outputs, hits = sample(llm, make, prompt_ids(tok, "Weather in Paris?"), 3)
    report(f"tool_call({name})", outputs, hits, time.perf_counter() - t0)
    assert hits == 0
    seen, counts = set(), set()
    for o in outputs:
        calls = parse_tool_calls(finished_text(tok, o, (1, 50)))  # strict: the exact Gemma syntax
        parsed = parse_output(tok.decode(o))  # the project's (lenient) parser agrees
        assert parsed.content is None and parsed.reasoning_content is None
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
        counts.add(len(calls))
        for fname, arguments in calls:
            jsonschema.validate(arguments, PARAMS[fname])
            seen.add(fname)
    assert seen == ({name} if name else set(PARAMS))
    assert counts == ({1} if name else {1, 2})


# ---- constraint behaviour ----

def test_bad_schemas_raise():
    for bad in ({"type": "foo"}, {"type": "integer", "minimum": "x"}, {"type": "string", "pattern": "("},
                {"properties": {"a": {"$ref": "#/$defs/missing"}}}, "not a dict"):
        with pytest.raises(ValueError, match="schema"):
            constrain.json_schema(bad)
    with pytest.raises(ValueError, match="not one of the tools"):
        constrain.tool_call(TOOLS, name="nope")
    with pytest.raises(ValueError, match="not an OpenAI function tool"):
        constrain.tool_call([{"name": "f"}])
    bad_params = {"type": "object", "properties": {"a": {"type": "string", "uniqueItems": True}}}
    with pytest.raises(ValueError, match="unsupported"):
        constrain.tool_call([{"type": "function", "function": {"name": "f", "parameters": bad_params}}])


def test_accept_rejects_disallowed_token(tok):
    c = constrain.json_schema(PERSON)
    with pytest.raises(ValueError, match="not allowed"):
        c.accept(tok.encode("[")[0])  # an object must start with "{"
    with pytest.raises(ValueError, match="not allowed"):
        c.accept(106)  # <turn|> before the structure is complete
    c.accept(int(c.allowed_tokens().nonzero()[0]))  # the failed accepts left the state as it was
    assert not c.is_finished()


def test_only_stop_tokens_after_completion(tok):
    vocab = tok.vocab_size
    c = constrain.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    for t in tok.encode('{"ok": true}'):
        c.accept(t)
    assert c.is_finished()
    masked = c.mask_logits(torch.zeros(vocab + 64))  # a model's vocabulary may be padded past the tokenizer's
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [1, 106]
    c.accept(106)
    assert c.is_finished()

    t = constrain.tool_call(TOOLS, "search")
    for token in tok.encode('<|tool_call>call:search{query:<|"|>cats<|"|>}<tool_call|>'):
        t.accept(token)
    # another call may follow, or the turn hands over to the tool: <|tool_response> (or <eos>)
    assert t.allowed_tokens().nonzero().flatten().tolist() == [1, 48, 50]
    assert not t.is_finished()
    with pytest.raises(ValueError):
        t.accept(106)
    t.accept(50)
    assert t.is_finished()


def test_vocabulary_special_and_byte_tokens(tok):
    """`<|"|>` delimits strings only as its single special token (id 52); the same text spelled with ordinary
    tokens is string content, and is refused there because it would end the string when the text is parsed.
    Byte-fallback tokens (<0xF4><0x8F><0xBF><0xBD> = U+10FFFD) build characters inside strings."""
    quote = tok.token_to_id('<|"|>')
    spelled = tok.backend.encode('<|"', add_special_tokens=False).ids + tok.encode("|>")
    assert quote not in spelled and len(spelled) > 1
    c = constrain.tool_call(TOOLS, "search")
    for t in tok.encode("<|tool_call>call:search{query:"):
        c.accept(t)
    with pytest.raises(ValueError):
        c.accept(spelled[0])  # a string must open with the token itself
    c.accept(quote)
    for t in spelled[:-1]:  # '<|"|' is fine as text...
        c.accept(t)
    with pytest.raises(ValueError):
        c.accept(spelled[-1])  # ...but not '<|"|>'
    d = constrain.tool_call(TOOLS, "search")
    text = '<|tool_call>call:search{query:<|"|>a\U0010fffd\x07<|"|>}<tool_call|><|tool_response>'
    ids = tok.encode(text)
    assert {482, 381, 429, 427, 245} <= set(ids)  # byte-fallback tokens
    for t in ids:
        d.accept(t)
    assert d.is_finished()
    assert parse_tool_calls(tok.decode(ids[:-1])) == [("search", {"query": "a\U0010fffd\x07"})]


def test_compiled_grammar_is_cached():
    constrain.json_schema(PERSON)
    hits = constrain._pristine_matcher.cache_info().hits
    a, b = constrain.json_schema(PERSON), constrain.json_schema(PERSON)
    assert constrain._pristine_matcher.cache_info().hits == hits + 2
    a.accept(int(a.allowed_tokens().nonzero()[0]))  # separate states
    assert not torch.equal(a.allowed_tokens(), b.allowed_tokens())
