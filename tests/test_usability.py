"""What users coming from vLLM, llama.cpp, Ollama and mlx-lm reach for (issue 27): each bug found trying it as
they would, fixed (every test here failed before its fix), and the endpoints and flags they expect."""
import json
import os
import socket
import subprocess
import sys
import time
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
    proc = subprocess.Popen(CLI + ["serve", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before it said where it serves"
        url = line.split(" on ")[1].strip()
        import httpx

        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=5).json() == {"status": "ok"}  # already up
    finally:
        proc.terminate()
        proc.wait(timeout=60)
