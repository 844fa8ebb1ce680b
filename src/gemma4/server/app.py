"""The OpenAI-compatible HTTP server: `gemma4 serve --model PATH`.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), GET /v1/models,
/health and /metrics (Prometheus text), and at / a chat page (chat.html) built on those. Every request goes
through one AsyncEngine, so concurrent requests share its batch. The handlers below only map HTTP onto the service (service.py), which holds every limit and
check; bodies are the pydantic models of protocol.py, so /openapi.json describes them all.

Answers other than 200 carry OpenAI's error body: 400 for a bad request (the message says what), 401 for a
missing or wrong key, 413 for a body over --max-request-bytes, 429 when the queue (or the media workers) are
full, 500 for a failure of ours (a generic text with a reference; the traceback goes to the log), 503 for a
request still running when a SIGTERM's drain timeout (--shutdown-timeout) runs out. A client that disconnects,
streaming or not, cancels its generation, which frees its K/V at the engine's next step.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from .. import __version__
from ..chat.parse import StreamParser, parse_output
from ..chat.request import MediaPolicy
from .protocol import (
    ERRORS,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    Version,
    sse_response,
)
from .service import APIError, ChoiceFailed, Job, Limits, Service

log = logging.getLogger("gemma4.server")
access = logging.getLogger("gemma4.access")
router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="the server's --api-key, as `Authorization: Bearer KEY`")


def create_app(llm, model_name: str = "gemma4", api_key: str | None = None, policy: MediaPolicy | None = None,
               limits: Limits | None = None, metrics_public: bool = False) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="gemma4", version=__version__, docs_url=None, redoc_url=None,
                  max_body_size=limits.max_request_bytes)
    app.state.service = Service(llm, model_name, api_key, policy, limits, metrics_public)
    app.state.page = chat_page()
    app.include_router(router)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_middleware(CatchAll)
    app.add_middleware(AccessLog)
    app.openapi = lambda: openapi(app)
    return app


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the one model id this server accepts, and without the 422 answers FastAPI
    assumes (a body that fails validation gets 400 here)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        schemas = schema["components"]["schemas"]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for name in ("ChatRequest", "CompletionRequest"):
            schemas[name]["properties"]["model"]["anyOf"][0]["enum"] = [app.state.service.model_name]
    return app.openapi_schema


# ---- plumbing: the service, auth, errors, disconnects ----------------------------------------------------------
# Dependencies are `async def`: FastAPI runs plain functions on a worker thread, a hop per request for nothing.
async def service(request: Request) -> Service:
    return request.app.state.service


async def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """401 unless the request carries the server's key (`Bearer` in any case; compared in constant time)."""
    key = request.app.state.service.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "missing or wrong API key", "authentication_error")


async def require_metrics_key(request: Request,
                              credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    if not request.app.state.service.metrics_public:
        await require_key(request, credentials)


def error_response(e: APIError, request: Request) -> JSONResponse:
    request.app.state.service.counters["requests_failed_total"] += 1
    log.log(logging.WARNING if e.status != 401 else logging.INFO, "%s %s -> %d %s", request.method,
            request.url.path, e.status, e.message)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), e.status, headers=headers)


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e, request)


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"] if x != "body")
    if first["type"] == "json_invalid":
        message = f"malformed JSON: {first.get('ctx', {}).get('error', '')}"
    elif not where and not isinstance(e.body, (dict, list)):
        message = "the body must be a JSON object, sent with Content-Type: application/json"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
        message = f"{where}: {message}" if where else message
    return error_response(APIError(400, message, param=where or None), request)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    message = str(e.detail)
    if e.status_code == 413:
        limit = request.app.state.service.limits.max_request_bytes
        message = f"the request body is over the server's limit of {limit} bytes"
    return error_response(APIError(e.status_code, message, "request_too_large" if e.status_code == 413 else
                                   "invalid_request_error"), request)


