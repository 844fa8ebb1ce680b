"""The chat page `gemma4 serve` answers at / (issue 28), driven in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium) against a live server on the built-in tiny model, which has vision and audio
towers. Skipped, saying why, where Chromium, its driver or Selenium is missing. The screenshot it takes is kept
in artifacts/ (or $GEMMA4_ARTIFACTS)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import wave

import httpx
import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
KEY = "page-test-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None

needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER and selenium),
                                   reason="needs Chromium and chromedriver (apt install chromium chromium-driver) "
                                          "and selenium")


@pytest.fixture(scope="module")
def server():
    """`gemma4 serve` on the built-in model, behind an API key: its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "gemma4.cli", "serve", "--port", "0", "--api-key", KEY],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before it said where it serves"
        yield line.split(" on ")[1].strip().removesuffix("/v1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER and selenium):
        pytest.skip("needs Chromium and chromedriver (apt install chromium chromium-driver) and selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60, what="the page"):
    """Poll a JavaScript expression until it is truthy; its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script("return " + condition)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: {condition} still false after {timeout} s")


def running(base) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^gemma4:num_requests_running\{[^}]*\} (\S+)$", text, re.M).group(1))


def settle(driver):
    """Wait for the answer in flight to end (the Send button back)."""
    wait(driver, "!document.getElementById('send').hidden && !state.busy", what="the answer")


def type_and_send(driver, text):
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def set_field(driver, field, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'))", field, value)


def test_the_page_is_one_small_request(server):
    r = httpx.get(server + "/")  # no key needed for the page itself; its API calls take one
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert len(r.content) < 48_000
    policy = r.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy and "unsafe-eval" not in policy
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"?https?:", r.text)  # nothing from elsewhere
    assert httpx.get(server + "/v1/models").status_code == 401


@needs_browser
def test_chat_in_the_browser(server, browser, tmp_path):
    d = browser
    d.get(server + "/")
    assert wait(d, "performance.getEntriesByType('navigation')[0].loadEventEnd") < 1000  # ms, from the request
    # --api-key: the page asks once and keeps the key in sessionStorage
    wait(d, "document.getElementById('keybox').classList.contains('on')", what="the key prompt")
    d.find_element("id", "key").send_keys(KEY)
    d.find_element("css selector", "#keyform button").click()
    assert wait(d, "state.model && state.model.id") == "gemma4-tiny-random"
    assert d.execute_script("return sessionStorage.getItem('gemma4.key')") == KEY
    # what the page sends: recorded by wrapping fetch
    d.execute_script("window.sent = []; const f = window.fetch; window.fetch = (u, o) => {"
                     "if (String(u).includes('chat/completions')) sent.push(JSON.parse(o.body)); return f(u, o); }")

    # 1. a message, streamed: the answer's text grows in several steps
    set_field(d, "max_tokens", "48")
    set_field(d, "temperature", "0")
    set_field(d, "system", "Be brief.")
    d.execute_script("window.lengths = []; new MutationObserver(() => { const b = document.querySelector("
                     "'#log .msg.assistant:last-child .body'); if (b) lengths.push(b.textContent.length); })"
                     ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})")
    type_and_send(d, "Hello there")
    settle(d)
    lengths = d.execute_script("return lengths")
    assert len({n for n in lengths if n}) >= 3, lengths  # streamed, not one block
    body = d.execute_script("return sent[0]")
    assert body["stream"] and body["max_tokens"] == 48 and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and "response_format" not in body
    answer = d.execute_script("return chat().messages[1]")
    assert answer["role"] == "assistant" and answer["content"] and answer["usage"]["completion_tokens"] <= 48
    ctx = d.find_element("id", "ctx").text
    assert ctx == f"{answer['usage']['total_tokens']} / 131072 tokens"

    # 2. a long answer, stopped: the server cancels it (its running count back to 0)
    set_field(d, "max_tokens", "20000")
    type_and_send(d, "Tell me a long story")
    wait(d, "(chat().messages[3] || {}).content", what="the long answer's first tokens")
    assert running(server) == 1, "the long answer ended by itself before Stop"
    d.find_element("id", "stop").click()
    settle(d)
    end = time.monotonic() + 20
    while running(server) != 0 and time.monotonic() < end:
        time.sleep(0.1)
    assert running(server) == 0
    assert d.execute_script("return chat().messages[3].stopped") is True
    assert d.find_elements("css selector", "#log .msg.assistant:last-child .stopped")

    # 3. regenerate, then edit-and-resend: the conversation is cut where it changed
    set_field(d, "max_tokens", "8")
    d.find_element("css selector", "#log .msg.assistant:last-child .regen").click()
    settle(d)
    assert len(d.execute_script("return chat().messages")) == 4
    assert not d.execute_script("return chat().messages[3].stopped")
    d.find_elements("css selector", "#log .msg.user .edit")[1].click()
    box = d.find_element("css selector", "#log .msg.user:nth-child(3) textarea")
    box.clear()
    box.send_keys("A short story, then")
    d.find_element("css selector", "#log .msg.user:nth-child(3) button.primary").click()
    settle(d)
    messages = d.execute_script("return chat().messages")
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[2]["content"] == "A short story, then" and d.execute_script("return sent.length") == 4

    # 4. an image and a sound by the file picker, with thinking and the smallest image budget
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 8000).astype(np.int16).tobytes())
    set_field(d, "image_budget", "70")
    d.find_element("id", "think").click()
    picker = d.find_element("id", "file")
    d.execute_script("arguments[0].hidden = false", picker)
    picker.send_keys(str(tmp_path / "a.png") + "\n" + str(tmp_path / "a.wav"))
    wait(d, "state.attached.length == 2", what="the attachments")
    assert len(d.find_elements("css selector", "#attached .chip img")) == 1
    type_and_send(d, "What is in the picture and the sound?")
    settle(d)
    body = d.execute_script("return sent[sent.length - 1]")
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "input_audio", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["input_audio"]["format"] \
        == "wav"
    assert body["image_budget"] == 70 and body["chat_template_kwargs"] == {"enable_thinking": True}
    last = d.execute_script("return chat().messages[5]")
    assert not last.get("error") and last["usage"]["prompt_tokens"] > 70  # the image's soft tokens and more
    assert d.find_elements("css selector", "#log .msg.user:nth-child(5) .media img")
    assert d.find_elements("css selector", "#log .msg.user:nth-child(5) .media audio")

    # 5. no such tower: a clear message, nothing attached
    d.execute_script("state.model.input_modalities = ['text']")
    picker.send_keys(str(tmp_path / "a.wav"))
    assert "no audio tower" in wait(d, "document.getElementById('notice').textContent", what="the notice")
    assert d.execute_script("return state.attached.length") == 0

    # 6. reload: the conversation is kept (localStorage), the key too (sessionStorage: no prompt)
    before = d.execute_script("return JSON.stringify(chat().messages)")
    d.refresh()
    wait(d, "state.model", what="the reloaded page")
    assert not d.execute_script("return document.getElementById('keybox').classList.contains('on')")
    assert d.execute_script("return JSON.stringify(chat().messages)") == before
    assert len(d.find_elements("css selector", "#log .msg")) == 6
    assert d.find_elements("css selector", "#log .msg.user .media img")  # the image is kept as well
    # the context in use: the last answer's usage; with a draft, /tokenize's count of the text ("~": media
    # take their tokens once loaded)
    total = d.execute_script("return chat().messages[5].usage.total_tokens")
    assert wait(d, "document.getElementById('ctx').textContent") == f"{total} / 131072 tokens"
    d.find_element("id", "input").send_keys("And now?")
    assert re.fullmatch(r"~\d+ / 131072 tokens", wait(d, "document.getElementById('ctx').textContent.includes('~')"
                                                         " && document.getElementById('ctx').textContent"))
    os.makedirs(ARTIFACTS, exist_ok=True)
    d.save_screenshot(os.path.join(ARTIFACTS, "chat-page.png"))


TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5E"
            "rkJggg==")  # 2 x 2 pixels
ARTIFACTS = os.environ.get("GEMMA4_ARTIFACTS") or os.path.join(ROOT, "artifacts")
HOSTILE = ('Look: <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
           '[click](javascript:window.pwned=3) **bold** and `<b>code</b>`\n\n```html\n<script>window.pwned = 4'
           '</script>\n```\n\n| a | b |\n|---|---|\n| <i>1</i> | 2 |')


@needs_browser
def test_model_output_is_text_never_markup(server, browser):
    """A model that prints HTML: it shows as text, runs nothing; the Markdown around it still renders."""
    d = browser
    d.get(server + "/")
    d.execute_script("sessionStorage.setItem('gemma4.key', arguments[0]); localStorage.setItem('gemma4.chats',"
                     "JSON.stringify([{id: 'x', title: '<img src=x onerror=window.pwned=5>', messages: ["
                     "{role: 'user', content: '<script>window.pwned = 6</script>'},"
                     "{role: 'assistant', content: arguments[1], reasoning: '<img src=x onerror=window.pwned=7>',"
                     "tool_calls: [{name: '<b>f</b>', arguments: '{\"x\": \"<script>\"}'}]}]}]))", KEY, HOSTILE)
    d.refresh()
    wait(d, "state.model", what="the page")
    time.sleep(0.3)  # (an injected handler would have fired by now)
    assert d.execute_script("return window.pwned") is None
    log = d.find_element("id", "log")
    assert "<script>window.pwned = 1</script>" in log.text and "<script>window.pwned = 6</script>" in log.text
    assert not d.find_elements("css selector", "#log script, #log img, #log i, #log b, #chats img")
    assert d.find_element("css selector", "#log strong").text == "bold"
    assert d.find_element("css selector", "#log :not(pre) > code").text == "<b>code</b>"
    assert d.find_element("css selector", "#log pre code.lang-html").text == "<script>window.pwned = 4</script>"
    assert d.find_elements("css selector", "#log pre button.copy")
    assert d.find_element("css selector", "#log table td").text == "<i>1</i>"
    assert not d.find_elements("css selector", "#log a")  # javascript: is no link
    assert d.find_element("css selector", "#log .tool .name").text == "🔧 <b>f</b>"


@needs_browser
def test_thought_tool_calls_and_json_as_they_stream(server, browser):
    """The page's reading of a stream with a thought, a tool call in two pieces and usage (the server's own
    shapes: tests/test_server.py), served here by a stand-in fetch."""
    d = browser
    d.get(server + "/")
    d.execute_script("sessionStorage.setItem('gemma4.key', arguments[0]); localStorage.clear()", KEY)
    d.refresh()
    wait(d, "state.model", what="the page")
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Weather: use the tool."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                                                  "function": {"name": "get_weather",
                                                                               "arguments": '{"city": '}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    d.execute_script("const real = window.fetch; window.fetch = (u, o) => String(u).includes('chat/completions') ?"
                     "Promise.resolve(new Response(arguments[0], {headers: {'Content-Type': 'text/event-stream'}}))"
                     ": real(u, o)", stream)
    set_field(d, "tools", json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]))
    type_and_send(d, "Weather in Oslo?")
    settle(d)
    assert d.find_element("css selector", "#log .thought summary").text == "Thought"
    assert not d.execute_script("return document.querySelector('#log .thought').open")  # collapsed
    assert d.find_element("css selector", "#log .tool .name").text == "🔧 get_weather"
    assert json.loads(d.find_element("css selector", "#log .tool pre").text) == {"city": "Oslo"}
    assert d.find_element("id", "ctx").text == "42 / 131072 tokens"
    # JSON mode: the answer shown as it came, in a code block
    set_field(d, "tools", "")
    d.find_element("id", "json").click()
    stream = 'data: {"choices": [{"index": 0, "delta": {"content": "{\\"a\\": [1, 2]}"}}]}\n\ndata: [DONE]\n\n'
    d.execute_script("const real = window.fetch; window.fetch = (u, o) => { if (String(u).includes('chat/"
                     "completions')) { window.last = JSON.parse(o.body); return Promise.resolve(new Response("
                     "arguments[0])); } return real(u, o); }", stream)
    type_and_send(d, "JSON please")
    settle(d)
    assert d.execute_script("return window.last.response_format") == {"type": "json_object"}
    assert d.find_element("css selector", "#log .msg.assistant:last-child pre code").text == '{"a": [1, 2]}'
    # images dropped on the page and pasted into the box are attached like picked ones
    d.execute_script("const png = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
                     "const dt = () => { const t = new DataTransfer(); t.items.add(new File([png], 'p.png',"
                     "{type: 'image/png'})); return t; };"
                     "document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt(), bubbles: true}));"
                     "document.getElementById('input').dispatchEvent(new ClipboardEvent('paste',"
                     "{clipboardData: dt(), bubbles: true}))", TINY_PNG)
    wait(d, "state.attached.length == 2", what="the dropped and pasted images")
    assert len(d.find_elements("css selector", "#attached .chip img")) == 2
    d.execute_script("state.attached = []; drawAttached()")
    # a Tools field that is not JSON: said in the answer's place, nothing sent
    set_field(d, "tools", "[not json")
    type_and_send(d, "again")
    wait(d, "(chat().messages[5] || {}).error", what="the tools error")
    assert "not a JSON list of tools" in d.find_element("css selector", "#log .msg.err").text
    sent = d.execute_script("return requestMessages(chat().messages)")  # the failed answer is not sent back
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # New chat: an empty one on top of the list; the old one a click away
    d.find_element("id", "new").click()
    assert len(d.find_elements("css selector", "#chats li")) == 2 and not d.find_elements("css selector", "#log .msg")
    d.find_elements("css selector", "#chats li span")[1].click()
    assert len(d.find_elements("css selector", "#log .msg")) == 6

