"""Fine-tuning (gemma4.train): the data formats and their loss masks, the training loop (learning, determinism,
resume), and the `gemma4 finetune` / `gemma4 merge` commands, on the built-in tiny model."""
import json
import random

import pytest
import torch

import gemma4
from gemma4.cli import main
from gemma4.train.data import DataError, batches, collate, encode_record, load_dataset
from gemma4.train.lora import LoRAConfig, adapter_state, load_adapter, lora_modules
from gemma4.train.trainer import Trainer, TrainConfig, lr_at

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def llm():
    return gemma4.LLM(None)


# (record, the text of the tokens learned): the model's turns with their closing <turn|>, its thinking and tool
# calls (up to and with the <|tool_response> it stops on), never the tool's result, the user's or the system's.
MASKS = [
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}]},
     "Hello!<turn|>4<turn|>"),
    ({"messages": [{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]},
     "<|channel>thought\nAdd them.\n<channel|>4<turn|>"),
    ({"messages": [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                       "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                   {"role": "tool", "name": "get_weather", "content": '{"temp": 15}'},
                   {"role": "assistant", "content": "It is 15 C."}], "tools": TOOLS},
     '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>It is 15 C.<turn|>'),
    ({"prompt": "The capital of France is", "completion": " Paris."}, " Paris."),
    ({"text": "Just text."}, "Just text."),
]


@pytest.mark.parametrize("record,learned", MASKS)
def test_loss_mask_covers_what_the_model_writes(llm, record, learned):
    ex = encode_record(llm, record, "data.jsonl:1")
    assert ex.ids[0] == llm.tokenizer.bos_id and not ex.learn[0]
    assert llm.tokenizer.decode([i for i, keep in zip(ex.ids, ex.learn) if keep]) == learned


