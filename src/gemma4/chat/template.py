"""Chat templates: turn a conversation into the Gemma 4 prompt text.

The official prompt format is defined by the Jinja chat templates shipped with the checkpoints, so we do not
re-implement it: we run the template exactly as transformers 5.x does (`utils/chat_template_utils.py`):

* an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols` extension, a
  no-op `{% generation %}` tag, a `tojson` filter that does not HTML-escape, and the globals `raise_exception`,
  `strftime_now`, a `dict` and a `namespace` that refuses underscore attributes;
* every input rebuilt from plain JSON types (rich objects become inert `"<TypeName>"` strings), and a message's
  `reasoning` / `thinking` / `reasoning_content` copied onto each other, as transformers does before rendering.

Around that sit input checks with readable errors (`ChatTemplateError`), the conversion of OpenAI content parts
into the parts the Gemma templates understand (`normalize_messages`), and the choice of template for a checkpoint
(`template_family`, `load_chat_template`). The two 2026-07-09 templates ship in `gemma4/data/templates/`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime
from importlib import resources

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

FAMILIES = ("e-series", "large")
BUILTIN_REVISION = "2026-07-09"
MEDIA_KINDS = ("image", "audio", "video")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: bad input, or the template failed or raised."""


# ----------------------------------------------------------------------------------------------------------------
# The Jinja environment (a copy of transformers' `_cached_compile_jinja_template`)


class _TemplateRaised(jinja2.TemplateError):
    """Raised by the template's own `raise_exception(...)`; kept apart to report its message verbatim."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson escapes <, >, & and ' and sorts keys (it is meant for HTML); templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # Only the constructor and fromkeys, not the `dict` type itself, so that templates cannot reach type internals.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Templates are untrusted code from the Hub: refuse underscore names on namespaces, as transformers does.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]  # Jinja's own signature trick, so that namespace(self=...) works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks assistant text with `{% generation %}…{% endgeneration %}` to build training masks. We never
    # build masks, but a template that uses the tag must still compile, so the tag just renders its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # Compiling an 18 KB template takes ~150 ms, rendering it <1 ms; a server reuses one or two templates.
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from None


# ----------------------------------------------------------------------------------------------------------------
# What the template gets to see (transformers' `_plain_template_data` and `_alias_reasoning_fields`)


def _plain(value):
    """Rebuild `value` from JSON types; anything else becomes "<TypeName>".

    The sandbox does not know which methods of arbitrary objects (images, arrays, tensors) are dangerous, and the
    templates only test whether media keys are present, so nothing they render changes."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry extra methods: strip them
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) would otherwise become a truthy "<bool_>"
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    # Clients send a past thought under different names; templates read `reasoning_content` (T-JUL also `reasoning`).
    out = []
    for m in messages:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Input checks


ROLES = ("system", "developer", "user", "assistant", "model", "tool")  # "model": Gemma's own name for assistant


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] needs a string 'role', got {m.get('role')!r}")
        if m["role"] not in ROLES:  # the template would write any string as a turn header
            raise ChatTemplateError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r:.40}")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise ChatTemplateError(
                        f"messages[{i}].content[{j}] must be a dict with a string 'type', got {part!r:.80}")
        elif isinstance(content, Mapping):
            # A tool result may be a JSON object: the templates print it as response:name{key:value,...}.
            if m["role"] != "tool":
                raise ChatTemplateError(f"messages[{i}].content may be a dict only in a tool message")
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{i}].content must be a string, a list of parts or None, got {type(content).__name__}")


