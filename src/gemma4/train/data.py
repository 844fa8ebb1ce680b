"""Fine-tuning data: JSONL in the formats TRL and mlx-lm read, turned into token ids and the tokens to learn.

One JSON object per line, in one of three formats:
  {"messages": [...], "tools": [...]?}  a conversation, rendered with the model's own chat template; the loss is
                                        on what the model writes: its turns (thinking, tool calls and the closing
                                        <turn|> included), not the user's, the system's, or the tool results
                                        inside a model turn. Messages may carry images / audio (OpenAI parts).
  {"prompt": str, "completion": str}    the loss is on the completion
  {"text": str}                          the loss is on every token
A malformed record is an error naming its file and line.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

import torch

IGNORE = -100  # the label of a token not learned (cross_entropy's ignore_index)
# What the model writes in a conversation: from after "<|turn>model\n" to its "<turn|>" (FORMAT.md 2.1), less the
# tool results the caller wrote into the turn, "response:...<tool_response|>" after the model's "<|tool_response>".
_MODEL_TURN = re.compile(r"<\|turn>model\n(.*?)(?:<turn\|>|\Z)", re.S)
_TOOL_RESULT = re.compile(r"<\|tool_response>(.*?<tool_response\|>)", re.S)


class DataError(ValueError):
    """A dataset that cannot be read: names the file and line."""


@dataclass
class Example:
    ids: list[int]  # the tokens, <bos> first
    learn: list[bool]  # per token: whether predicting it is in the loss
    media: list = field(default_factory=list)  # processed media items (gemma4.media), in prompt order
    where: str = ""  # file:line, for messages

    def __len__(self):
        return len(self.ids)


def model_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of `text` (a rendered conversation) that the model wrote: [start, end) pairs."""
    spans = []
    for turn in _MODEL_TURN.finditer(text):
        start, end = turn.start(1), turn.end()  # the closing <turn|> is learned: it is how the model stops
        pos = start
        for result in _TOOL_RESULT.finditer(text, start, turn.end(1)):
            spans.append((pos, result.start(1)))  # up to and with the model's own <|tool_response>
            pos = result.end(1)
        spans.append((pos, end))
    return [(a, b) for a, b in spans if b > a]


def _learned(offsets, spans, n) -> list[bool]:
    """Per token (by its character offsets): whether it starts inside one of `spans`."""
    out, j = [False] * n, 0
    for i, (a, _) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        out[i] = j < len(spans) and spans[j][0] <= a < spans[j][1]
    return out


def encode_text(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    """text -> (ids with <bos> first, learned flags): a token is learned when it starts inside a span (None: all)."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    learn = [True] * len(ids) if spans is None else _learned(offsets, spans, len(ids))
    if not ids or ids[0] != tokenizer.bos_id:
        ids, learn = [tokenizer.bos_id, *ids], [False, *learn]
    learn[0] = False  # nothing predicts <bos>
    return ids, learn


def encode_record(llm, record, where: str, enable_thinking: bool = False) -> Example:
    """One JSONL record -> Example (see the module doc). `llm`: a gemma4.LLM (tokenizer, chat template, towers)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    tok = llm.tokenizer
    if "messages" in record:
        from ..chat.request import prepare_chat
        from ..media import MediaError

        extra = set(record) - {"messages", "tools"}
        if extra:
            raise DataError(f"{where}: unexpected keys {sorted(extra)} beside messages")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message: nothing to learn")
        try:
            chat = prepare_chat(llm, messages, record.get("tools"), enable_thinking=enable_thinking,
                                add_generation_prompt=False)
        except (ValueError, OSError, MediaError) as e:
            raise DataError(f"{where}: {e}") from None
        ids, learn = encode_text(tok, chat.prompt, model_spans(chat.prompt))
        return Example(ids, learn, list(chat.media), where)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or set(record) - {"prompt", "completion"}:
            raise DataError(f"{where}: a prompt/completion record has exactly two strings, prompt and completion")
        if not completion:
            raise DataError(f"{where}: empty completion: nothing to learn")
        ids, learn = encode_text(tok, prompt + completion, [(len(prompt), len(prompt) + len(completion))])
        return Example(ids, learn, [], where)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"] or set(record) - {"text"}:
            raise DataError(f"{where}: a text record has one non-empty string, text")
        ids, learn = encode_text(tok, record["text"], None)
        return Example(ids, learn, [], where)
    raise DataError(f"{where}: unknown record format (keys {sorted(record)}); use messages, prompt + completion, "
                    "or text")


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, object]]:
    """-> [(file:line, parsed record)]; blank lines are skipped, anything else that is not JSON is an error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"no dataset file at {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise DataError(f"{path}: the dataset is empty")
    return out


def load_dataset(llm, path, max_len: int, enable_thinking: bool = False) -> list[Example]:
    """A JSONL file -> its examples, each cut to `max_len` tokens (media slots are never cut through)."""
    examples = []
    for where, record in read_jsonl(path):
        ex = encode_record(llm, record, where, enable_thinking)
        if len(ex) > max_len:
            if ex.media:
                raise DataError(f"{where}: {len(ex)} tokens with media, longer than max_len {max_len}")
            ex.ids, ex.learn = ex.ids[:max_len], ex.learn[:max_len]
        if not any(ex.learn[1:]):
            raise DataError(f"{where}: no token to learn within the first {max_len} tokens")
        examples.append(ex)
    return examples


def batches(examples: list[Example], batch_tokens: int, seed: int) -> list[list[int]]:
    """Length bucketing: indices sorted by length, cut into batches of at most `batch_tokens` padded tokens (one
    example at least), the batches in a seeded random order: padding stays small and each batch's size similar."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(examples[i])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    random.Random(seed).shuffle(out)
    return out


def collate(examples: list[Example], pad_id: int) -> dict:
    """-> input_ids / attention_mask [B, T] (right padding), labels [B, T] (the next token where it is learned,
    else IGNORE), media (the batch's items in order)."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.ids)
        mask[b, :n] = True
        nxt, learn = torch.tensor(e.ids[1:]), torch.tensor(e.learn[1:])
        labels[b, :n - 1] = torch.where(learn, nxt, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "media": [m for e in examples for m in e.media]}
