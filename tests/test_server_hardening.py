"""The server under hostile and careless clients (issue 20): one request never harms another.

Every poisoning attempt runs while 4 seeded streaming "victims" are mid-generation on the same engine; each
victim must finish with exactly the text it gives when it runs alone. The rest: 400s (not 500s) for what a client
can get wrong, a 500 that reveals nothing and keeps the connection usable, limits that refuse bombs before they
cost anything, remote media that cannot reach internal addresses or hold the workers that text requests need,
cancellation of non-streamed requests whose client is gone, and a SIGTERM that drains and exits 0."""
import asyncio
import base64
import http.server
import io
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from test_server import start  # noqa: E402

from gemma4.chat import fetch  # noqa: E402
from gemma4.chat.request import MediaPolicy  # noqa: E402
from gemma4.config import parse_config  # noqa: E402
from gemma4.engine.worker import Worker  # noqa: E402
from gemma4.llm import LLM, tiny_random_model  # noqa: E402
from gemma4.server.app import create_app  # noqa: E402
from gemma4.server.service import Limits  # noqa: E402

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hello!"}]
VICTIM_TOKENS = 48


@pytest.fixture(scope="module")
def llm():
    """The built-in tiny model, with its tiny vision and audio towers (random weights, the real tokenizer and
    media ids): media requests get as far as the towers."""
    return LLM()


def text_only_llm():
    """The built-in tiny model without its towers."""
    llm = LLM()
    config = json.loads(resources.files("gemma4").joinpath("data/tiny-random/config.json").read_text())
    config.update(vision_config=None, audio_config=None)
    llm.model = tiny_random_model(config=parse_config(config))
    llm.config = llm.model.config
    return llm


@pytest.fixture(scope="module")
def server(llm):
    srv, url = start(create_app(llm, "tiny", api_key=KEY, policy=MediaPolicy(remote=True, fetch_timeout=2.0),
                                limits=Limits(max_request_bytes=8 << 20)))
    yield url
    srv.should_exit = True


def post(url, path="/v1/chat/completions", client=httpx, **kw):
    kw.setdefault("timeout", 60)
    kw.setdefault("headers", AUTH)
    return client.post(url + path, **kw)


def chat(**extra):
    return {"messages": HI, "max_tokens": 4, **extra}


def image_from(url):
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


started = threading.Event()  # victim 0 has its first token: the victims are mid-generation


async def victim(url, i):
    """One seeded streaming chat: (text, finish reason, tokens, saw [DONE])."""
    body = {"messages": [{"role": "user", "content": f"victim {i}"}], "max_tokens": VICTIM_TOKENS,
            "temperature": 1.0, "seed": 100 + i, "stream": True, "stream_options": {"include_usage": True}}
    text, reason, tokens, done = "", None, None, False
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    for choice in event["choices"]:
                        text += choice["delta"].get("content") or ""
                        reason = choice["finish_reason"] or reason
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if i == 0:
                        started.set()
    return text, reason, tokens, done


@pytest.fixture(scope="module")
def alone(server):
    """Each victim's output when it runs by itself."""
    return [asyncio.run(victim(server, i)) for i in range(4)]


def under_attack(url, attack, alone):
    """Run `attack()` (a blocking call) once the 4 victims are generating; every victim must end as it ends
    alone. Returns the attack's result."""
    async def main():
        started.clear()
        victims = [asyncio.ensure_future(victim(url, i)) for i in range(4)]
        while not started.is_set():
            await asyncio.sleep(0.005)
        result = await asyncio.to_thread(attack)
        return result, await asyncio.gather(*victims)

    result, victims = asyncio.run(main())
    assert victims == alone
    return result