class AccessLog:
    """One line per request once its answer is sent (streams: at their end): client, method, path, status,
    prompt and generated tokens, seconds. Logger `gemma4.access`, at INFO."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            jobs = scope.get("state", {}).get("jobs") or []
            tokens = f" {sum(len(j.prompt_ids) for j in jobs)}+{sum(j.generated for j in jobs)} tokens" if jobs \
                else ""
            client = scope.get("client") or ("-", 0)
            access.info('%s:%s "%s %s" %s%s %.3fs', client[0], client[1], scope.get("method"), scope.get("path"),
                        status[0] or "-", tokens, time.monotonic() - start)


class CatchAll:
    """A failure of ours becomes one 500 with a generic text and a reference, its traceback logged, and the
    connection stays usable. (Starlette's own last-resort handler answers and then re-raises, which makes
    uvicorn reset the connection: the client's next request on it failed.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:  # the drain timeout ran out: uvicorn cancels what still runs, and exits
            log.info("%s %s cancelled at shutdown", scope.get("method"), scope.get("path"))
            if not started:
                e = APIError(503, "the server is shutting down; this request was cancelled", "server_error")
                await JSONResponse(e.body(), 503)(scope, receive, send)
        except Exception:
            if started:  # an answer is under way (or a 413 was sent by the body limit): theirs to handle
                raise
            ref = uuid.uuid4().hex[:12]
            log.exception("%s %s failed (ref %s)", scope.get("method"), scope.get("path"), ref)
            scope["app"].state.service.counters["requests_failed_total"] += 1
            e = APIError(500, f"internal error (ref {ref}); the server log has the details", "server_error")
            await JSONResponse(e.body(), 500)(scope, receive, send)


async def until_disconnected(request: Request) -> None:
    # The body has been read: the next message is the disconnect (uvicorn also sends it once we have answered).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, coro):
    """(True, coro's result), or (False, None) if the client went away first: coro is cancelled then, which
    cancels its generation (a non-streamed request has no write to fail when its client is gone)."""
    work, gone = asyncio.ensure_future(coro), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        log.info("%s: the client went away; its request is cancelled", request.url.path)
        return False, None
    return True, work.result()


GONE = Response(status_code=499)  # never read: the client has gone


# ---- endpoints --------------------------------------------------------------------------------------------------
def chat_page() -> HTMLResponse:
    """chat.html, with a Content-Security-Policy that lets only its own script run (by hash) and talk only to
    this server: if model text ever reached the page as markup, a <script> or onerror= in it would not run."""
    with open(os.path.join(os.path.dirname(__file__), "chat.html"), encoding="utf-8") as f:
        page = f.read()
    [script] = re.findall(r"^<script>(.*?)^</script>", page, re.M | re.S)  # (the one script: at a line's start)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src 'self' data: "
              "blob:; media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return HTMLResponse(page, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request):
    return request.app.state.page


@router.get("/health", response_model=Health, summary="liveness (no key needed)")
async def health():
    return {"status": "ok"}


@router.get("/version", response_model=Version, summary="the server's version (no key needed)")
async def version():
    return {"version": __version__}


def model_cards(svc: Service) -> list[dict]:
    cfg = svc.llm.config
    kinds = ["text"] + (["image", "video"] if cfg.vision is not None else []) + (["audio"] if cfg.audio is not None
                                                                                  else [])
    base = {"id": svc.model_name, "object": "model", "created": 0, "owned_by": "gemma4",
            "max_model_len": svc.llm.engine.max_model_len, "input_modalities": kinds}
    adapters = [{**base, "id": name, "root": path, "parent": svc.model_name} for name, path in svc.llm.lora.items()]
    return [base, *adapters]


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)],
            responses={401: ERRORS[401]})
async def models(svc: Service = Depends(service)):
    return {"object": "list", "data": model_cards(svc)}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(require_key)],
            responses={401: ERRORS[401], 404: ERRORS[404]})
async def model(model_id: str, svc: Service = Depends(service)):
    card = next((c for c in model_cards(svc) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model")
    return card


@router.post("/tokenize", response_model=TokenizeResponse, dependencies=[Depends(require_key)],
             responses={400: ERRORS[400], 401: ERRORS[401]}, summary="token ids of a prompt or of chat messages")
async def tokenize(body: TokenizeRequest, svc: Service = Depends(service)):
    ids = await svc.tokenize(body)
    return {"count": len(ids), "max_model_len": svc.llm.engine.max_model_len, "tokens": ids}


@router.post("/detokenize", response_model=DetokenizeResponse, dependencies=[Depends(require_key)],
             responses={400: ERRORS[400], 401: ERRORS[401]}, summary="the text of token ids")
async def detokenize(body: DetokenizeRequest, svc: Service = Depends(service)):
    svc.check_model(body.model)
    vocab = svc.llm.config.text.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range (token ids are in [0, {vocab}))", param="tokens")
    return {"prompt": svc.llm.tokenizer.decode(body.tokens)}


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_metrics_key)],
            summary="Prometheus text (behind the key unless --metrics-public)",
            responses={401: {"description": ERRORS[401]["description"], "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})
async def metrics(svc: Service = Depends(service)):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)],
             responses={200: sse_response(ChatCompletion, "chat.completion"), **ERRORS})
