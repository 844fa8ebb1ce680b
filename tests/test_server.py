"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1,
with the built-in tiny random model (real tokenizer and template). Where a test needs the model to say
something particular (a thought, a tool call), the sampler is scripted to emit those exact tokens."""
import asyncio
import json
import socket
import threading
import time

import httpx
import jsonschema
import pytest
import uvicorn

openai = pytest.importorskip("openai")

from gemma4.engine import sample  # noqa: E402
from gemma4.llm import LLM  # noqa: E402
from gemma4.server.app import create_app  # noqa: E402
from gemma4.server.service import Limits  # noqa: E402

KEY = "test-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"]}}}


def start(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, "tiny", api_key=KEY)
    srv, url = start(app)
    yield url
    srv.should_exit = True


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def scripted(monkeypatch, llm):
    """script(text): every sequence sampled from now on emits the tokens of `text`, then <turn|>."""
    def script(text):
        ids = llm.tokenizer.encode(text) + [106]
        original = sample.Sampler.sample

        def fake(self, logits):
            pos = getattr(self, "_script_pos", 0)
            self._script_pos = pos + 1
            token = ids[min(pos, len(ids) - 1)]
            if self.constraint is not None:
                self.constraint.accept(token)
            return token, None, None
        monkeypatch.setattr(sample.Sampler, "sample", fake)
        return original
    return script


HELLO = [{"role": "user", "content": "Hello!"}]


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/metrics").status_code == 401  # behind the key unless --metrics-public
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "gemma4:kv_cache_used_bytes" in text and "gemma4:requests_total" in text


def test_plain_and_streaming_agree_with_exact_usage(llm, client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    prompt_ids = llm.tokenizer.encode(llm.render_chat(HELLO))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == (r.choices[0].message.content or "")
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_n_seed_logprobs_stop_and_completions(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, seed=7, n=2,
                                       logprobs=True, top_logprobs=3)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs.content
    assert len(lp) == 6 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    c = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert c.usage.completion_tokens == 5 and isinstance(c.choices[0].text, str)
    text = c.choices[0].text
    if len(text) > 2:
        cut = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5,
                                        temperature=0, stop=[text[1:3]])
        assert cut.choices[0].text == text[:text.index(text[1:3])] and cut.choices[0].finish_reason == "stop"


def test_streamed_completions_run_their_choices_together(client):
    """A streamed /v1/completions with n = 2 runs both choices at once (as chat does), each with the text the
    whole answer gives it."""
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=1.0, seed=3, n=2)
    whole = client.completions.create(**kw)
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    texts = ["".join(c.text for c in chunks if c.index == i) for i in (0, 1)]
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    order = [c.index for c in chunks]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # choice 1 began before choice 0 ended


def test_thinking_separated(client, scripted):
    scripted("<|channel>thought\nThe user greets me.<channel|>Hi there!")
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=50,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    m = r.choices[0].message
    assert m.content == "Hi there!" and m.model_extra["reasoning_content"] == "The user greets me."
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=50, stream=True,
                                                 reasoning_effort="high"))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Hi there!"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "The user greets me."


def test_tool_round_trip(client, scripted, llm):
    # the real model's turn, constrained: any call it makes follows the schema
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=1.0,
                                       seed=1)
    [call] = r.choices[0].message.tool_calls[:1]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # a scripted call, the tool's answer, then the final answer
    scripted('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,unit:<|"|>C<|"|>}<tool_call|>')
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=60)
    [call] = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "C"}
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "12 degrees"}]
    prompt = llm.render_chat(messages, tools=[WEATHER])
    assert 'response:get_weather{value:<|"|>12 degrees<|"|>}' in prompt
    scripted("It is 12 degrees in Oslo.")
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=60)
    assert r.choices[0].message.content == "It is 12 degrees in Oslo." and not r.choices[0].message.tool_calls


def test_json_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=80, temperature=1.0, seed=seed,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "p", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


BAD = [  # (body or raw text, expected status, text in the message)
    ("{not json", 400, "malformed JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "Content-Type: application/json"),
    ({"model": "tiny", "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"model": "nope", "messages": HELLO}, 400, "not served"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"content": "no role"}]}, 400, "role"),
    ({"model": "tiny", "messages": HELLO, "tools": [{"type": "function", "function": {"description": "x"}}]},
     400, "name"),
    ({"model": "tiny", "messages": HELLO, "tool_choice": "required"}, 400, "tools"),
    ({"model": "tiny", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "schema"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hello " * 140000}]}, 400, "context"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}]}, 400, "not a recognised image format"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests(server, body, status, message):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    kw = {"json": body} if isinstance(body, dict) else \
        {"content": body, "headers": {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}} \
        if isinstance(body, str) else {"content": body}  # bytes: no Content-Type
    kw.setdefault("headers", {"Authorization": f"Bearer {KEY}"})
    r = httpx.post(server + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_auth_and_queue_full(server, llm):
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    srv, url = start(create_app(llm, "tiny", limits=Limits(max_waiting=0)))
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.should_exit = True


def test_disconnect_frees_cache(server, llm):
    with httpx.stream("POST", server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": HELLO, "max_tokens": 2000, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                break  # the client goes away mid-stream
    for _ in range(200):
        if llm.engine.memory()["used_bytes"] == 0 and not llm.engine.has_work():
            break
        time.sleep(0.05)
    assert llm.engine.memory()["used_bytes"] == 0


def test_32_concurrent_streaming_clients(server):
    async def one(client, i):
        n = 0
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"#{i}"}],
                                                      max_tokens=6, stream=True, temperature=1.0, seed=i)
        async for chunk in stream:
            n += bool(chunk.choices and chunk.choices[0].delta.content is not None)
        return n

    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert all(n >= 0 for n in asyncio.run(main()))
