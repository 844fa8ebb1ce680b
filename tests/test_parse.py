"""Output parsing (gemma4.chat.parse): real transcripts, hand cases, and chunking invariance of StreamParser."""
import json
import os
import random

import pytest

from gemma4 import parse_output as top_level_parse_output
from gemma4.chat.parse import Delta, StreamParser, ToolCall, merge_deltas, parse_output

DATA = os.path.join(os.path.dirname(__file__), "data")
with open(os.path.join(DATA, "transcripts.json"), encoding="utf-8") as f:
    TRANSCRIPTS = json.load(f)

Q = '<|"|>'  # the Gemma string delimiter


def call(body):
    return "<|tool_call>" + body + "<tool_call|>"


def as_plain(parsed):
    """(reasoning, content, [(name, arguments as JSON)]): JSON keeps 2 and 2.0, 1 and true apart."""
    calls = [(c.name, json.dumps(c.arguments, sort_keys=True)) for c in parsed.tool_calls]
    return parsed.reasoning_content, parsed.content, calls


# (id, completion, reasoning, content, [(name, arguments)])
HAND_CASES = [
    ("parallel_calls",
     call(f"call:get_weather{{city:{Q}Paris{Q}}}") + call(f"call:get_time{{zone:{Q}CET{Q}}}") + "<|tool_response>",
     None, None, [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ("nested_objects_and_arrays",
     call(f"call:search{{filters:{{lang:{Q}en{Q},since:{{Month:3,year:2024}}}},"
          f"tags:[{Q}a{Q},[1,[]],{{k:[]}}],o:{{}}}}"),
     None, None, [("search", {"filters": {"lang": "en", "since": {"Month": 3, "year": 2024}},
                              "tags": ["a", [1, []], {"k": []}], "o": {}})]),
    ("string_with_syntax_characters",
     call(f"call:write{{text:{Q}a{{b}}, c: d \"q\" 'r' [x]\nline 2\\n {Q},empty:{Q}{Q}}}"),
     None, None, [("write", {"text": "a{b}, c: d \"q\" 'r' [x]\nline 2\\n ", "empty": ""})]),
    ("numbers",
     call("call:n{a:42,b:-7,c:3.14,d:1.5e10,e:-2.5E-3,f:0,g:2.0,h:1e+20}"),
     None, None, [("n", {"a": 42, "b": -7, "c": 3.14, "d": 1.5e10, "e": -2.5e-3, "f": 0, "g": 2.0, "h": 1e20})]),
    ("booleans_and_null",
     call("call:flags{t:true,f:false,n:null,list:[true,null]}"),
     None, None, [("flags", {"t": True, "f": False, "n": None, "list": [True, None]})]),
    ("python_literals_of_older_templates", call("call:flags{t:True,n:None}"),
     None, None, [("flags", {"t": True, "n": None})]),
    ("empty_arguments", call("call:ping{}") + "<|tool_response>", None, None, [("ping", {})]),
    ("unicode", call(f"call:t{{s:{Q}장미 😊{Q}}}"), None, None, [("t", {"s": "장미 😊"})]),
    ("thought_call_content",
     "<|channel>thought\nThe user wants weather.\n<channel|>Let me check." + call(f"call:w{{q:{Q}x{Q}}}")
     + "<|tool_response>",
     "The user wants weather.", "Let me check.", [("w", {"q": "x"})]),
    ("thought_then_answer",
     "<|channel>thought\nThinking Process:\n\n1. Add.<channel|>2 + 2 = 4.<turn|>",
     "Thinking Process:\n\n1. Add.", "2 + 2 = 4.", []),
    ("thought_then_call_without_channel_close",  # vLLM: <|tool_call> ends an open thought
     "<|channel>thought\nneed data" + call("call:f{}"), "need data", None, [("f", {})]),
    ("unterminated_thought", "<|channel>thought\nStill thinking about the", "Still thinking about the", None, []),
    ("bare_label_unterminated_thought", "<|channel>thought", None, None, []),
    ("ghost_empty_thought_block", "<|channel>thought\n<channel|>Hello!<turn|>", None, "Hello!", []),
    ("ghost_block_bare_label", "<|channel>thought<channel|>Hi", None, "Hi", []),
    ("ghost_trailing_block", "Hello!<|channel>thought\n<channel|>", None, "Hello!", []),
    ("bare_thought_label_prefix", "thought\nThe sky is blue.<turn|>", None, "The sky is blue.", []),
    ("thought_word_in_text", "thoughtful answer: I thought\nso", None, "thoughtful answer: I thought\nso", []),
    ("stray_channel_close", "Hello<channel|><turn|>", None, "Hello", []),
    ("two_thought_blocks",
     "<|channel>thought\nA\n<channel|>Intro <|channel>thought\nB<channel|> end<turn|>", "A\n\nB", "Intro  end", []),
    ("malformed_call_verbatim", "Sure." + call("call:f{a:}") + "<|tool_response>",
     None, "Sure." + call("call:f{a:}"), []),
    ("unterminated_call_verbatim", f"Sure. <|tool_call>call:f{{a:{Q}x", None, f"Sure. <|tool_call>call:f{{a:{Q}x", []),
    ("unterminated_string_stops_at_close_marker", call(f"call:f{{a:{Q}x}}") + call("call:g{}"),
     None, call(f"call:f{{a:{Q}x}}"), [("g", {})]),
    ("call_without_name", call("call:{a:1}"), None, call("call:{a:1}"), []),
    ("garbage_after_arguments", call("call:f{a:1} and more"), None, call("call:f{a:1} and more"), []),
    ("positional_arguments", call(f"call:f({Q}x{Q})"), None, call(f"call:f({Q}x{Q})"), []),
    ("empty_call_at_end", "Hi <|tool_call>", None, "Hi <|tool_call>", []),
    ("eos_instead_of_tool_response", call("call:f{a:1}") + "<eos>", None, None, [("f", {"a": 1})]),
    ("turn_instead_of_call_close", "<|tool_call>call:f{a:1}<turn|>", None, None, [("f", {"a": 1})]),
    ("call_close_missing_at_end", "<|tool_call>call:f{a:1}", None, None, [("f", {"a": 1})]),
    ("next_call_without_close", "<|tool_call>call:f{a:1}" + call("call:g{}"), None, None, [("f", {"a": 1}), ("g", {})]),
    ("bare_colon_head", call(":f{a:1}"), None, None, [("f", {"a": 1})]),
    ("paren_instead_of_brace", call("call:f(a:1,b:[2])"), None, None, [("f", {"a": 1, "b": [2]})]),
    ("whitespace_inside_body", call("call:f{ a: 1, b: [ 1 , 2 ] ,c :{ } }"), None, None,
     [("f", {"a": 1, "b": [1, 2], "c": {}})]),
    ("quoted_keys", call(f'call:f{{{Q}a b{Q}:1,"c":{Q}d{Q}}}'), None, None, [("f", {"a b": 1, "c": "d"})]),
    ("dotted_name", call(f"call:fs.read{{path:{Q}README.md{Q}}}"), None, None, [("fs.read", {"path": "README.md"})]),
    ("lt_not_a_marker", "if a < b and c <| d: print('<|image|> <tool_call <b>') <|", None,
     "if a < b and c <| d: print('<|image|> <tool_call <b>') <|", []),
    ("text_after_stop_token_kept", "A<turn|>B", None, "AB", []),
    ("only_whitespace_and_stop", "  \n <turn|>", None, None, []),
    ("empty", "", None, None, []),
    ("content_before_and_after_call", f"Checking.\n{call('call:f{}')}\nDone.", None, "Checking.\n\nDone.", [("f", {})]),
]


@pytest.mark.parametrize("case", TRANSCRIPTS, ids=[c["id"] for c in TRANSCRIPTS])
def test_transcript(case):
    expected = case["expected"]
    calls = [(c["name"], json.dumps(c["arguments"], sort_keys=True)) for c in expected["tool_calls"]]
    assert as_plain(parse_output(case["completion"])) == (expected["reasoning"], expected["content"], calls)


@pytest.mark.parametrize("case", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_case(case):
    _, text, reasoning, content, calls = case
    calls = [(name, json.dumps(arguments, sort_keys=True)) for name, arguments in calls]
    assert as_plain(parse_output(text)) == (reasoning, content, calls)


ALL_TEXTS = [(c["id"], c["completion"]) for c in TRANSCRIPTS] + [(c[0], c[1]) for c in HAND_CASES]


def stream(chunks):
    parser = StreamParser()
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    for d in deltas:
        assert d.kind in ("reasoning", "content", "tool_call")
        assert (d.tool_call is not None) if d.kind == "tool_call" else (d.text != "")
    return merge_deltas(deltas)


@pytest.mark.parametrize("name,text", ALL_TEXTS, ids=[t[0] for t in ALL_TEXTS])
def test_any_chunking_gives_parse_output(name, text):
    expected = parse_output(text)
    assert stream(list(text)) == expected  # one character at a time
    if len(text) <= 400:
        for cut in range(len(text) + 1):
            assert stream([text[:cut], text[cut:]]) == expected, cut
    rng = random.Random(name)
    for _ in range(200):
        n_cuts = rng.randint(1, max(1, min(len(text), 40)))
        cuts = sorted(rng.choices(range(len(text) + 1), k=n_cuts))  # repeated cuts give empty chunks
        bounds = [0, *cuts, len(text)]
        assert stream([text[a:b] for a, b in zip(bounds, bounds[1:])]) == expected, cuts


def test_content_streams_promptly():
    parser = StreamParser()
    assert parser.feed("Hello") == [Delta("content", "Hello")]
    assert parser.feed(", wor") == [Delta("content", ", wor")]
    assert parser.feed("ld <|tool_ca") == [Delta("content", "ld")]  # " <|tool_ca" may be a call or a space
    assert parser.feed("t is here") == [Delta("content", " <|tool_cat is here")]
    assert parser.feed(" <") == []
    assert parser.finish() == [Delta("content", " <")]


def test_reasoning_and_calls_stream_in_order():
    parser = StreamParser()
    assert parser.feed("<|channel>thou") == []  # might still be the channel label
    assert parser.feed("ght\nStep 1") == [Delta("reasoning", "Step 1")]
    assert parser.feed("<channel|>" + "<|tool_call>call:f{a:") == []
    (delta,) = parser.feed("1}<tool_call|>")
    assert delta.kind == "tool_call" and delta.tool_call == ToolCall("f", {"a": 1})
    assert parser.feed("<|tool_response>") == [] and parser.finish() == []


def test_tool_call_openai_form():
    first, second = parse_output(call(f"call:f{{city:{Q}Zürich{Q},n:2.0}}") + call("call:g{}")).tool_calls
    openai = first.to_openai()
    assert openai["type"] == "function" and openai["id"] == first.id and first.id.startswith("call_")
    assert openai["function"] == {"name": "f", "arguments": '{"city": "Zürich", "n": 2.0}'}
    assert first.id != second.id
    assert json.loads(second.to_openai()["function"]["arguments"]) == {}


def test_top_level_export():
    assert top_level_parse_output is parse_output