async def chat_completions(body: ChatRequest, request: Request, svc: Service = Depends(service)):
    return await answer(request, svc, body, svc.chat_job, stream_chat,
                        lambda job, results: chat_completion(job, results, body.logprobs))


@router.post("/v1/completions", dependencies=[Depends(require_key)],
             responses={200: sse_response(Completion, "text_completion"), **ERRORS})
async def completions(body: CompletionRequest, request: Request, svc: Service = Depends(service)):
    svc.admit(body)
    here, jobs = await unless_disconnected(request, svc.completion_jobs(body))
    if not here:
        return GONE
    request.state.jobs = jobs
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_completion(svc, jobs, usage, body.logprobs is not None),
                                 media_type="text/event-stream")
    here, results = await unless_disconnected(request, asyncio.gather(*(collect(svc, job) for job in jobs)))
    return completion(jobs, results, body.logprobs is not None) if here else GONE


async def answer(request: Request, svc: Service, body, prepare, stream, whole):
    """What both endpoints do: admit the request, prepare its job, then stream it, or collect every choice
    and shape the answer with `whole(job, results)`; a client that goes away cancels it at any point."""
    svc.admit(body)
    here, job = await unless_disconnected(request, prepare(body))
    if not here:
        return GONE
    request.state.jobs = [job]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(svc, job, usage), media_type="text/event-stream")
    here, results = await unless_disconnected(request, collect(svc, job))
    return whole(job, results) if here else GONE


# ---- bodies ----------------------------------------------------------------------------------------------------
def chat_completion(job: Job, results, logprobs: bool | None) -> dict:
    choices, completion = [], 0
    for i, (text, reason, count, entries) in enumerate(results):
        out = parse_output(text)
        message = {"role": "assistant", "content": out.content, "reasoning_content": out.reasoning_content}
        if out.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in out.tool_calls]
            reason = "tool_calls"
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": {"content": entries} if logprobs else None})
        completion += count
    return {**head(job, "chat.completion"), "choices": choices, "usage": usage_of(job, completion)}


def completion_logprobs(entries: list[dict], text: str, offset: int = 0) -> dict:
    """Logprob entries of the tokens that make `text` -> OpenAI's completions format (token texts, their
    logprobs, top {text: logprob}, and where each token's text starts in the choice's text, which has `offset`
    characters before `text`). A token whose bytes are not next in the text (a special token such as <bos>,
    which the text leaves out) takes no room in it."""
    texts = [bytes(e["bytes"]).decode("utf-8", "replace") for e in entries]
    data, pos, starts = text.encode(), 0, []
    for e in entries:
        starts.append(offset + len(data[:pos].decode("utf-8", "ignore")))
        pos += len(e["bytes"]) if data.startswith(bytes(e["bytes"]), pos) else 0
    tops = [None if e["top_logprobs"] is None else
            {bytes(t["bytes"]).decode("utf-8", "replace"): t["logprob"] for t in e["top_logprobs"]} for e in entries]
    return {"tokens": texts, "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops,
            "text_offset": starts}


def completion(jobs: list[Job], results, logprobs: bool) -> dict:
    choices, n = [], len(jobs[0].params)
    for p, (job, job_results) in enumerate(zip(jobs, results)):
        for i, (text, reason, _, entries) in enumerate(job_results):
            lp = completion_logprobs(job.echo_logprobs.get(i, []) + entries, job.echo + text) if logprobs else None
            choices.append({"index": p * n + i, "text": job.echo + text, "finish_reason": reason, "logprobs": lp})
    usage = {"prompt_tokens": sum(len(j.prompt_ids) for j in jobs),
             "completion_tokens": sum(r[2] for rs in results for r in rs)}
    return {**head(jobs[0], "text_completion"), "choices": choices,
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}