# ---- poisoning: values and schemas that used to break an engine step --------------------------------------------
POISON = [  # (request, status, text in the error): each while 4 victims run
    (chat(temperature=1e-40), 400, "too small to compute"),
    (chat(repetition_penalty=1e300), 400, "repetition_penalty"),
    (chat(repetition_penalty=float("nan")), 400, "finite number"),  # Python's json reads NaN
    (chat(temperature=float("inf")), 400, "finite number"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}), 400,
     "invalid JSON schema"),
    # compiles, then fails once generating: that request alone ends (400: its grammar), nobody else
    (chat(max_tokens=30, response_format={"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}), 400, "grammar failed"),
    (chat(repetition_penalty=2.0), 200, None),
    (chat(repetition_penalty=5e-324), 400, "repetition_penalty"),
    (chat(temperature=1e-30, repetition_penalty=1.3), 200, None),
]


# issue 27's additions, each while 4 victims run: prompt logprobs (a forward on the engine's thread), a batch of
# prompts with penalties, a 1 MB /tokenize (off the event loop), a bad penalty, a malformed tool schema
ADDED = [
    ("/v1/completions", {"prompt": "word " * 1500, "max_tokens": 2, "echo": True, "logprobs": 20}, 200, None),
    ("/v1/completions", {"prompt": ["a b", "c d"] * 8, "max_tokens": 3, "n": 2, "frequency_penalty": -2.0,
                         "presence_penalty": 2.0, "temperature": 1.0}, 200, None),
    ("/tokenize", {"prompt": "word " * 200_000}, 200, None),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3.0}, 400, "frequency_penalty"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 3}}}]), 400, "properties must map"),
]


@pytest.mark.parametrize("path,body,status,words", ADDED, ids=[str(i) for i in range(len(ADDED))])
def test_new_features_harm_nobody(server, alone, path, body, status, words):
    r = under_attack(server, lambda: post(server, path, json=body), alone)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,words", POISON, ids=[str(i) for i in range(len(POISON))])
def test_poison_harms_nobody(server, alone, body, status, words):
    def attack():
        content = json.dumps(body)  # NaN allowed here, as a careless client writes it
        return post(server, content=content, headers={**AUTH, "Content-Type": "application/json"})

    r = under_attack(server, attack, alone)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["error"]["message"]


def test_failing_forward_ends_its_sequence_alone(server, alone, monkeypatch):
    """A forward that fails for one sequence of a decode batch: the batch is rerun one sequence at a time, and
    only that sequence ends (a one-token prompt is fed in the decode batch, with the victims)."""
    real = Worker.forward

    def forward(worker, ids, *args, **kw):
        if any(row == [7777] for row in ids):
            raise RuntimeError("a secret internal detail")
        return real(worker, ids, *args, **kw)

    monkeypatch.setattr(Worker, "forward", forward)
    r = under_attack(server, lambda: post(server, "/v1/completions", json={"prompt": [7777], "max_tokens": 5}),
                     alone)
    assert r.status_code == 500 and "secret" not in r.text and "server log" in r.json()["error"]["message"]


# ---- 400s, not 500s; a 500 leaks nothing and keeps the connection -------------------------------------------------
CLIENT_ERRORS = [  # (path, raw body, text in the 400's message)
    ("/v1/chat/completions", "[" * 100_000 + "]" * 100_000, "parsing the body"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "x": json.loads("[" * 500 + "]" * 500)}), "levels deep"),
    ("/v1/chat/completions", json.dumps(chat(seed=2 ** 70)), "seed"),
    ("/v1/chat/completions", json.dumps(chat(seed=True)), "seed"),
    ("/v1/chat/completions", json.dumps(chat(n="2")), "n"),
    ("/v1/chat/completions", json.dumps(chat(temperature=True)), "temperature"),
    ("/v1/chat/completions", json.dumps(chat(messages=[{"role": "wizard", "content": "x"}])), "role"),
    ("/v1/chat/completions", json.dumps(chat(messages=[{"role": "user", "content": "see <|image|>"}])),
     "placeholder"),
    ("/v1/completions", json.dumps({"prompt": [2, 258880, 3], "max_tokens": 2}), "placeholder"),
    ("/v1/completions", json.dumps({"prompt": "a <|audio|> b", "max_tokens": 2}), "placeholder"),
    ("/v1/completions", json.dumps({"prompt": [2, 300000], "max_tokens": 2}), "out of range"),
    ("/v1/chat/completions", json.dumps(chat(chat_template_kwargs={"enable_thinking": "yes"})), "enable_thinking"),
    ("/v1/chat/completions", json.dumps(image_from("/etc/passwd")), "local media paths are not allowed"),
    ("/v1/chat/completions", json.dumps(image_from("data:image/png;base64,AAAA")), "image"),
]


