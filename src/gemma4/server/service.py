"""What the server does with a request, apart from HTTP: admit it, prepare it (render, load media, tokenize,
encode media), run its choices on the shared engine, and count it. app.py maps HTTP onto this.

Where each guard lives:
- body size (`Limits.max_request_bytes`): FastAPI's `max_body_size`, before the body is read (app.py);
- JSON nesting, types, finiteness and bounds of every field: the request models (protocol.py);
- sampling values: `SamplingParams`, the one validator, here turned into 400s;
- the model name, the waiting queue (429): `Service.admit`;
- prompt length: from the text's length before tokenizing, exactly after (chat/request.py, Engine.check);
- media: their kind before any byte is read, then fetched (chat/fetch.py) and decoded on their own small pool
  of workers, so that slow or heavy media never hold the threads that text requests use, at most
  `max_media_jobs` requests at a time (429 beyond); their soft tokens must fit the context;
- generation: a failing choice ends alone (engine); its request gets 400 (its grammar failed) or 500.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from ..chat import request as chat_request
from ..chat.request import MediaPolicy
from ..engine.engine import AsyncEngine
from ..engine.sample import SamplingParams
from .protocol import ChatRequest, CompletionRequest, Sampling

log = logging.getLogger("gemma4.server")


@dataclass
class Limits:
    max_request_bytes: int = 32 << 20  # a request body; base64 media count here
    max_waiting: int = 256  # requests queued for the engine before 429
    media_workers: int = 2  # threads that fetch and decode media
    max_media_jobs: int = 8  # requests loading media at once (running or queued for those threads) before 429


class APIError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class ChoiceFailed(Exception):
    """One choice ended with finish reason "error"; `error` is what the engine caught."""

    def __init__(self, error: Exception | None):
        super().__init__(str(error))
        self.error = error

    def api_error(self, request_id: str) -> APIError:
        if isinstance(self.error, ValueError):  # the request's own doing (its grammar, its values): say what
            return APIError(400, f"generation failed: {self.error}")
        return APIError(500, f"internal error while generating (request {request_id}; the server log has it)",
                        "server_error")


@dataclass
class Job:
    """A request ready to run: its prompt, encoded media, constraint and one SamplingParams per choice."""
    id: str
    model: str  # the served name, as the answers give it
    prompt_ids: list[int]
    params: list[SamplingParams]
    stops: list[str]  # stop strings
    media: torch.Tensor | None = None
    constraint: object = None
    created: int = field(default_factory=lambda: int(time.time()))
    adapter: int = 0  # the served LoRA adapter's slot (0: the base model)
    arrived: float = field(default_factory=time.monotonic)  # for the latency metrics
    generated: int = 0  # tokens generated so far, all choices (the access log)
    echo: str = ""  # /v1/completions echo: the prompt's text, before each choice's
    echo_logprobs: dict = field(default_factory=dict)  # ... and its tokens' logprob entries, per choice


class MediaWorkers:
    """`count` daemon threads that fetch and decode media. Not concurrent.futures' pool: its threads are joined
    when the process exits, so a fetch still dripping would hold up a drained server's exit."""

    def __init__(self, count: int):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._work, name=f"gemma4-media-{i}", daemon=True).start()

    def _work(self):
        while True:
            fn, args, future = self.jobs.get()
            if future.set_running_or_notify_cancel():  # False: its request was cancelled while it waited
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)

    def run(self, fn, *args) -> asyncio.Future:
        future = concurrent.futures.Future()
        self.jobs.put((fn, args, future))
        return asyncio.wrap_future(future)


def logprob_entry(tok, token: int, logprob: float | None, top) -> dict:
    """One token's logprob entry (OpenAI's chat shape; /v1/completions reshapes it): `top` (id, logprob) pairs,
    or None where there is nothing to rank (a prompt's first token)."""
    def part(i):
        return {"token": tok.id_to_token(i), "bytes": list(tok.decode([i]).encode())}
    return {**part(token), "logprob": logprob,
            "top_logprobs": None if top is None else [{**part(i), "logprob": lp} for i, lp in top]}


