"""Chat template rendering (gemma4.chat.template).

Fixtures in tests/data (copied from the shared reference folder, byte-exact):
* template-cases.json: 158 renderings of the 2026-07-09 templates made with transformers 5.23 (the oracle);
* transcripts.json: real google/gemma-4-E2B-it prompts, each naming the template files that reproduce it;
* templates/: the six older template revisions (the 2026-07-09 pair ships in gemma4/data/templates).
"""
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest

from gemma4.chat.template import (
    ChatTemplateError, builtin_template, load_chat_template, normalize_messages, render, template_family)
from gemma4.config import load_config

DATA = os.path.join(os.path.dirname(__file__), "data")
with open(os.path.join(DATA, "template-cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)
with open(os.path.join(DATA, "transcripts.json"), encoding="utf-8") as f:
    TRANSCRIPTS = json.load(f)


def template_file(name):
    """A template by file name: the shipped 2026-07-09 pair, or an older revision from tests/data/templates."""
    family, revision = name.split(".")[1:3]
    if revision == "2026-07-09":
        return builtin_template(family)
    with open(os.path.join(DATA, "templates", name), "rb") as f:
        return f.read().decode("utf-8")


ALL_TEMPLATES = [f"chat_template.{fam}.{rev}.jinja" for fam in ("e-series", "large")
                 for rev in ("2026-04-02", "2026-04-10", "2026-04-29", "2026-07-09")]


# ---------------------------------------------------------------------------------------------------------------
# The oracle cases


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_template_case(case):
    template = builtin_template(case["template"].split(".")[1])
    kwargs = dict(tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                  enable_thinking=case["enable_thinking"])
    if case["expected"] is None:
        with pytest.raises(ChatTemplateError) as e:
            render(template, case["messages"], **kwargs)
        assert case["error"].split(": ", 1)[1] in str(e.value)  # the template's own message comes through
    else:
        assert render(template, case["messages"], **kwargs) == case["expected"]


def test_shipped_templates_are_byte_exact():
    # md5 of the official 2026-07-09 files (shared README); nothing may reformat them.
    md5 = {"e-series": "620f2fc5b30fd4138422dd0163ff9bb3", "large": "93ecd2c7005e9864e483adb385006f84"}
    for family, digest in md5.items():
        assert hashlib.md5(builtin_template(family).encode("utf-8")).hexdigest() == digest


# ---------------------------------------------------------------------------------------------------------------
# Real transcripts


def collapse_media(prompt):
    """Undo the processor's expansion of media placeholders and add the <bos> that dialog-built prompts lack."""
    prompt = re.sub(r"<\|audio>(?:<\|audio\|>)+<audio\|>", "<|audio|>", prompt)
    frame = r"\d\d:\d\d <\|image>(?:<\|video\|>)+<image\|>"  # one video frame; frames are joined by a space
    prompt = re.sub(rf"{frame}(?: {frame})*", "<|video|>", prompt)
    prompt = re.sub(r"<\|image>(?:<\|image\|>)+<image\|>", "<|image|>", prompt)
    return prompt if prompt.startswith("<bos>") else "<bos>" + prompt


RENDERABLE = [t for t in TRANSCRIPTS if t.get("template_match")]


@pytest.mark.parametrize("transcript", RENDERABLE, ids=[t["id"] for t in RENDERABLE])
def test_transcript_prompt(transcript):
    messages, media = normalize_messages(transcript["messages"])
    expected = collapse_media(transcript["prompt"])
    matches = {name for name in ALL_TEMPLATES
               if render(template_file(name), messages, transcript["tools"], **transcript["render_kwargs"]) == expected}
    # Exactly the listed revisions reproduce the real prompt (e.g. only 2026-04-02 wraps video in blank lines).
    assert matches == set(transcript["template_match"])
    sources = [p[p["type"]] for m in transcript["messages"] if isinstance(m["content"], list)
               for p in m["content"] if p["type"] != "text"]
    assert [m["source"] for m in media] == sources
    assert sum(expected.count(f"<|{kind}|>") for kind in ("image", "audio", "video")) == len(media)


# ---------------------------------------------------------------------------------------------------------------
# normalize_messages

PNG = "data:image/png;base64,iVBORw0KGgo="


def test_normalize_openai_parts():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
            {"type": "image_url", "image_url": PNG},  # some clients send the URL string directly
        ]},
    ]
    before = json.dumps(messages)
    out, media = normalize_messages(messages)
    assert json.dumps(messages) == before  # the input is untouched
    assert out[0] == messages[0] and out[0] is not messages[0]
    assert out[1]["content"] == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "audio"},
                                 {"type": "video"}, {"type": "image"}]
    assert media == [{"kind": "image", "source": "https://x/a.png"},
                     {"kind": "audio", "source": "UklGRg==", "base64": True, "format": "wav"},
                     {"kind": "video", "source": "file:///v.mp4"},
                     {"kind": "image", "source": PNG}]
    # (a system message given as parts keeps a space after each part: template behaviour, case system_list_parts)
    assert render(builtin_template("e-series"), out) == (
        "<bos><|turn>system\nBe brief. <turn|>\n<|turn>user\nCompare<|image|><|audio|><|video|><|image|><turn|>\n"
        "<|turn>model\n")


