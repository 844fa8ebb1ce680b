"""From an OpenAI-style chat request to what the engine runs, and from its tokens back to a chat message.
Shared by `LLM.chat` and the server: messages -> template -> media expansion -> token ids, the constraint that
`tool_choice` / `response_format` ask for, and the parse of the output."""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

from .. import media as mm
from .fetch import fetch
from .template import normalize_messages, render

BUDGETS = (70, 140, 280, 560, 1120)


@dataclass
class MediaPolicy:
    """Where media may come from. Data URLs and bytes always; files only under `local_dir` (None: none,
    "/" : any); http(s) only when `remote` is set (the server's --allow-local-media / --allow-remote-media), from
    public addresses only, at most `max_remote_bytes` within `fetch_timeout` seconds (chat/fetch.py)."""
    local_dir: str | None = None
    remote: bool = False
    max_remote_bytes: int = 50 << 20
    fetch_timeout: float = 20.0


@dataclass
class PreparedChat:
    prompt: str  # the rendered prompt, media expanded
    prompt_ids: list[int]
    media: list = field(default_factory=list)  # processed media items (gemma4.media), in prompt order
    constraint: object = None  # a gemma4.chat.constrain.Constraint, or None
    stop_ids: tuple[int, ...] | None = None  # the constraint's stop tokens (None: the model's)


def _source(item: dict, policy: MediaPolicy):
    src = item["source"]
    if item.get("base64") and isinstance(src, str) and not src.startswith("data:"):
        # OpenAI input_audio carries bare base64 and a format (a native audio part a path or URL)
        try:
            return base64.b64decode(src, validate=True)
        except ValueError:
            raise mm.MediaError("input_audio.data must be base64") from None
    if not isinstance(src, str) or src.startswith("data:"):
        return src
    if src.startswith(("http://", "https://")):
        if not policy.remote:
            raise mm.MediaError("remote media URLs are not fetched (start the server with --allow-remote-media)")
        return fetch(src, policy.max_remote_bytes, policy.fetch_timeout)
    path = src[len("file://"):] if src.startswith("file://") else src
    if policy.local_dir is None:
        raise mm.MediaError("local media paths are not allowed (start the server with --allow-local-media DIR)")
    root = os.path.realpath(policy.local_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise mm.MediaError(f"media path {path!r} is outside the allowed directory")
    return real


def load_media(item: dict, budget: int | None, policy: MediaPolicy):
    """One `{"kind", "source"}` from normalize_messages -> a processed gemma4.media input."""
    if item["source"] is None:
        raise mm.MediaError(f"a{'n' if item['kind'][0] in 'ai' else ''} {item['kind']} part has no data: give "
                            f"the {'base64 data' if item.get('base64') else 'url, path or data'} to run the model")
    src = _source(item, policy)
    if item["kind"] == "image":
        return mm.preprocess_image(src, budget or mm.DEFAULT_IMAGE_BUDGET)
    if item["kind"] == "audio":
        return mm.preprocess_audio(src)
    return mm.load_video(src)


def make_constraint(tools, tool_choice, response_format):
    """The grammar `tool_choice` ("required" / a named function) or `response_format` (json_object /
    json_schema) asks for, or None. Bad values raise ValueError."""
    from . import constrain

    if tool_choice not in (None, "auto", "none"):
        if not tools:
            raise ValueError("tool_choice needs tools")
        if tool_choice == "required":
            return constrain.tool_call(tools)
        if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            name = tool_choice["function"].get("name")
            names = [(t.get("function") or t).get("name") for t in tools]
            if name not in names:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools {names}")
            return constrain.tool_call(tools, name=name, max_calls=1)  # OpenAI: that function, called once
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return constrain.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return constrain.json_schema(schema)
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _arguments_as_objects(messages):
    """OpenAI clients send back a call's `arguments` as a JSON string; the Gemma template wants the object."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list) and any(isinstance((c or {}).get("function", {}).get("arguments"), str)
                                           for c in calls if isinstance(c, dict)):
            fixed = []
            for j, c in enumerate(calls):
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") \
                            from None
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


@dataclass
class RenderedChat:
    """A chat request checked and rendered, before its media are loaded (`render_request`)."""
    text: str  # the rendered prompt, one bare placeholder per media item
    media: list  # one {"kind", "source", ...} per placeholder, in prompt order (template.normalize_messages)
    image_budget: int | None
    constraint: object = None
    stop_ids: tuple[int, ...] | None = None


def render_request(llm, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
                   image_budget: int | None = None, add_generation_prompt: bool = True) -> RenderedChat:
    """Check a chat request and render its prompt; nothing is fetched or decoded yet, and media of a kind the
    model does not take are refused here, before any bytes are read. Problems raise ValueError (ChatTemplateError
    and MediaError are ValueErrors) with a message fit for the user."""
    if image_budget is not None and image_budget not in BUDGETS:
        raise ValueError(f"image_budget must be one of {BUDGETS}, got {image_budget!r}")
    if tool_choice == "none":
        tools = None  # as vLLM: the model is not told about tools it may not call
    constraint = make_constraint(tools, tool_choice, response_format)
    msgs, media = normalize_messages(_arguments_as_objects(messages))
    if any(m["kind"] == "audio" for m in media) and llm.config.audio is None:
        raise mm.MediaError("this model takes no audio (only Gemma 4 E2B / E4B have an audio encoder)")
    if llm.config.vision is None and any(m["kind"] != "audio" for m in media):
        raise mm.MediaError("this checkpoint has no vision encoder")
    text = render(llm.chat_template, msgs, tools, add_generation_prompt=add_generation_prompt,
                  enable_thinking=enable_thinking)
    return RenderedChat(text, media, image_budget, constraint, constraint.stop_ids if constraint else None)


def encode_prompt(tokenizer, text: str, max_tokens: int | None = None, add_bos: bool = False) -> list[int]:
    """text -> token ids; ValueError when they cannot be at most `max_tokens`, decided from the text's length
    alone when it shows that (a 20 MB body is refused at once, not after tokenizing 10M tokens)."""
    if max_tokens is not None:
        least = tokenizer.min_tokens(text) + add_bos
        if least > max_tokens:
            raise ValueError(f"the prompt has at least {least} tokens ({len(text)} characters); at most {max_tokens} "
                             f"fit in the context")
    return tokenizer.encode(text, add_bos=add_bos)


def finish_request(llm, chat: RenderedChat, items: list, max_tokens: int | None = None) -> PreparedChat:
    """The rendered chat with its loaded media (`load_media` of each `chat.media`) -> the tokens to run."""
    prompt = mm.expand_media_tokens(chat.text, items) if items else chat.text
    ids = encode_prompt(llm.tokenizer, prompt, max_tokens)
    if not ids or ids[0] != llm.tokenizer.bos_id:  # a checkpoint's own template may leave <bos> out
        ids = [llm.tokenizer.bos_id, *ids]
    return PreparedChat(prompt, ids, items, chat.constraint, chat.stop_ids)


def prepare_chat(llm, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
                 image_budget: int | None = None, policy: MediaPolicy | None = None,
                 add_generation_prompt: bool = True, max_tokens: int | None = None) -> PreparedChat:
    """Everything before generation, in one call (the server runs the three steps apart, media on their own
    workers); every problem with the request raises ValueError with a message fit for the user."""
    chat = render_request(llm, messages, tools, tool_choice, response_format, enable_thinking, image_budget,
                          add_generation_prompt)
    items = [load_media(m, image_budget, policy or MediaPolicy(local_dir="/")) for m in chat.media]
    return finish_request(llm, chat, items, max_tokens)