async def collect(svc: Service, job: Job) -> list[tuple[str, str, int, list]]:
    """Every choice whole: (text, finish reason, tokens, logprob entries); a failed choice answers for all."""
    results = [["", None, 0, []] for _ in job.params]
    try:
        async for i, token, piece, reason, entry in svc.run(job):
            r = results[i]
            r[0] += piece
            r[1] = reason or r[1]
            r[2] += token is not None
            if entry is not None:
                r[3].append(entry)
    except ChoiceFailed as e:
        raise e.api_error(job.id) from None
    return [tuple(r) for r in results]


async def stream_chat(svc: Service, job: Job, include_usage: bool):
    parsers, calls, started = [StreamParser() for _ in job.params], [0] * len(job.params), set()
    counts = [0] * len(job.params)
    try:
        async for i, token, piece, reason, entry in svc.run(job):
            counts[i] += token is not None
            for d in parsers[i].feed(piece) + (parsers[i].finish() if reason else []):
                delta = {} if i in started else {"role": "assistant"}
                started.add(i)
                if d.kind == "content":
                    delta["content"] = d.text
                elif d.kind == "reasoning":
                    delta["reasoning_content"] = d.text
                else:
                    delta["tool_calls"] = [{"index": calls[i], **d.tool_call.to_openai()}]
                    calls[i] += 1
                yield chunk(job, i, delta)
            if entry is not None:
                yield chunk(job, i, {}, logprobs={"content": [entry]})
            if reason:
                yield chunk(job, i, {}, "tool_calls" if calls[i] else reason)
        if include_usage:
            yield sse({**head(job, "chat.completion.chunk"), "choices": [], "usage": usage_of(job, sum(counts))})
    except ChoiceFailed as e:
        yield stream_error(svc, e, job)
    yield "data: [DONE]\n\n"


async def stream_completion(svc: Service, jobs: list[Job], include_usage: bool, logprobs: bool):
    """Every prompt's choices at once (index p x n + i), each starting with the echoed prompt if asked."""
    queue: asyncio.Queue = asyncio.Queue()
    n, first = len(jobs[0].params), jobs[0]

    async def pump(p, job):
        try:
            async for item in svc.run(job):
                await queue.put((p, *item))
        except ChoiceFailed as e:
            await queue.put((e, job))
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(p, job)) for p, job in enumerate(jobs)]
    count, done, sent = 0, 0, [0] * (len(jobs) * n)  # characters already sent per choice (its offsets)
    try:
        for p, job in enumerate(jobs):  # echo without logprobs now; with them at the choice's first token
            for i in range(n) if job.echo and not logprobs else ():
                sent[p * n + i] = len(job.echo)
                yield sse({**head(first, "text_completion"), "choices": [{"index": p * n + i, "text": job.echo,
                                                                          "finish_reason": None, "logprobs": None}]})
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
                continue
            if isinstance(item[0], ChoiceFailed):
                yield stream_error(svc, item[0], item[1])
                break
            p, i, token, piece, reason, entry = item
            count += token is not None
            job, c = jobs[p], p * n + i
            if job.echo and logprobs and i in job.echo_logprobs:
                sent[c] = len(job.echo)
                yield sse({**head(first, "text_completion"), "choices": [{
                    "index": c, "text": job.echo, "finish_reason": None,
                    "logprobs": completion_logprobs(job.echo_logprobs.pop(i), job.echo)}]})
            lp = completion_logprobs([entry], piece, sent[c]) if logprobs and entry is not None else None
            sent[c] += len(piece)
            yield sse({**head(first, "text_completion"), "choices": [{"index": p * n + i, "text": piece,
                                                                      "finish_reason": reason, "logprobs": lp}]})
        else:
            if include_usage:
                prompt = sum(len(j.prompt_ids) for j in jobs)
                yield sse({**head(first, "text_completion"), "choices": [], "usage": {
                    "prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}})
    finally:
        for t in tasks:
            t.cancel()
    yield "data: [DONE]\n\n"


def stream_error(svc: Service, failure: ChoiceFailed, job: Job) -> str:
    """The error event of a stream whose status line (200) has gone: vLLM's `data: {"error": ...}`."""
    e = failure.api_error(job.id)
    svc.counters["requests_failed_total"] += 1
    return sse(e.body())


def chunk(job: Job, index: int, delta: dict, reason: str | None = None, logprobs=None) -> str:
    return sse({**head(job, "chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]})


def head(job: Job, kind: str) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model}


def usage_of(job: Job, completion: int) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