def _check_tools(tools) -> list[dict] | None:
    """Validate the tool list; bare function dicts are wrapped as {"type": "function", "function": {...}},
    because every Gemma 4 template reads tool['function']['name']."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list of tool dicts or None, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] must be a dict (a JSON schema), got {type(tool).__name__}")
        if "function" in tool:
            function = tool["function"]
            if tool.get("type", "function") != "function":
                raise ChatTemplateError(f"tools[{i}] has type {tool['type']!r}; only 'function' tools are supported")
            if not isinstance(function, Mapping):
                raise ChatTemplateError(f"tools[{i}].function must be a dict, got {type(function).__name__}")
        elif tool.get("type") == "function":
            raise ChatTemplateError(f"tools[{i}] has type 'function' but no 'function' object")
        else:
            function = tool
            tool = {"type": "function", "function": function}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ChatTemplateError(f"tools[{i}] has no function name")
        params = function.get("parameters")
        if params is not None:  # OpenAI's rule: a JSON schema of an object (the arguments), as the templates read
            where = f"tools[{i}] ({name}).parameters"
            if not isinstance(params, Mapping) or params.get("type", "object") != "object":
                raise ChatTemplateError(f"{where} must be a JSON schema of type object")
            if not isinstance(params.get("properties", {}), Mapping) or \
                    not all(isinstance(v, Mapping) for v in params.get("properties", {}).values()):
                raise ChatTemplateError(f"{where}.properties must map each argument name to its JSON schema")
            required = params.get("required", [])
            if not isinstance(required, (list, tuple)) or not all(isinstance(r, str) for r in required):
                raise ChatTemplateError(f"{where}.required must be a list of argument names")
        out.append(tool)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def render(template: str, messages, tools=None, add_generation_prompt: bool = True, enable_thinking: bool = False,
           bos_token: str = "<bos>", **extra) -> str:
    """Render `messages` (and `tools`) with the Jinja chat `template`, byte for byte as transformers does.

    `extra` becomes further template variables (e.g. `preserve_thinking=True`). Bad input, a template that does not
    compile, fails, or calls `raise_exception(...)` all raise ChatTemplateError."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"template must be a string, got {type(template).__name__}")
    _check_messages(messages)
    tools = _check_tools(tools)
    compiled = _compile(template)
    variables = {"documents": None, **_plain(extra)}  # transformers always passes `documents`
    try:
        return compiled.render(
            messages=_alias_reasoning(_plain(list(messages))), tools=_plain(tools),
            add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, bos_token=bos_token,
            **variables)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template rejected the input: {e.message}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        # Plain Python errors inside template expressions, e.g. `'call:' + name` with a non-string name.
        raise ChatTemplateError(f"chat template failed on this input: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# OpenAI content parts -> Gemma template parts


def _url(value, where: str):
    # OpenAI sends {"url": ...}; some clients send the URL string directly.
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise ChatTemplateError(f"{where} needs a url")
    return url


def _convert_part(part: Mapping, where: str) -> tuple[dict, dict | None]:
    """One content part -> (the part the template sees, the media item or None)."""
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}: a text part needs a string 'text'")
        return copy.deepcopy(dict(part)), None
    if kind == "image_url":
        return {"type": "image"}, {"kind": "image", "source": _url(part.get("image_url"), f"{where}.image_url")}
    if kind == "video_url":
        return {"type": "video"}, {"kind": "video", "source": _url(part.get("video_url"), f"{where}.video_url")}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, Mapping) or not isinstance(audio.get("data", ""), str):
            raise ChatTemplateError(f"{where}: an input_audio part needs input_audio.data (base64)")
        # Empty data renders the placeholder as the official template does (rendering needs no audio bytes);
        # running the model needs them (gemma4.chat.request).
        item = {"kind": "audio", "source": audio.get("data") or None, "base64": True}
        if audio.get("format"):  # base64 data does not say how it is encoded
            item["format"] = audio["format"]
        return {"type": "audio"}, item
    if kind in MEDIA_KINDS:
        # Native parts: {"type": "image", "image": <url, path or object>} (also "url"/"path"); the placeholder-only
        # form {"type": "image"} is valid too, leaving the source to the caller.
        source = next((part[k] for k in (kind, "url", "path") if part.get(k) is not None), None)
        return {"type": kind}, {"kind": kind, "source": source}
    raise ChatTemplateError(
        f"{where}: unknown content part type {kind!r} (expected text, image_url, input_audio, video_url, "
        "image, audio or video)")


