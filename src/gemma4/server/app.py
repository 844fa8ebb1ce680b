"""The OpenAI-compatible HTTP server: `gemma4 serve --model PATH`.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), GET /v1/models,
/health and /metrics (Prometheus text). Every request goes through one AsyncEngine, so concurrent requests
share its batch. Bad requests get 400 with an OpenAI error body, a missing or wrong key 401, a full queue
429; a client that disconnects cancels its generation and frees its cache at the engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat.parse import StreamParser, parse_output
from ..chat.request import MediaPolicy, prepare_chat
from ..engine.engine import AsyncEngine
from ..engine.sample import SamplingParams


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored, as vLLM does
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(Sampling):
    messages: list[dict] = Field(min_length=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict | None = None
    image_budget: Literal[70, 140, 280, 560, 1120] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(min_length=1)


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class ServerState:
    def __init__(self, llm, model_name: str, api_key: str | None, policy: MediaPolicy, max_waiting: int):
        self.llm, self.model_name, self.api_key, self.policy = llm, model_name, api_key, policy
        self.served = AsyncEngine(llm.engine, max_waiting=max_waiting)
        self.counters = {"requests_total": 0, "requests_failed_total": 0, "prompt_tokens_total": 0,
                         "generation_tokens_total": 0}


def create_app(llm, model_name: str = "gemma4", api_key: str | None = None, policy: MediaPolicy | None = None,
               max_waiting: int = 256) -> FastAPI:
    app = FastAPI(title="gemma4", docs_url=None, redoc_url=None)
    state = ServerState(llm, model_name, api_key, policy or MediaPolicy(), max_waiting)
    app.state.gemma4 = state

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # never a bare 500 page
        state.counters["requests_failed_total"] += 1
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return error(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "gemma4"}]}

    @app.get("/metrics")
    async def metrics():
        engine = state.llm.engine
        mem = engine.memory()
        lines = [f"gemma4_{k} {v}" for k, v in state.counters.items()]
        lines += [f"gemma4_kv_used_bytes {mem['used_bytes']}", f"gemma4_kv_free_bytes {mem['free_bytes']}",
                  f"gemma4_requests_running {len(engine.scheduler.running)}",
                  f"gemma4_requests_waiting {len(engine.scheduler.waiting)}",
                  f"gemma4_preemptions_total {engine.scheduler.preemptions}",
                  f"gemma4_prefix_cache_tokens_total {engine.scheduler.cached_tokens}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def accept(request: Request, schema: type[Sampling]):
        """The request body validated, or the error response: 400 (bad body, unknown model), 429 (queue full)."""
        body = await parse_body(request, schema)
        if isinstance(body, JSONResponse):
            return body
        if body.model not in (None, state.model_name):
            return error(400, f"model {body.model!r} is not served here (try {state.model_name!r})",
                         param="model")
        if state.served.busy():
            return error(429, "too many requests waiting; try again later", "rate_limit_error")
        state.counters["requests_total"] += 1
        return body

    def sampling_params(body: Sampling, prompt_len: int, stop_ids, index: int) -> SamplingParams:
        llm = state.llm
        context = llm.config.text.max_position_embeddings
        limit = body.max_completion_tokens or body.max_tokens or context - prompt_len
        if prompt_len >= context:
            raise ValueError(f"the prompt has {prompt_len} tokens; the context is {context}")
        top = body.top_logprobs if isinstance(body.logprobs, bool) else body.logprobs
        return SamplingParams(max_new_tokens=max(1, min(limit, context - prompt_len)),
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty,
                              seed=None if body.seed is None else body.seed + index,
                              stop_token_ids=tuple(stop_ids or llm.stop_token_ids),
                              logprobs=(top or 0) if body.logprobs else None)

    async def run_one(prompt_ids, params, media, constraint, stops):
        """Yield (token_id, text delta, finish_reason, logprob entry) for one choice; stop strings end it."""
        tok = state.llm.tokenizer
        decoder, text = tok.decode_stream(), ""
        async for ev in state.served.generate(prompt_ids, params, media, constraint):
            if ev.token_id is None:
                yield None, "", ev.finish_reason, None
                return
            state.counters["generation_tokens_total"] += 1
            piece = "" if ev.finish_reason == "stop" and ev.token_id in params.stop_token_ids else \
                decoder.step(ev.token_id)
            entry = None
            if params.logprobs is not None:
                entry = {"token": tok.id_to_token(ev.token_id), "logprob": ev.logprob,
                         "bytes": list(tok.decode([ev.token_id]).encode()),
                         "top_logprobs": [{"token": tok.id_to_token(i), "logprob": lp,
                                           "bytes": list(tok.decode([i]).encode())} for i, lp in ev.top_logprobs or []]}
            text += piece
            hit = next((s for s in stops if s in text), None)
            if hit is not None:  # cut at the stop string; leaving the loop cancels the request
                cut = text.index(hit)
                yield ev.token_id, piece[:max(0, len(piece) - (len(text) - cut))], "stop", entry
                return
            yield ev.token_id, piece, ev.finish_reason, entry

    async def prepared(body: ChatRequest):
        kwargs = dict(body.chat_template_kwargs or {})
        thinking = bool(kwargs.pop("enable_thinking", False))
        if body.reasoning_effort is not None:
            thinking = body.reasoning_effort not in ("none", "minimal")
        llm = state.llm
        req = await asyncio.to_thread(prepare_chat, llm, body.messages, body.tools, body.tool_choice,
                                      body.response_format, thinking, body.image_budget, state.policy)
        media = None
        if req.media:
            with state.served.lock:  # the towers share the CPU / GPU with the engine's steps
                media = await asyncio.to_thread(llm.model.encode_media, req.media)
        return req, media

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await accept(request, ChatRequest)
        if isinstance(body, JSONResponse):
            return body
        try:
            req, media = await prepared(body)
            params = [sampling_params(body, len(req.prompt_ids), req.stop_ids, i) for i in range(body.n)]
            if req.constraint is not None and body.n > 1:
                raise ValueError("n > 1 with tool_choice / response_format is not supported")
        except (ValueError, TypeError) as e:
            state.counters["requests_failed_total"] += 1
            return error(400, str(e))
        state.counters["prompt_tokens_total"] += len(req.prompt_ids)
        stops = stop_strings(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        streams = [run_one(req.prompt_ids, p, media, req.constraint, stops) for p in params]
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_chat(head, streams, len(req.prompt_ids), include_usage),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(collect(s) for s in streams))
        choices, completion = [], 0
        for i, (text, reason, count, entries) in enumerate(results):
            out = parse_output(text)
            message = {"role": "assistant", "content": out.content, "reasoning_content": out.reasoning_content}
            if out.tool_calls:
                message["tool_calls"] = [c.to_openai() for c in out.tool_calls]
                reason = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": entries} if body.logprobs else None})
            completion += count
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(req.prompt_ids), completion)}

    async def stream_chat(head, streams, prompt_tokens, include_usage):
        queue: asyncio.Queue = asyncio.Queue()
        counts = [0] * len(streams)

        async def pump(i, s):
            parser, calls = StreamParser(), 0
            first = True
            try:
                async for token, piece, reason, entry in s:
                    counts[i] += token is not None
                    deltas = parser.feed(piece) + (parser.finish() if reason else [])
                    for d in deltas:
                        delta = {"role": "assistant"} if first else {}
                        first = False
                        if d.kind == "content":
                            delta["content"] = d.text
                        elif d.kind == "reasoning":
                            delta["reasoning_content"] = d.text
                        else:
                            delta["tool_calls"] = [{"index": calls, **d.tool_call.to_openai()}]
                            calls += 1
                        await queue.put((i, delta, None, None))
                    if entry is not None:
                        await queue.put((i, {}, None, {"content": [entry]}))
                    if reason:
                        await queue.put((i, {}, "tool_calls" if calls else reason, None))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                    continue
                i, delta, reason, logprobs = item
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
                yield sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage(prompt_tokens, sum(counts))})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop every choice's generation
            for t in tasks:
                t.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await accept(request, CompletionRequest)
        if isinstance(body, JSONResponse):
            return body
        llm = state.llm
        try:
            if isinstance(body.prompt, str):
                ids = llm.tokenizer.encode(body.prompt, add_bos=True)
            else:
                ids = list(body.prompt)
                bad_id = next((t for t in ids if not 0 <= t < llm.config.text.vocab_size), None)
                if bad_id is not None:
                    raise ValueError(f"prompt token id {bad_id} is out of range")
            params = [sampling_params(body, len(ids), None, i) for i in range(body.n)]
        except ValueError as e:
            state.counters["requests_failed_total"] += 1
            return error(400, str(e))
        state.counters["prompt_tokens_total"] += len(ids)
        stops = stop_strings(body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        streams = [run_one(ids, p, None, None, stops) for p in params]
        if body.stream:
            async def events():
                count = 0
                try:
                    for i, s in enumerate(streams):
                        async for token, piece, reason, _ in s:
                            count += token is not None
                            yield sse({**head, "object": "text_completion",
                                       "choices": [{"index": i, "text": piece, "finish_reason": reason}]})
                    if (body.stream_options or {}).get("include_usage"):
                        yield sse({**head, "object": "text_completion", "choices": [], "usage": usage(len(ids), count)})
                    yield "data: [DONE]\n\n"
                finally:
                    for s in streams:
                        await s.aclose()
            return StreamingResponse(events(), media_type="text/event-stream")
        results = await asyncio.gather(*(collect(s) for s in streams))
        return {**head, "object": "text_completion",
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                            for i, (text, reason, _, _) in enumerate(results)],
                "usage": usage(len(ids), sum(r[2] for r in results))}

    return app


async def parse_body(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error(400, f"malformed JSON: {e}")
    if not isinstance(data, dict):
        return error(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return error(400, f"{where}: {first['msg']}", param=where)


async def collect(stream) -> tuple[str, str, int, list]:
    text, reason, count, entries = "", None, 0, []
    async for token, piece, finish, entry in stream:
        text += piece
        count += token is not None
        reason = finish or reason
        if entry is not None:
            entries.append(entry)
    return text, reason, count, entries


def stop_strings(body: Sampling) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