@pytest.mark.parametrize("path,raw,words", CLIENT_ERRORS, ids=[str(i) for i in range(len(CLIENT_ERRORS))])
def test_client_errors_are_400_and_keep_the_connection(server, path, raw, words):
    with httpx.Client(timeout=60) as c:
        r = post(server, path, client=c, content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]
        assert post(server, client=c, json=chat()).status_code == 200  # the same keep-alive connection


def test_internal_error_is_generic_and_keeps_the_connection(server, llm, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("a secret internal detail")

    monkeypatch.setattr(llm.model, "encode_media", broken)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(32, 32)}}
    with httpx.Client(timeout=60) as c:
        r = post(server, client=c, json=chat(messages=[{"role": "user", "content": [image]}]))
        assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text
        assert r.json()["error"]["type"] == "server_error" and "ref " in r.json()["error"]["message"]
        assert post(server, client=c, json=chat()).status_code == 200


# ---- resource bombs ------------------------------------------------------------------------------------------------
def wav(rate, seconds=0.05):
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(rate * seconds), np.int16), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def png(w, h):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def audio_message(data):
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_audio_bombs_are_refused_before_they_cost(server):
    """A few-KB WAV at a rate coprime with 16 kHz needed a 2.8 GB resampling filter; refused at once."""
    data = wav(44101)
    assert len(base64.b64decode(data)) < 5000
    before = max_rss_mb()
    r = post(server, json=chat(messages=audio_message(data)))
    assert r.status_code == 400 and "cannot be resampled" in r.json()["error"]["message"]
    assert max_rss_mb() - before < 200  # the filter alone was 2.8 GB
    r = post(server, json=chat(messages=audio_message(wav(500_000, 0.001))))
    assert r.status_code == 400 and "sample rate 500000 Hz is not supported" in r.json()["error"]["message"]
    assert post(server, json=chat(messages=audio_message(wav(44100, 0.5)))).status_code == 200  # a normal rate


def test_media_refused_before_decoding_when_the_model_takes_none(monkeypatch):
    """The text-only tiny model: audio and images are refused by kind, not after decoding them."""
    from gemma4 import media

    text_only = text_only_llm()
    monkeypatch.setattr(media, "preprocess_audio", lambda *a: pytest.fail("decoded audio for a model without"))
    monkeypatch.setattr(media, "preprocess_image", lambda *a: pytest.fail("decoded an image for a model without"))
    srv, url = start(create_app(text_only, "tiny"))
    try:
        r = post(url, json=chat(messages=audio_message(wav(44101))))
        assert r.status_code == 400 and "takes no audio" in r.json()["error"]["message"]
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(8, 8)}}
        r = post(url, json=chat(messages=[{"role": "user", "content": [image]}]))
        assert r.status_code == 400 and "no vision encoder" in r.json()["error"]["message"]
    finally:
        srv.should_exit = True