class Service:
    def __init__(self, llm, model_name: str, api_key: str | None = None, policy: MediaPolicy | None = None,
                 limits: Limits | None = None, metrics_public: bool = False):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.policy, self.limits, self.metrics_public = policy or MediaPolicy(), limits or Limits(), metrics_public
        self.engine = AsyncEngine.of(llm.engine)
        self.media = MediaWorkers(self.limits.media_workers)
        self.media_jobs = 0  # requests loading media now, running or queued (touched on the event loop only)
        self.max_prompt_tokens = llm.engine.max_prompt_tokens
        self.counters = dict.fromkeys(("requests_total", "requests_failed_total", "prompt_tokens_total",
                                       "generation_tokens_total"), 0)
        from .metrics import Metrics

        self.metrics = Metrics(self)

    # ---- admission and preparation
    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name) and model not in self.llm.adapters:
            served = ", ".join(repr(n) for n in [self.model_name, *self.llm.adapters])
            raise APIError(400, f"model {model!r} is not served here (served: {served})", param="model")

    async def tokenize(self, body) -> list[int]:
        """/tokenize: a prompt's ids, or chat messages' as /v1/chat/completions would feed them (media counted)."""
        self.check_model(body.model)
        if body.prompt is not None:  # (off the event loop: a 32 MB body takes seconds to tokenize)
            return await asyncio.to_thread(self.llm.tokenizer.encode, body.prompt, body.add_special_tokens)
        thinking = (body.chat_template_kwargs or {}).get("enable_thinking", False)
        dump = lambda x: x.model_dump(exclude_unset=True, by_alias=True)  # noqa: E731
        try:
            chat = await asyncio.to_thread(chat_request.render_request, self.llm, [dump(m) for m in body.messages],
                                           [dump(t) for t in body.tools] if body.tools else None, None, None,
                                           thinking is True, None, body.add_generation_prompt)
            items = await self._load_media(chat) if chat.media else []
            req = await asyncio.to_thread(chat_request.finish_request, self.llm, chat, items, None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return req.prompt_ids

    def admit(self, body: Sampling) -> None:
        self.check_model(body.model)
        if self.engine.waiting() >= self.limits.max_waiting:
            raise APIError(429, "too many requests waiting; try again later", "rate_limit_error")
        self.counters["requests_total"] += 1

    async def chat_job(self, body: ChatRequest) -> Job:
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", False)
        if not isinstance(thinking, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs")
        if body.reasoning_effort is not None:
            thinking = body.reasoning_effort not in ("none", "minimal")
        dump = lambda x: x.model_dump(exclude_unset=True, by_alias=True)  # noqa: E731 (as the client sent it)
        messages = [dump(m) for m in body.messages]
        tools = [dump(t) for t in body.tools] if body.tools is not None else None
        choice = body.tool_choice if body.tool_choice is None or isinstance(body.tool_choice, str) \
            else dump(body.tool_choice)
        fmt = dump(body.response_format) if body.response_format is not None else None
        llm = self.llm
        try:
            chat = await asyncio.to_thread(chat_request.render_request, llm, messages, tools, choice, fmt, thinking,
                                           body.image_budget)
            if chat.constraint is not None and body.n > 1:
                raise ValueError("n > 1 with tool_choice / response_format is not supported")
            items = await self._load_media(chat) if chat.media else []
            req = await asyncio.to_thread(chat_request.finish_request, llm, chat, items, self.max_prompt_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        media = await asyncio.to_thread(self.engine.run_locked, llm.model.encode_media, items) if items else None
        return self._job("chatcmpl", req.prompt_ids, body, req.stop_ids, media, req.constraint)

    async def completion_jobs(self, body: CompletionRequest) -> list[Job]:
        """One job per prompt (a list of prompts is a batch)."""
        if body.suffix:
            raise APIError(400, "suffix is not supported: Gemma 4 has no fill-in-the-middle", param="suffix")
        prompts = body.prompt if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) \
            else [body.prompt]
        jobs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                try:
                    ids = await asyncio.to_thread(chat_request.encode_prompt, self.llm.tokenizer, prompt,
                                                  self.max_prompt_tokens, True)
                except ValueError as e:
                    raise APIError(400, str(e), param="prompt") from None
            else:
                ids = list(prompt)
            job = self._job("cmpl", ids, body, None, echo_logprobs=body.echo and body.logprobs is not None)
            if body.echo:
                job.echo = prompt if isinstance(prompt, str) else self.llm.tokenizer.decode(ids)
            jobs.append(job)
        return jobs

    async def _load_media(self, chat) -> list:
        """Fetch and decode a request's media on the media workers (429 when too many requests wait for them)."""
        if self.media_jobs >= self.limits.max_media_jobs:
            raise APIError(429, "too many requests are loading media; try again later", "rate_limit_error")
        self.media_jobs += 1
        try:
            return await self.media.run(self._load_all, chat)
        finally:
            self.media_jobs -= 1

    def _load_all(self, chat) -> list:
        items, tokens = [], 0
        for m in chat.media:
            items.append(chat_request.load_media(m, chat.image_budget, self.policy))
            tokens += items[-1].num_tokens
            if tokens > self.max_prompt_tokens:  # before the next one is fetched and decoded
                raise ValueError(f"the media alone take {tokens} tokens; at most {self.max_prompt_tokens} fit "
                                 f"in the context")
        return items

    def _job(self, kind: str, prompt_ids: list[int], body: Sampling, stop_ids, media=None, constraint=None,
             echo_logprobs: bool = False) -> Job:
        """`echo_logprobs`: the engine scores the prompt too (each choice's prefill: Job.echo_logprobs)."""
        engine = self.llm.engine
        try:
            engine.check(prompt_ids, media)
            room = engine.max_prompt_tokens + 1 - len(prompt_ids)
            limit = min(body.max_tokens or room, room)
            logprobs = ((body.top_logprobs or 0) if body.logprobs else None) if isinstance(body, ChatRequest) \
                else body.logprobs
            params = [self.llm.generation.sampling(
                limit, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty, seed=None if body.seed is None else body.seed + i,
                stop_token_ids=stop_ids, logprobs=logprobs, speculative=body.speculative,
                prompt_logprobs=logprobs if echo_logprobs else None) for i in range(body.n)]
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("SamplingParams: ")) from None
        self.counters["prompt_tokens_total"] += len(prompt_ids)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(f"{kind}-{uuid.uuid4().hex}", body.model or self.model_name, prompt_ids, params, stops, media,
                   constraint, adapter=self.llm.adapters.get(body.model, 0))

    # ---- generation
    async def choice(self, job: Job, index: int):
        """Yield (token id or None, text delta, finish reason, logprob entry) for one choice; stop strings end
        it (leaving the loop cancels the generation); ChoiceFailed if the engine ended it with an error."""
        tok, params = self.llm.tokenizer, job.params[index]
        decoder, text = tok.decode_stream(), ""
        m, last, count = self.metrics, None, 0
        async for ev in self.engine.generate(job.prompt_ids, params, job.media, job.constraint, f"{job.id}/{index}",
                                             job.adapter):
            now = time.monotonic()
            if ev.finish_reason is not None:
                m.finished(ev.finish_reason, len(job.prompt_ids), count + (ev.token_id is not None), now - job.arrived)
            if ev.finish_reason == "error":
                raise ChoiceFailed(ev.error)
            if ev.token_id is None:
                yield None, "", ev.finish_reason, None
                return
            if ev.queued is not None:
                m.queue.observe(ev.queued)
            if ev.prompt_logprobs is not None:  # the first token's event: the prompt's, scored by the prefill
                ids = job.prompt_ids
                job.echo_logprobs[index] = [logprob_entry(tok, ids[0], None, None)] + [
                    logprob_entry(tok, t, lp, top) for t, (lp, top) in zip(ids[1:], ev.prompt_logprobs)]
            if last is None:
                m.ttft.observe(now - job.arrived)
            else:
                m.itl.observe(now - last)
            last, count = now, count + 1
            job.generated += 1
            self.counters["generation_tokens_total"] += 1
            stopped = ev.finish_reason == "stop" and ev.token_id in params.stop_token_ids
            piece = "" if stopped else decoder.step(ev.token_id)
            entry = None
            if params.logprobs is not None:
                entry = logprob_entry(tok, ev.token_id, ev.logprob, ev.top_logprobs or [])
            text += piece
            hit = next((s for s in job.stops if s in text), None)
            if hit is not None:  # cut at the stop string
                if ev.finish_reason is None:  # (a stop string at the last token was counted above)
                    m.finished("stop", len(job.prompt_ids), count, now - job.arrived)
                cut = text.index(hit)
                yield ev.token_id, piece[:max(0, len(piece) - (len(text) - cut))], "stop", entry
                return
            yield ev.token_id, piece, ev.finish_reason, entry

    async def run(self, job: Job):
        """Every choice at once: yield (choice index, token id, text delta, finish reason, logprob entry) as they
        come; the first ChoiceFailed is raised, and leaving early cancels what still runs."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index):
            try:
                async for item in self.choice(job, index):
                    await queue.put((index, *item))
            except ChoiceFailed as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(job.params))]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, ChoiceFailed):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
