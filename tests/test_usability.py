"""What users coming from vLLM, llama.cpp, Ollama and mlx-lm reach for (issue 27): each bug found trying it as
they would, fixed (every test here failed before its fix), and the endpoints and flags they expect."""
import json
import os
import socket
import subprocess
import sys
import wave

import numpy as np
import pytest

import gemma4
from gemma4.chat.request import make_constraint
from gemma4.chat.template import builtin_template, normalize_messages, render

CLI = [sys.executable, "-m", "gemma4.cli"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}


@pytest.fixture(scope="module")
def llm():
    return gemma4.LLM()


def test_repetition_penalty_everywhere(llm):
    """repetition_penalty through LLM.generate (inference tensors inside the engine) changes the greedy tokens
    as its definition says: a seen token's logit divided (positive) or multiplied (negative) by the penalty."""
    prompt = [[2, 10, 20, 30, 40]]
    plain = llm.generate(prompt, max_new_tokens=12, temperature=0)[0].token_ids
    penalised = llm.generate(prompt, max_new_tokens=12, temperature=0, repetition_penalty=1.5)[0].token_ids
    assert penalised != plain or len(set(plain)) == len(plain)
    out = subprocess.run(CLI + ["generate", "hi", "--max-new-tokens", "3", "--repetition-penalty", "1.3"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr


def test_named_tool_choice_makes_one_call(llm):
    """OpenAI's named tool_choice: that function, called once (the grammar allowed a second call)."""
    c = make_constraint([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    call = '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
    for token in llm.tokenizer.encode(call):
        c.accept(token)
    allowed = c.allowed_tokens()
    assert not allowed[llm.tokenizer.encode("<|tool_call>")[0]]
    assert allowed[50]  # <|tool_response>: the end of the calls


def test_truncated_safetensors_is_one_clear_error(ckpt, tmp_path):
    import shutil

    path = str(tmp_path / "cut")
    shutil.copytree(ckpt("31b")[0], path)
    st = os.path.join(path, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(gemma4.CheckpointError, match="truncated or corrupt"):
        gemma4.load(path)
    out = subprocess.run(CLI + ["generate", "hi", "--model", path], capture_output=True, text=True)
    assert out.returncode != 0 and "truncated or corrupt download" in out.stderr and "Traceback" not in out.stderr


def test_empty_input_audio_renders_its_placeholder():
    """Rendering needs no audio bytes: the official template writes the placeholder (running the model needs
    them, and says so)."""
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                             {"type": "text", "text": "What is said?"}]}]
    converted, media = normalize_messages(messages)
    assert "<|audio|>" in render(builtin_template("e-series"), converted)
    assert media == [{"kind": "audio", "source": None, "base64": True, "format": "wav"}]
    from gemma4.chat.request import MediaPolicy, load_media

    with pytest.raises(ValueError, match="an audio part has no data: give the base64 data"):
        load_media(media[0], None, MediaPolicy())


def wav_file(path, seconds=0.5):
    t = np.arange(int(16000 * seconds)) / 16000
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return path


def test_chat_audio_command_reads_a_wav(tmp_path):
    """`/audio FILE` in `gemma4 chat` (a path, which was taken for base64) on a model with an audio tower."""
    import reference
    from test_gguf import tiny_tokenizer

    path = str(tmp_path / "e2b-audio")
    reference.build_media("e2b", path, audio=reference.AUDIO_RUN)
    tiny_tokenizer(path, media_ids=reference.MEDIA_TOKENS)
    wav = wav_file(str(tmp_path / "tone.wav"))
    out = subprocess.run(CLI + ["chat", "--model", path, "--max-new-tokens", "3", "--temperature", "0"],
                         input=f"/audio {wav}\nWhat is this?\n/quit\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(audio attached to your next message)" in out.stdout and "(error" not in out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_prints_its_url_once_listening_and_a_busy_port_is_an_error():
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    out = subprocess.run(CLI + ["serve", "--port", str(port)], capture_output=True, text=True, timeout=120)
    busy.close()
    assert out.returncode != 0 and "cannot listen on 127.0.0.1" in out.stderr and "serving" not in out.stderr
    proc = subprocess.Popen(CLI + ["serve", "--port", "0", "--no-access-log"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before it said where it serves"
        url = line.split(" on ")[1].strip()
        import httpx

        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=5).json() == {"status": "ok"}  # already up
        assert httpx.get(url + "/models/nothing", timeout=5).status_code == 404
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    assert "GET /health" not in rest and "/models/nothing" in rest  # --no-access-log: errors alone


# ---- endpoints and completions features -------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(llm):
    from fastapi.testclient import TestClient

    from gemma4.server.app import create_app

    return TestClient(create_app(llm, "tiny"))


def test_version_models_and_404s(api, llm):
    assert api.get("/version").json() == {"version": gemma4.__version__}
    card = api.get("/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["max_model_len"] == llm.engine.max_model_len
    assert api.get("/v1/models").json()["data"] == [card]
    for path in ("/v1/models/other", "/v1/nothing"):
        r = api.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert api.get("/v1/models/other").json()["error"]["message"] == "The model 'other' does not exist"


def test_tokenize_and_detokenize(api, llm):
    r = api.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world", add_bos=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.engine.max_model_len
    messages = [{"role": "user", "content": "Hi there"}]
    r = api.post("/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == llm.tokenizer.encode(llm.render_chat(messages))
    assert api.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == llm.tokenizer.decode(r["tokens"])
    for body, status in (({}, 400), ({"prompt": "a", "messages": messages}, 400), ({"prompt": "a", "model": "x"}, 400)):
        assert api.post("/tokenize", json=body).status_code == status
    assert api.post("/detokenize", json={"tokens": [1 << 30]}).status_code == 400


def test_completion_logprobs_echo_and_batches(api, llm):
    """vLLM's /v1/completions: logprobs in OpenAI's shape, echo with the prompt's own logprobs (scored by the
    engine's prefill, checked against the model's logits), a list of prompts as a batch (choice p x n + i),
    suffix refused."""
    import torch

    body = {"prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 3}
    r = api.post("/v1/completions", json=body).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4 == r["usage"][
        "completion_tokens"]
    assert all(len(t) <= 3 for t in lp["top_logprobs"]) and "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    assert all(v <= 0 for v in lp["token_logprobs"])
    echo = api.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echo["text"] == "The sky is" + r["choices"][0]["text"]
    ids = llm.tokenizer.encode("The sky is", add_bos=True)
    with torch.inference_mode():
        logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    expected = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = echo["logprobs"]["token_logprobs"][:len(ids)]
    assert got[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(got[1:], expected[1:]))
    assert echo["logprobs"]["token_logprobs"][len(ids):] == lp["token_logprobs"]
    # each token's text_offset is where it stands in the echoed text; <bos>, which the text leaves out, is empty
    elp = echo["logprobs"]
    assert elp["tokens"][0] == "<bos>" and elp["text_offset"][:2] == [0, 0]
    assert all(echo["text"][o:o + len(t)] == t for o, t in zip(elp["text_offset"][1:], elp["tokens"][1:]))
    # streamed: the echo (with its logprobs) comes first, then each token, with the same figures
    events = [json.loads(line[6:]) for line in api.post("/v1/completions", json={
        **body, "echo": True, "stream": True}).text.splitlines() if line.startswith("data: {")]
    streamed = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in streamed) == echo["text"]
    assert [v for c in streamed for v in c["logprobs"]["token_logprobs"]] == elp["token_logprobs"]
    assert [v for c in streamed for v in c["logprobs"]["text_offset"]] == elp["text_offset"]
    batch = api.post("/v1/completions", json={"prompt": ["The sky is", "Hello"], "max_tokens": 3, "temperature": 0,
                                              "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    alone = api.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0}).json()
    assert batch["choices"][2]["text"] == batch["choices"][3]["text"] == alone["choices"][0]["text"]
    assert batch["usage"]["prompt_tokens"] == len(ids) + alone["usage"]["prompt_tokens"]
    r = api.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]


@pytest.mark.parametrize("frequency,presence,expected", [
    (None, None, 0), (1.0, None, 1), (None, 0.6, 1), (None, 0.4, 0), (-1.0, None, 0), (0.3, 0.3, 1)])
def test_frequency_and_presence_penalties(frequency, presence, expected):
    """OpenAI's definition: logit[j] -= frequency x count[j] + presence x (count[j] > 0), over the output."""
    import torch

    from gemma4.engine.sample import Sampler, SamplingParams

    s = Sampler(SamplingParams(frequency_penalty=frequency, presence_penalty=presence))
    s.output = [0, 2]
    assert s.sample(torch.tensor([3.0, 2.5, 0.0]))[0] == expected
    assert s.output[-1] == expected


def test_penalties_through_the_api(api):
    base = {"prompt": "Hello", "max_tokens": 12, "temperature": 0}
    plain = api.post("/v1/completions", json=base).json()["choices"][0]["text"]
    # the tiny model never repeats a token by itself: a negative penalty makes it (the output differs)
    assert api.post("/v1/completions", json={**base, "frequency_penalty": -2.0}).json()["choices"][0]["text"] != plain
    assert api.post("/v1/completions", json={**base, "presence_penalty": 3}).status_code == 400


# ---- flags ---------------------------------------------------------------------------------------------------
def test_max_model_len_caps_the_context():
    small = gemma4.LLM(max_model_len=40)
    assert small.engine.max_model_len == 40
    out = small.generate([[2] + [100] * 30], max_new_tokens=100, temperature=0)[0]
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="the context is 40"):
        small.generate([[2] + [100] * 45], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_model_len must be an integer"):
        gemma4.LLM(max_model_len=10**9).engine


def test_chat_template_flag(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    llm = gemma4.LLM(chat_template=str(template))
    assert llm.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with pytest.raises(ValueError, match="no such file"):
        gemma4.LLM(chat_template="missing.jinja")
    with pytest.raises(ValueError, match="does not compile"):
        gemma4.LLM(chat_template="{% for %}")
    out = subprocess.run(CLI + ["generate", "x", "--chat-template", str(tmp_path / "none.jinja")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no such file" in out.stderr and "Traceback" not in out.stderr


def test_generate_prompt_sources_system_and_threads(tmp_path):
    args = ["generate", "--max-new-tokens", "4", "--temperature", "0"]
    direct = subprocess.run(CLI + args + ["Once upon a time"], capture_output=True, text=True, check=True).stdout
    piped = subprocess.run(CLI + args + ["-", "--threads", "1"], input="Once upon a time", capture_output=True,
                           text=True, check=True).stdout
    (tmp_path / "p.txt").write_text("Once upon a time")
    filed = subprocess.run(CLI + args + ["--prompt-file", str(tmp_path / "p.txt")], capture_output=True, text=True,
                           check=True).stdout
    assert direct == piped == filed
    system = subprocess.run(CLI + args + ["Once upon a time", "--system", "Answer in French."], capture_output=True,
                            text=True, check=True).stdout
    assert system != direct
    for bad, message in ((["--threads", "0", "x"], "--threads must be >= 1"), ([], "give a prompt"),
                         (["x", "--prompt-file", "p"], "not both")):
        out = subprocess.run(CLI + args + bad, capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_help_shows_defaults():
    out = subprocess.run(CLI + ["serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default: 8000)" in out and "(default: 127.0.0.1)" in out
    out = subprocess.run(CLI + ["generate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "tokens to generate at most (default: 128)" in " ".join(out.split())


# ---- observability --------------------------------------------------------------------------------------------
def test_metrics_are_prometheus_and_histograms_move(api, caplog):
    """/metrics parses with prometheus_client's own parser; vLLM's names under gemma4:, HELP and TYPE on each;
    the latency and size histograms count every request run."""
    import logging

    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        fams = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
        return fams, {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}

    fams, before = scrape()
    for name, kind in (("gemma4:time_to_first_token_seconds", "histogram"),
                       ("gemma4:inter_token_latency_seconds", "histogram"),
                       ("gemma4:e2e_request_latency_seconds", "histogram"),
                       ("gemma4:request_queue_time_seconds", "histogram"),
                       ("gemma4:request_prompt_tokens", "histogram"), ("gemma4:request_generation_tokens", "histogram"),
                       ("gemma4:num_requests_running", "gauge"), ("gemma4:num_requests_waiting", "gauge"),
                       ("gemma4:kv_cache_usage_perc", "gauge"), ("gemma4:prompt_tokens", "counter"),
                       ("gemma4:generation_tokens", "counter"), ("gemma4:num_preemptions", "counter"),
                       ("gemma4:prefix_cache_hits", "counter"), ("gemma4:prefix_cache_queries", "counter")):
        assert fams[name].type == kind and fams[name].documentation, name
    label = (("model_name", "tiny"),)
    with caplog.at_level(logging.INFO, logger="gemma4.access"):
        usage = [api.post("/v1/completions", json={"prompt": "Hello", "max_tokens": n, "temperature": 0}).json()[
            "usage"] for n in (3, 5)]
    _, after = scrape()
    moved = lambda name: after[name, label] - before.get((name, label), 0)  # noqa: E731
    assert moved("gemma4:time_to_first_token_seconds_count") == 2
    assert moved("gemma4:inter_token_latency_seconds_count") == 2 + 4
    assert moved("gemma4:e2e_request_latency_seconds_count") == moved("gemma4:request_queue_time_seconds_count") == 2
    assert moved("gemma4:request_generation_tokens_sum") == 8 == moved("gemma4:generation_tokens_total")
    assert moved("gemma4:request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usage)
    assert after["gemma4:request_success_total", (("finished_reason", "length"), *label)] >= 2
    lines = [r.getMessage() for r in caplog.records if r.name == "gemma4.access"]
    assert any('"POST /v1/completions" 200 2+3 tokens' in line for line in lines), lines


def test_errors_are_logged(api, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert api.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    messages = [r.getMessage() for r in caplog.records]
    assert any("POST /v1/completions -> 400 max_tokens" in m for m in messages)
    assert any('"POST /v1/completions" 400' in m for m in messages)


def test_progress_bar_on_a_terminal(ckpt):
    """Loading and quantizing show tqdm bars on a terminal (and nothing when stderr is a file)."""
    import fcntl
    import pty
    import struct
    import termios

    path = ckpt("31b")[0]
    code = f"import gemma4; gemma4.load({path!r}, quantize='int8')"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a pty's default is 0 columns
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
    assert proc.wait() == 0
    text = out.decode(errors="replace")
    assert "loading" in text and "quantizing to int8" in text
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "quantizing" not in quiet.stderr


@pytest.mark.parametrize("parameters,message", [
    ({"type": "string"}, "must be a JSON schema of type object"),
    ({"type": "object", "properties": 3}, "properties must map each argument name"),
    ({"type": "object", "properties": {"a": "int"}}, "properties must map each argument name"),
    ({"type": "object", "required": "a"}, "required must be a list of argument names"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, None)])
def test_malformed_tools_are_a_400(api, parameters, message):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}
    r = api.post("/v1/chat/completions", json=body)
    if message is None:
        assert r.status_code == 200
    else:
        assert r.status_code == 400 and message in r.json()["error"]["message"]