def normalize_messages(messages) -> tuple[list[dict], list[dict]]:
    """Convert OpenAI content parts into Gemma template parts, and pull the media out in prompt order.

    Returns (messages, media): a converted deep copy of `messages`, and one `{"kind": "image"|"audio"|"video",
    "source": ...}` per media placeholder the template will write (input_audio items also carry "format").
    The order follows the 2026-07-09 templates: `role:"tool"` messages are rendered inside the preceding assistant
    message that made the calls, *before* that message's own content, so their media come first. Media that the
    template would drop (in the leading system message, or in a tool message that answers no call) are refused
    rather than silently lost."""
    _check_messages(messages)
    converted, media = [], []
    for i, m in enumerate(messages):
        # Media objects are moved into `media`, not deep-copied (they may be large arrays or open files).
        new = {k: copy.deepcopy(v) if k != "content" else None for k, v in m.items()}
        items = []
        if isinstance(m.get("content"), (list, tuple)):
            parts = []
            for j, part in enumerate(m["content"]):
                p, item = _convert_part(part, f"messages[{i}].content[{j}]")
                parts.append(p)
                if item is not None:
                    items.append(item)
            new["content"] = parts
        elif "content" in m:
            new["content"] = copy.deepcopy(m["content"])
        converted.append(new)
        media.append(items)

    first = 0
    if converted[0]["role"] in ("system", "developer"):
        # The template writes only the text parts of a leading system message.
        if media[0]:
            raise ChatTemplateError("messages[0]: the system message cannot hold media (the template drops them)")
        first = 1
    ordered, consumed = [], set()
    for i in range(first, len(converted)):
        m = converted[i]
        if m["role"] == "tool":
            if media[i] and i not in consumed:
                raise ChatTemplateError(
                    f"messages[{i}]: this tool message answers no assistant tool_calls, so the template drops it "
                    "and its media")
            continue
        if m.get("tool_calls") and not m.get("tool_responses"):
            # The template's forward scan: the run of tool messages right after this one is rendered here.
            j = i + 1
            while j < len(converted) and converted[j]["role"] == "tool":
                ordered += media[j]
                consumed.add(j)
                j += 1
        ordered += media[i]
    return converted, ordered


# ----------------------------------------------------------------------------------------------------------------
# Which template


def template_family(config) -> str:
    """"e-series" for E2B/E4B (the models with per-layer embeddings), else "large" (26B-A4B, 31B).

    `config` is a gemma4.config.ModelConfig or TextConfig; `ple_dim` is `hidden_size_per_layer_input`."""
    text = getattr(config, "text", config)
    ple_dim = getattr(text, "ple_dim", None)
    if not isinstance(ple_dim, int):
        raise TypeError(f"expected a ModelConfig or TextConfig, got {type(config).__name__}")
    return "e-series" if ple_dim > 0 else "large"


def builtin_template(family: str) -> str:
    """The 2026-07-09 template of `family`, as shipped in gemma4/data/templates/."""
    if family not in FAMILIES:
        raise ChatTemplateError(f"unknown template family {family!r}; expected one of {FAMILIES}")
    name = f"chat_template.{family}.{BUILTIN_REVISION}.jinja"
    # Bytes, not read_text(): the template must reach Jinja unchanged.
    return (resources.files("gemma4") / "data" / "templates" / name).read_bytes().decode("utf-8")


def load_chat_template(checkpoint_dir: str | os.PathLike | None, family: str) -> str:
    """The checkpoint's chat template, else the built-in one of `family`.

    Order (that of transformers): `chat_template.jinja`; then `chat_template` in `tokenizer_config.json`, a string or
    a list of {"name", "template"} of which "default" is used; then the built-in 2026-07-09 template."""
    if family not in FAMILIES:
        raise ChatTemplateError(f"unknown template family {family!r}; expected one of {FAMILIES}")
    if checkpoint_dir is None:
        return builtin_template(family)
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise ChatTemplateError(f"checkpoint directory {checkpoint_dir!r} does not exist")

    jinja_file = os.path.join(checkpoint_dir, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:  # text mode, as transformers reads it
            return f.read()

    config_file = os.path.join(checkpoint_dir, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"{config_file} is not valid JSON: {e}") from None
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if isinstance(named.get("default"), str):
                return named["default"]
            # transformers refuses this too: we cannot guess which of the named templates is meant.
            raise ChatTemplateError(f"{config_file} has chat templates {sorted(map(str, named))} but no 'default'")
        if template is not None:
            raise ChatTemplateError(f"{config_file}: chat_template must be a string or a list of named templates")
    return builtin_template(family)
