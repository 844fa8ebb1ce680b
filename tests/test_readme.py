"""Every code block of the README runs (issue 27): the Python blocks as written, on the built-in tiny model; the
shell lines with a tiny checkpoint (tests/reference.py, with a tokenizer cut to its vocabulary) in place of the
real one they name, or the built-in model exported to the GGUF file a line names; long-running commands (serve,
chat) run until they are up. A line that cannot run here says why in SKIP."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 1)
          for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S)]
GEMMA4 = os.path.join(os.path.dirname(sys.executable), "gemma4")

# (what a line contains, why it does not run here)
SKIP = [
    ("bash tools/setup.sh", "sets up the environment these tests run in (the clean-clone check runs it)"),
    ("pytest", "the test suite itself"),
    ("--draft-model", "the MTP drafters exist for the real checkpoints only (tests/test_speculative.py)"),
    ("ggml-org/", "a hub download (hub GGUF ids: tests/test_mmproj.py, offline)"),
    ("CUDA_VISIBLE_DEVICES", "needs GPUs"),
    ("torchrun", "tests/test_parallel.py runs torchrun with the tiny model"),
    ("soak_server.py", "a 10-minute soak benchmark"),
    ("--quantize int4 --compile", "torch.compile takes minutes"),
]
HUB = re.compile(r"(--model )?(google/gemma-4-[\w.-]+|/path/to/gemma-4-[\w.-]+)")


def skipped(line):
    return next((why for key, why in SKIP if key in line), None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with what the README's commands read: JSONL data for `finetune`, and my-adapter after it."""
    d = tmp_path_factory.mktemp("readme")
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "later")]
    for name in ("train.jsonl", "valid.jsonl"):
        (d / name).write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny(workdir):
    """tiny-model/ in the work folder: the tiny E2B-shaped checkpoint with vision and audio towers, its tokenizer
    cut to its 512 ids (and tiny 26B and 31B, text only)."""
    import reference
    from test_gguf import tiny_tokenizer

    reference.build_media("e2b", str(workdir / "tiny-model"), vision=reference.VISION_EDGE, audio=reference.AUDIO_RUN)
    for shape, name in (("26b", "tiny-26b"), ("31b", "tiny-31b")):
        reference.build(shape, str(workdir / name))
    tiny_tokenizer(str(workdir / "tiny-model"), media_ids=reference.MEDIA_TOKENS)
    for name in ("tiny-26b", "tiny-31b"):
        tiny_tokenizer(str(workdir / name))
    return workdir / "tiny-model"


def tiny_for(hub_id: str) -> str:
    """The tiny checkpoint of the size a README line names (the tensor-parallel lines need 26B's experts and
    31B's four heads)."""
    return "tiny-26b" if "26B" in hub_id else "tiny-31b" if "31B" in hub_id else "tiny-model"


def shell_line(line: str, cwd) -> None:
    """One README command, with tiny-model/ for the checkpoint it names."""
    line = line.split("   #")[0].split("  #")[0].strip().rstrip("&").strip()
    line = HUB.sub(lambda m: ("--model " if m.group(1) else "") + tiny_for(m.group(2)), line)
    args = shlex.split(line.replace(".venv/bin/gemma4", GEMMA4))
    if args[0] != GEMMA4:
        raise AssertionError(f"not a gemma4 command: {line}")
    if "--epochs" in args:  # finetune: one step is enough to make the adapter the next lines use
        args += ["--steps", "1"]
    for flag in ("--gguf", "--mmproj", "--out"):
        if flag in args and os.path.exists(os.path.join(cwd, args[args.index(flag) + 1])) \
                and args[1] in ("export", "quantize", "merge"):  # (their outputs: made afresh)
            __import__("shutil").rmtree(os.path.join(cwd, args[args.index(flag) + 1]), ignore_errors=True)
            if os.path.isfile(os.path.join(cwd, args[args.index(flag) + 1])):
                os.remove(os.path.join(cwd, args[args.index(flag) + 1]))
    if args[1] == "serve":
        if "--port" in args:
            args[args.index("--port") + 1] = "0"
        proc = subprocess.Popen(args, cwd=cwd, stderr=subprocess.PIPE, text=True)
        try:
            out = ""
            while "serving" not in out:
                out = proc.stderr.readline()
                assert out, f"{line}: ended before serving"
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        return
    stdin = "Hello\n/quit\n" if args[1] == "chat" else None
    out = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Traceback" not in out.stderr, f"{line}\n{out.stderr[-2000:]}"


SHELL = [(n, line) for kind, text, n in BLOCKS if kind == "sh"
         for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


# The shell lines take about a minute together: they are marked slow (run them with -m slow).
@pytest.mark.slow
@pytest.mark.parametrize("line", [pytest.param(line, id=f"README:{n}") for n, line in SHELL])
def test_shell_line(line, workdir, tiny):
    why = skipped(line)
    if why:
        pytest.skip(why)
    if "gemma-4-E2B-it-Q4_0.gguf" in line and not (workdir / "mmproj-gemma-4-E2B-it-f16.gguf").exists():
        subprocess.run([GEMMA4, "export", "--model", "tiny-model", "--gguf", "gemma-4-E2B-it-Q4_0.gguf", "--type",
                        "q4_0", "--mmproj", "mmproj-gemma-4-E2B-it-f16.gguf"], cwd=workdir, check=True,
                       capture_output=True)
    if ("--adapter my-adapter" in line or "my-adapter" in line) and "finetune" not in line \
            and not (workdir / "my-adapter").exists():
        shell_line(".venv/bin/gemma4 finetune --model tiny-model --data train.jsonl --out my-adapter --epochs 1",
                   workdir)
    if "--resume" in line:  # a run that saved checkpoint-1 to continue from
        __import__("shutil").rmtree(workdir / "my-adapter", ignore_errors=True)
        shell_line(".venv/bin/gemma4 finetune --model tiny-model --data train.jsonl --out my-adapter --steps 2 "
                   "--save-every 1",
                   workdir)
        line = line.replace("...", "--model tiny-model --data train.jsonl")
    if "other-adapter" in line and not (workdir / "other-adapter").exists():
        __import__("shutil").copytree(workdir / "my-adapter", workdir / "other-adapter")
    shell_line(line, workdir)


PYTHON = [(n, text) for kind, text, n in BLOCKS if kind == "python"]


@pytest.mark.parametrize("code", [pytest.param(code, id=f"README:{n}") for n, code in PYTHON])
def test_python_block(code, workdir, tmp_path):
    cwd = str(tmp_path)  # its own folder: the adapter here is the built-in model's
    if "my-adapter" in code:
        subprocess.run([GEMMA4, "finetune", "--data", str(workdir / "train.jsonl"), "--out", "my-adapter", "--steps",
                        "1"], cwd=cwd, check=True, capture_output=True)
    server = None
    if "OpenAI(" in code:  # the client block: a server on the built-in model, as the README's serve line
        server = subprocess.Popen([GEMMA4, "serve", "--port", "0", "--api-key", "KEY"], stderr=subprocess.PIPE,
                                  text=True)
        line = ""
        while "serving" not in line:
            line = server.stderr.readline()
            assert line
        port = line.rsplit(":", 1)[1].split("/")[0]
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