def test_normalize_native_parts_keep_objects():
    image = object()  # e.g. a PIL image: passed through by identity, never copied
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "audio", "url": "a.wav"},
                                             {"type": "video", "path": "/v.mp4"}, {"type": "image"}]}]
    out, media = normalize_messages(messages)
    assert out[0]["content"] == [{"type": "image"}, {"type": "audio"}, {"type": "video"}, {"type": "image"}]
    assert [m["kind"] for m in media] == ["image", "audio", "video", "image"]
    assert media[0]["source"] is image and [m["source"] for m in media[1:]] == ["a.wav", "/v.mp4", None]


def test_normalize_tool_media_come_before_the_calling_message_content():
    # The template renders role:tool messages inside the preceding assistant message, ahead of its content
    # (case tool_result_with_media: placeholders right after <tool_response|>).
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u1"}}]},
        {"role": "assistant", "content": [{"type": "image", "image": "a1"}],
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "shot", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [
            {"type": "text", "text": "done"}, {"type": "image_url", "image_url": {"url": "t1"}},
            {"type": "input_audio", "input_audio": {"data": "t2"}}]},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "u2"}}]},
    ]
    out, media = normalize_messages(messages)
    assert [m["source"] for m in media] == ["u1", "t1", "t2", "a1", "u2"]
    prompt = render(builtin_template("e-series"), out)
    assert re.findall(r"<\|(image|audio|video)\|>", prompt) == [m["kind"] for m in media]
    assert "response:shot{value:<|\"|>done<|\"|>}<tool_response|><|image|><|audio|><|image|><turn|>" in prompt


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": [{"type": "file", "file": {}}]}], "unknown content part type 'file'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\].image_url needs a url"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5, "format": "wav"}}]}],
     "input_audio.data"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'"),
    ([{"role": "user", "content": ["hi"]}], r"content\[0\] must be a dict"),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}], "system message"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": [{"type": "image"}]}], "answers no"),
])
def test_normalize_errors(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        normalize_messages(messages)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the template


@pytest.mark.parametrize("size, family", [("gemma-4-e2b", "e-series"), ("gemma-4-e4b", "e-series"),
                                          ("gemma-4-26b-a4b", "large"), ("gemma-4-31b", "large")])
def test_template_family(size, family):
    config = load_config(os.path.join(DATA, "configs", size))
    assert template_family(config) == template_family(config.text) == family


def test_load_chat_template_precedence(tmp_path):
    assert load_chat_template(None, "large") == builtin_template("large")
    assert load_chat_template(str(tmp_path), "e-series") == builtin_template("e-series")  # nothing in the dir

    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                    {"name": "default", "template": "D"}]}))
    assert load_chat_template(str(tmp_path), "e-series") == "D"
    config.write_text(json.dumps({"chat_template": "S", "bos_token": "<bos>"}))
    assert load_chat_template(tmp_path, "e-series") == "S"
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert load_chat_template(str(tmp_path), "e-series") == "J{{ bos_token }}"