BAD_RECORDS = [
    ("[1, 2]", "data.jsonl:2: a record must be a JSON object"),
    ('{"messages": []}', "data.jsonl:2: messages must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "data.jsonl:2: no assistant message"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "data.jsonl:2: "),
    ('{"prompt": "a"}', "data.jsonl:2: a prompt/completion record has exactly two strings"),
    ('{"prompt": "a", "completion": ""}', "data.jsonl:2: empty completion"),
    ('{"text": 5}', "data.jsonl:2: a text record has one non-empty string"),
    ('{"input": "x", "output": "y"}', "data.jsonl:2: unknown record format"),
    ('{"text": "a"', "data.jsonl:2: not valid JSON"),
]


@pytest.mark.parametrize("line,message", BAD_RECORDS)
def test_a_malformed_record_names_its_line(llm, tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message.replace("data.jsonl", ".*data.jsonl").replace("[", r"\[")):
        load_dataset(llm, f, 64)


def test_empty_and_missing_datasets(llm, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_dataset(llm, tmp_path / "empty.jsonl", 64)
    with pytest.raises(DataError, match="no dataset file"):
        load_dataset(llm, tmp_path / "nope.jsonl", 64)


def test_batches_and_labels(llm):
    exs = [encode_record(llm, {"text": "word " * n}, "x") for n in (3, 30, 4, 29, 5)]
    order = batches(exs, batch_tokens=64, seed=1)
    assert sorted(i for b in order for i in b) == list(range(5))
    for b in order:  # similar lengths together, within the token budget
        assert max(len(exs[i]) for i in b) * len(b) <= 64 or len(b) == 1
    batch = collate([exs[0], exs[1]], llm.tokenizer.pad_id)
    ids, labels = batch["input_ids"], batch["labels"]
    n0 = len(exs[0])
    assert labels[0, :n0 - 1].tolist() == ids[0, 1:n0].tolist()  # each position learns the next token
    assert (labels[0, n0 - 1:] == -100).all() and not batch["attention_mask"][0, n0:].any()


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    factors = [lr_at(s, 10, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0) and factors[-1] > 0.1 and factors == sorted(factors[:3]) + factors[3:]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def synthetic_chat(path, n=32, seed=0):
    """n questions whose answers are arbitrary ("pink 97"): learned only by memorising them."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "maple", "ocean", "candle", "rocket", "violet",
             "copper", "garden", "silver", "falcon", "harbor"]
    colors = ["red", "blue", "green", "gold", "black", "white", "pink", "gray"]
    pairs = [(f"What is the secret of {words[i % 16]} {i // 16}?", f"{rng.choice(colors)} {rng.randrange(100)}")
             for i in range(n)]
    with open(path, "w") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return pairs


def learner(quantize=None):
    """The built-in tiny model, its tied embedding scaled up: at std 0.02 its 64-wide hidden states cannot make
    any of 262K logits stand out (every loss stays near log(262144)), at 0.5 they can."""
    from gemma4.quant import quantize_model

    llm = gemma4.LLM(None)
    with torch.no_grad():
        llm.model.language_model.embed_tokens.weight.mul_(25)
    if quantize:
        quantize_model(llm.model, 4)
    return llm


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["lora", "qlora"])
def test_lora_learns_a_synthetic_chat_task(tmp_path, quantize):
    """32 arbitrary answers memorised: >= 95% exact greedy answers through the chat template afterwards."""
    pairs = synthetic_chat(tmp_path / "train.jsonl")
    llm = learner(quantize)
    examples = load_dataset(llm, tmp_path / "train.jsonl", 256)
    trainer = Trainer(llm, LoRAConfig(r=16, alpha=32),
                      TrainConfig(steps=200, lr=2e-3, warmup=5, batch_tokens=512, progress=False), str(tmp_path / "o"))
    result = trainer.train(examples)
    assert result["loss"] < 0.5 < trainer.history[0]["loss"]
    right = sum(llm.chat([{"role": "user", "content": q}], max_new_tokens=8, temperature=0).content.strip() == a
                for q, a in pairs)
    assert right >= 0.95 * len(pairs), right


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    """Two runs with one seed write the same adapter; a run stopped at a checkpoint and resumed ends with the
    uninterrupted run's adapter and losses (optimizer state, data position and RNG restored)."""
    synthetic_chat(tmp_path / "train.jsonl", n=8)
    cfg = dict(steps=6, lr=1e-3, batch_tokens=64, progress=False, seed=3)

    def run(out, stop_at=None, resume=None, save_every=0):
        llm = gemma4.LLM(None)
        ex = load_dataset(llm, tmp_path / "train.jsonl", 64)
        trainer = Trainer(llm, LoRAConfig(r=4, dropout=0.1), TrainConfig(**cfg, save_every=save_every), str(out))
        if resume:
            trainer.resume(resume)
        if stop_at:
            _train_until(trainer, ex, stop_at)
        else:
            trainer.train(ex)
        return trainer, adapter_state(llm.model)

    t1, a1 = run(tmp_path / "a")
    _, a2 = run(tmp_path / "b")
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    run(tmp_path / "c", stop_at=4, save_every=2)
    t3, a3 = run(tmp_path / "c", resume=str(tmp_path / "c" / "checkpoint-4"))
    assert all(torch.equal(a1[k], a3[k]) for k in a1)
    assert [h["loss"] for h in t3.history] == [h["loss"] for h in t1.history]


def _train_until(trainer, examples, steps):
    """Train, stopping (as if killed) right after the checkpoint at `steps`."""
    import gemma4.train.trainer as trainer_module

    real_save = trainer.save

    class Stop(Exception):
        pass

    def save(path, state):
        real_save(path, state)
        if trainer.step >= steps:
            raise Stop

    trainer.save = save
    try:
        trainer.train(examples)
    except Stop:
        pass
    assert trainer_module.latest_checkpoint(trainer.out).endswith(f"checkpoint-{steps}")


def test_finetune_and_merge_commands(tmp_path, capsys):
    """`gemma4 finetune` writes a PEFT adapter (and checkpoints); `gemma4 serve`-style loading applies it; `gemma4
    merge` folds it into a checkpoint that gives the adapted model's logits."""
    synthetic_chat(tmp_path / "train.jsonl", n=6)
    llm = gemma4.LLM(None)
    base = tmp_path / "base"
    from safetensors.torch import save_file

    from gemma4.llm import TINY_DIR

    base.mkdir()
    for name in ("config.json", "generation_config.json"):
        if TINY_DIR.joinpath(name).is_file():
            (base / name).write_text(TINY_DIR.joinpath(name).read_text())
    save_file({("model." + k if not k.startswith("language_model.") else "model." + k): v.contiguous()
               for k, v in llm.model.state_dict().items()}, str(base / "model.safetensors"))
    out = tmp_path / "adapter"
    code = main(["finetune", "--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
                 "--steps", "3", "--save-every", "2", "--rank", "4", "--lr", "1e-2", "--batch-tokens", "128"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2" / "trainer_state.pt").is_file()
    history = json.loads((out / "train_history.json").read_text())
    assert history["steps"] == 3 and len(history["history"]) == 3
    assert main(["merge", "--model", str(base), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    adapted = gemma4.load(base, device="cpu")
    load_adapter(adapted, out)
    merged = gemma4.load(tmp_path / "merged", device="cpu")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(ids)
        assert (merged(ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        assert (gemma4.load(base, device="cpu")(ids) - want).abs().max().item() > 0


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "rank r must be a positive integer"),
    (["--target-modules", "qkv"], r"target module\(s\) \['qkv'\] match no projection"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--data", "MISSING"], "no dataset file"),
    (["--resume"], "no checkpoint-N"),
    (["--layers", "a,b"], "expected a comma-separated list"),
])
def test_finetune_bad_input(tmp_path, capsys, argv, message):
    import re

    synthetic_chat(tmp_path / "train.jsonl", n=2)
    args = ["finetune", "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "out"), "--steps", "1"]
    args += [str(tmp_path / a) if a == "MISSING" else a for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_lora_modules_are_the_ones_trained(tmp_path):
    synthetic_chat(tmp_path / "train.jsonl", n=2)
    llm = gemma4.LLM(None)
    ex = load_dataset(llm, tmp_path / "train.jsonl", 64)
    trainer = Trainer(llm, LoRAConfig(r=2, target_modules=("q_proj",)), TrainConfig(steps=1, progress=False),
                      str(tmp_path / "o"))
    before = {n: p.clone() for n, p in llm.model.named_parameters()}
    trainer.train(ex)
    changed = {n for n, p in llm.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".q_proj.lora_" in n for n in changed)  # the base never moves
    assert len(lora_modules(llm.model)) == 6


@pytest.mark.parametrize("quantize,cap", [(None, 30.0), (None, None), ("int4", 30.0)])
def test_fused_head_loss_equals_autograd(quantize, cap):
    """HeadLoss (logits a chunk at a time, their gradient made in the forward) gives the loss and the gradient
    of plain cross-entropy over the whole logits through autograd, softcap or none, plain or quantized head."""
    from gemma4.quant import quantize_model
    from gemma4.train import trainer as trainer_module

    llm = gemma4.LLM(None)
    if quantize:
        quantize_model(llm.model, 4)
    text = llm.model.language_model
    import dataclasses

    text.cfg = dataclasses.replace(text.cfg, final_logit_softcap=cap)
    g = torch.Generator().manual_seed(0)
    # large hidden states: logits up to ~25, where the softcap bends them (1 - tanh^2 far from 1)
    h = (50 * torch.randn(45, text.cfg.hidden_size, dtype=torch.float32, generator=g)).requires_grad_()
    y = torch.randint(0, 262144, (45,), generator=g)
    want = torch.nn.functional.cross_entropy(text.logits(h).float(), y, reduction="sum")
    (g_want,) = torch.autograd.grad(want, h)
    old = trainer_module.LOSS_BYTES
    # 20 tokens a chunk: three chunks, the last one short. (More than 16 rows each: an int4 product of fewer rows
    # goes to the kernel, which rounds the activations to int8, and would differ from the whole batch's.)
    trainer_module.LOSS_BYTES = 20 * 4 * 262144
    try:
        got = trainer_module.HeadLoss.apply(h, y, text)
    finally:
        trainer_module.LOSS_BYTES = old
    (g_got,) = torch.autograd.grad(2.0 * got, h)
    # (an int4 head's products of 20 and of 45 rows round differently: bf16 GEMMs where bf16 is native)
    tol = 1e-4 if quantize else 1e-5
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    assert (g_got - 2.0 * g_want).abs().max().item() <= 100 * tol * g_want.abs().max().item()


def test_conversations_with_images_train_through_the_vision_tower(tmp_path):
    """A record whose user turn holds an image: the placeholders are expanded, the image encoded by the (frozen)
    tower in the batch, and the loss depends on which image it is."""
    import base64
    import io
    import json as json_module
    from importlib import resources

    from PIL import Image

    import reference
    from gemma4.config import parse_config
    from gemma4.llm import tiny_random_model
    from gemma4.train.data import collate
    from gemma4.train.trainer import batch_loss

    llm = gemma4.LLM(None)
    config = json_module.loads(resources.files("gemma4").joinpath("data/tiny-random/config.json").read_text())
    config.update(vision_config=reference.VISION_EDGE)
    llm.model = tiny_random_model(config=parse_config(config))
    llm.config = llm.model.config

    def record(color):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), color).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What color?"}]},
                             {"role": "assistant", "content": "It is red."}]}

    losses = []
    for color in ("red", "blue"):
        ex = encode_record(llm, record(color), "x:1")
        assert len(ex.media) == 1 and ex.ids.count(llm.config.token_ids["image_token_id"]) == ex.media[0].num_tokens
        assert llm.tokenizer.decode([i for i, keep in zip(ex.ids, ex.learn) if keep]) == "It is red.<turn|>"
        loss, n = batch_loss(llm.model, collate([ex], llm.tokenizer.pad_id))
        losses.append(loss.item() / n)
    assert losses[0] != losses[1] and all(0 < x < 20 for x in losses)
