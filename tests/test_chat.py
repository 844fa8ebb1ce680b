"""The public chat API: LLM.render_chat, LLM.chat, gemma4.parse_output, and `gemma4 chat` in a terminal."""
import json
import subprocess
import sys

import jsonschema
import pytest

import gemma4
from gemma4.llm import LLM

CASES = json.load(open(__file__.rsplit("/", 1)[0] + "/data/template-cases.json", encoding="utf-8"))


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the built-in tiny model: E2B-like, so the e-series template


@pytest.mark.parametrize("case", [c for c in CASES if "e-series" in c["template"] and c["expected"]
                                  and c["conversation"] in ("plain_single_user", "system_prompt_string",
                                                            "thinking_on_plain", "tools_simple")][:6],
                         ids=lambda c: c["id"])
def test_render_chat_is_the_official_template(llm, case):
    assert llm.render_chat(case["messages"], tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                           enable_thinking=case["enable_thinking"]) == case["expected"]


def test_chat_json_schema_and_tool_choice(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = llm.chat([{"role": "user", "content": "Answer in JSON"}], temperature=1.0, seed=0, max_new_tokens=40,
                 response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    jsonschema.validate(json.loads(r.content), schema)
    assert r.finish_reason == "stop" and r.prompt_tokens > 0 and r.completion_tokens > 0
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}}
    r = llm.chat([{"role": "user", "content": "2+3?"}], tools=[tool], temperature=1.0, seed=1, max_new_tokens=60,
                 tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.finish_reason == "tool_calls" and r.tool_calls[0].name == "add"
    assert set(r.tool_calls[0].arguments) == {"a", "b"}
    assert llm.engine.memory()["used_bytes"] == 0


def test_parse_output_api():
    out = gemma4.parse_output('<|channel>thought\nhmm<channel|>Sure.<|tool_call>call:f{x:1}<tool_call|>')
    assert (out.reasoning_content, out.content) == ("hmm", "Sure.")
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", {"x": 1})]


BAD = [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], tool_choice="required"), "tools"),
    (dict(messages=[{"role": "user", "content": "x"}], response_format={"type": "yaml"}), "response_format"),
    (dict(messages=[{"role": "user", "content": "x"}], image_budget=100), "image_budget"),
    (dict(messages=[{"role": "user", "content": "a " * 131072}]), "the context is 131072"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_chat_bad_input(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.chat(**kwargs)
    with pytest.raises(ValueError, match=message):  # before anything is queued: nothing to clean up
        llm.chat_events(**kwargs)
    assert not llm.engine.has_work()


def test_chat_events_stream_the_turn_and_cancel(llm):
    """chat_events (the streaming chat CLI's path) yields the tokens `chat` returns; leaving early cancels."""
    messages = [{"role": "user", "content": "Hello"}]
    r = llm.chat(messages, max_new_tokens=6, temperature=0)
    req, events = llm.chat_events(messages, max_new_tokens=6, temperature=0)
    tokens = [token for token, _ in events]
    assert req.prompt_ids == llm.tokenizer.encode(llm.render_chat(messages))
    assert llm.tokenizer.decode(tokens) == r.text and len(tokens) == r.completion_tokens
    _, events = llm.chat_events(messages, max_new_tokens=6)
    next(events)
    assert llm.engine.memory()["used_bytes"] > 0
    events.close()  # as Ctrl-C in `gemma4 chat` does
    assert llm.engine.memory()["used_bytes"] == 0 and not llm.engine.has_work()


def test_cli_chat_session():
    script = "/think\nHello\n/image /no/such/file.png\n/reset\n/bogus\n" + "a " * 131072 + "\nHi\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "gemma4.cli", "chat", "--max-new-tokens", "4"], input=script,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(thinking on)" in r.stdout and "(no such file" in r.stdout and "(history cleared)" in r.stdout
    assert "unknown command" in r.stdout
    assert "(error: the prompt has 131" in r.stdout  # a message past the context: an error line, not a traceback