def test_long_text_refused_before_tokenizing(server, llm, monkeypatch):
    """Over the body limit: 413 before it is read. Under it but longer than any prompt the context holds (by
    its length alone: no token is longer than 31 characters): 400 without tokenizing it."""
    r = post(server, "/v1/completions", json={"prompt": "x" * (9 << 20)})
    assert r.status_code == 413
    calls = []
    real = type(llm.tokenizer).encode
    monkeypatch.setattr(type(llm.tokenizer), "encode", lambda self, text, **kw: calls.append(len(text))
                        or real(self, text, **kw))
    limit = llm.engine.max_prompt_tokens * llm.tokenizer.max_token_chars
    assert limit < 7 << 20
    r = post(server, "/v1/completions", json={"prompt": "hello " * (limit // 6 + 10), "max_tokens": 2})
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
    r = post(server, json=chat(messages=[{"role": "user", "content": "hello " * (limit // 6 + 10)}]))
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
    assert max(calls, default=0) < limit  # only short texts (the victims', earlier tests') were tokenized


# ---- cancellation: a non-streamed request whose client has gone ---------------------------------------------------
def test_non_streamed_request_cancelled_when_its_client_goes(server, llm):
    engine = llm.engine

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            request = asyncio.ensure_future(post(server, client=c, json=chat(max_tokens=100_000)))
            while not any(s.output for s in engine.scheduler.running):  # generating
                await asyncio.sleep(0.02)
            request.cancel()  # the client gives up: its connection closes
        for _ in range(100):
            if not engine.has_work() and engine.memory()["used_bytes"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(main())


# ---- remote media: SSRF, one error text, deadlines, workers that cannot starve text ------------------------------
class Origin(http.server.ThreadingHTTPServer):
    """A test web server: /image (a PNG), /redirect?to=URL, /missing (404), /drip (a byte every 0.2 s)."""
    daemon_threads = True

    def __init__(self, host):
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                origin.hits += 1
                if self.path == "/image":
                    body = base64.b64decode(png(48, 48))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                elif self.path == "/drip":  # a byte every 0.2 s of a promised megabyte, while `dripping`
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 20))
                    self.end_headers()
                    try:
                        for _ in range(300):
                            if not origin.dripping:
                                break
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                    self.close_connection = True
                else:
                    self.send_error(404)

        super().__init__((host, 0), Handler)
        self.hits, self.dripping = 0, True
        self.url = f"http://{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def origins():
    """`public` on 127.0.0.2 (treated as a public address by the tests), `internal` on 127.0.0.1."""
    public, internal = Origin("127.0.0.2"), Origin("127.0.0.1")
    yield public, internal
    public.shutdown()
    internal.shutdown()


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    real = fetch.public_address
    monkeypatch.setattr(fetch, "public_address", lambda ip: str(ip) == "127.0.0.2" or real(ip))


def test_remote_media_reaches_only_public_addresses(server, origins, public_127_0_0_2):
    public, internal = origins
    assert post(server, json=image_from(public.url + "/image")).status_code == 200
    closed = socket.socket()
    closed.bind(("127.0.0.2", 0))
    port = closed.getsockname()[1]
    closed.close()
    hits = internal.hits
    bad = [internal.url + "/image",  # loopback
           public.url + "/redirect?to=" + internal.url + "/image",  # a redirect to loopback
           "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
           "http://[::ffff:127.0.0.1]:%d/image" % internal.server_address[1],  # IPv4-mapped loopback
           "http://10.0.0.1/x.png", "http://user:pw@127.0.0.2/image",
           public.url + "/missing",  # 404
           f"http://127.0.0.2:{port}/image",  # connection refused
           "http://no-such-host.invalid/x.png"]
    messages = set()
    for url in bad:
        r = post(server, json=image_from(url))
        assert r.status_code == 400, (url, r.text)
        messages.add(r.json()["error"]["message"])
    assert messages == {fetch.FAILED}  # one text: nothing about which hosts or ports answer
    assert internal.hits == hits  # the internal server was never reached


def test_dripping_url_fails_at_its_deadline(server, origins, public_127_0_0_2):
    public, _ = origins
    t = time.monotonic()
    r = post(server, json=image_from(public.url + "/drip"))
    assert r.status_code == 400 and r.json()["error"]["message"] == fetch.FAILED
    assert time.monotonic() - t < 2.0 + 10  # the 2 s deadline, not 60 s of dripping


def test_slow_media_cannot_starve_text_requests(llm, origins, public_127_0_0_2, alone):
    """8 dripping URLs (a 60 s deadline here): 6 take the media slots (2 on the media workers, 4 queued for
    them), 2 get 429. While all 6 still hang, victims sent afterwards run as if alone: text requests never wait
    for media threads (6 dripping fetches on asyncio's default pool would hold all its threads)."""
    public, _ = origins
    srv, url = start(create_app(llm, "tiny", api_key=KEY, policy=MediaPolicy(remote=True, fetch_timeout=60),
                                limits=Limits(media_workers=2, max_media_jobs=6)))

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            drips = [asyncio.ensure_future(c.post(url + "/v1/chat/completions", headers=AUTH,
                                                  json=image_from(public.url + "/drip"))) for _ in range(8)]
            await asyncio.sleep(0.5)
            victims = await asyncio.wait_for(asyncio.gather(*(victim(url, i) for i in range(4))), 30)
            hanging = sum(not d.done() for d in drips)
            public.dripping = False  # the dripping ends: each fetch fails at once (its body is cut short)
            return victims, hanging, await asyncio.gather(*drips)

    try:
        victims, hanging, drips = asyncio.run(main())
    finally:
        public.dripping = True
        srv.should_exit = True
    assert victims == alone and hanging == 6
    assert sorted(r.status_code for r in drips) == [400] * 6 + [429] * 2
    assert {r.json()["error"]["message"] for r in drips if r.status_code == 400} == {fetch.FAILED}


# ---- auth, metrics, the OpenAPI document -------------------------------------------------------------------------
def test_auth(server, llm):
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic k3y"}, 401),
                            ({"Authorization": f"bearer {KEY}"}, 200), ({"Authorization": f"BEARER {KEY}"}, 200)]:
        assert httpx.get(server + "/v1/models", headers=headers).status_code == status
        assert httpx.get(server + "/metrics", headers=headers).status_code == status
    r = httpx.get(server + "/v1/models")
    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").status_code == 200
    srv, url = start(create_app(llm, "tiny", api_key=KEY, metrics_public=True))
    try:
        assert httpx.get(url + "/metrics").status_code == 200 and httpx.get(url + "/v1/models").status_code == 401
    finally:
        srv.should_exit = True


def test_openapi_describes_every_body(server):
    doc = httpx.get(server + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert op["requestBody"]["required"] is True
        assert {"200", "400", "401", "413", "429", "500"} <= set(op["responses"]) and "422" not in op["responses"]
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant",
                                                                    "model", "tool"]
    seed = next(s for s in schemas["ChatRequest"]["properties"]["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-(1 << 63), 1 << 63)
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ModelList"}


# ---- SIGTERM: stop admitting, drain up to --shutdown-timeout, cancel, exit 0 -------------------------------------
def test_sigterm_drains_then_exits_0(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(tmp_path / "server.log", "w+")  # a file: a pipe nobody reads would block the server's logging
    proc = subprocess.Popen([sys.executable, "-m", "gemma4.cli", "serve", "--port", str(port),
                             "--shutdown-timeout", "5"], stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        results = {}

        def long_request(name, body):
            try:
                results[name] = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code
            except httpx.TransportError as e:
                results[name] = type(e).__name__

        # ~0.5 s of tokens, under way when SIGTERM comes: finishes within the 5 s drain; the other never would
        short = threading.Thread(target=long_request, args=("short", chat(max_tokens=30, temperature=0)))
        endless = threading.Thread(target=long_request, args=("endless", chat(max_tokens=100_000)))
        endless.start()
        time.sleep(1.0)
        short.start()
        for _ in range(200):  # both generating
            if 'gemma4:num_requests_running{model_name="tiny"} 2.0' in httpx.get(url + "/metrics", timeout=5).text:
                break
            time.sleep(0.01)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer admitting
            httpx.post(url + "/v1/chat/completions", json=chat(), timeout=5)
        code = proc.wait(timeout=20)
        elapsed = time.monotonic() - t
        short.join(5)
        endless.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    assert code == 0 and elapsed < 5 + 5, (code, elapsed, log.read())
    assert results == {"short": 200, "endless": 503}  # finished within the drain; cancelled at its end