def test_load_chat_template_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="unknown template family"):
        load_chat_template(None, "medium")
    with pytest.raises(ChatTemplateError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing"), "large")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        load_chat_template(str(tmp_path), "large")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        load_chat_template(str(tmp_path), "large")


# ---------------------------------------------------------------------------------------------------------------
# Bad input

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, messages, tools, match", [
    (None, {"role": "user", "content": "hi"}, None, "messages must be a list"),
    (None, "hi", None, "messages must be a list"),
    (None, [], None, "must not be empty"),
    (None, [{"content": "hi"}], None, r"messages\[0\] needs a string 'role'"),
    (None, [{"role": None, "content": "hi"}], None, "needs a string 'role'"),
    (None, [{"role": "wizard", "content": "hi"}], None, r"messages\[0\].role must be one of system, developer"),
    (None, ["hi"], None, r"messages\[0\] must be a dict"),
    (None, [{"role": "user", "content": 3}], None, "content must be a string, a list of parts or None"),
    (None, [{"role": "user", "content": {"a": 1}}], None, "dict only in a tool message"),
    (None, USER, {"name": "f"}, "tools must be a list"),
    (None, USER, ["get_weather"], r"tools\[0\] must be a dict"),
    (None, USER, [{"type": "function", "function": {"description": "no name"}}], r"tools\[0\] has no function name"),
    (None, USER, [{"description": "bare, no name"}], "has no function name"),
    (None, USER, [{"type": "function"}], "no 'function' object"),
    (None, USER, [{"type": "function", "function": "f"}], "function must be a dict"),
    (None, USER, [{"type": "retrieval", "function": {"name": "f"}}], "only 'function' tools"),
    (None, USER, [{"name": "f", "parameters": "x"}], "parameters must be a JSON schema"),
    ("{{ raise_exception('no system role allowed') }}", USER, None, "rejected the input: no system role allowed"),
    ("{% for m in messages %}", USER, None, "does not compile"),
    ("{{ messages[0].content.nope.deeper }}", USER, None, "UndefinedError"),
    ("{{ 'a' + messages }}", USER, None, "chat template failed"),
    ("{{ messages.__class__.__mro__ }}", USER, None, "SecurityError"),  # the sandbox refuses internals
    ("{% set ns = namespace(x=1) %}{% set ns._y = 2 %}", USER, None, "underscore"),
])
def test_bad_input(template, messages, tools, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        render(template or builtin_template("e-series"), messages, tools)
    assert isinstance(e.value, ValueError)


def test_bare_function_tools_are_wrapped():
    # The Gemma templates read tool['function']; a bare function schema renders like its OpenAI wrapping.
    function = {"name": "ping", "description": "Ping.", "parameters": {"type": "object", "properties": {}}}
    template = builtin_template("large")
    wrapped = render(template, USER, [{"type": "function", "function": function}])
    assert render(template, USER, [function]) == wrapped
    assert '<|tool>declaration:ping{description:<|"|>Ping.<|"|>,parameters:{type:<|"|>OBJECT<|"|>}}<tool|>' in wrapped


def test_environment_extras():
    template = ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|"
                "{{ data | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ custom }}{{ documents }}")
    out = render(template, [{"role": "user", "content": "a<b>"}], bos_token="<s>", data={"z": "é<", "a": 1}, custom=7)
    # Not HTML-escaped and not key-sorted, unlike Jinja's own tojson.
    assert out == 'a<b>|{"z": "é<", "a": 1}|4|<s>7None'


# ---------------------------------------------------------------------------------------------------------------
# Inputs the fixtures do not cover: same bytes as transformers (only a test dependency)


class Blob:
    pass


@dataclasses.dataclass
class Place:
    city: str
    days: int


EXTRA = {
    "thinking_alias": [  # `thinking` is copied to `reasoning_content` before rendering
        {"role": "user", "content": "hi"},
        {"role": "assistant", "thinking": "Use f.",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "x"}],
    "numpy_arguments": [  # numpy scalars become Python ones: np.bool_(False) prints false, not False
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": {"a": np.float32(2.5), "b": np.bool_(False), "c": np.int64(3), "d": None}}}]}],
    "objects": [  # dataclasses become dicts, other objects an inert "<TypeName>"
        {"role": "user", "content": [{"type": "image", "image": Blob()}, {"type": "text", "text": "hi"}]},
        {"role": "assistant",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"p": Place("Oslo", 2)}}}],
         "tool_responses": [{"name": "f", "response": {"img": Blob()}}]}],
}


@pytest.mark.parametrize("name", list(EXTRA))
@pytest.mark.parametrize("family", ["e-series", "large"])
def test_matches_transformers(name, family):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    template = builtin_template(family)
    for thinking in (False, True):
        expected = hf.render_jinja_template([EXTRA[name]], chat_template=template, add_generation_prompt=True,
                                            enable_thinking=thinking, bos_token="<bos>")[0][0]
        assert render(template, EXTRA[name], enable_thinking=thinking) == expected
