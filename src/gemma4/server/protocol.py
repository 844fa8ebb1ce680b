"""The server's request and response bodies, as pydantic models: they validate requests and make the OpenAPI
document (/openapi.json) describe every body, as vLLM's does, so that client generators and fuzzers (schemathesis)
work from it. Numbers are strict (`"seed": true` or `"n": "2"` are refused) and finite; their bounds are the
sampler's own (engine/sample.py). Unknown fields are accepted and ignored, as OpenAI clients send extras."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..chat.request import BUDGETS
from ..chat.template import ROLES
from ..engine.sample import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
SEED_LIMIT = 1 << 63  # |seed| <= 2^63, exact in the document's JSON numbers; seed + choice index fits torch's seeds
MAX_JSON_DEPTH = 64  # objects and arrays in objects and arrays: deeper, a request could exhaust Python's stack


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- requests -------------------------------------------------------------------------------------------------
class StreamOptions(Open):
    include_usage: Bool | None = None


def json_depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep objects and arrays nest in `value` (a scalar: 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children)
    return deepest


class Sampling(Open):
    """The fields both completion endpoints take."""

    @model_validator(mode="before")
    @classmethod
    def not_too_deep(cls, data):
        # before the fields are validated: copying or rendering a 900-level structure overflows the stack
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"the request nests objects and arrays more than {MAX_JSON_DEPTH} levels deep")
        return data

    model: str | None = Field(None, description="the served model's id; other ids are refused")
    max_tokens: Annotated[Int, Field(ge=1)] | None = Field(None, description="default: the rest of the context")
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = Field(None, description="default 1; 0 = greedy")
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = Field(None, description="0 = off")
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = Field(
        None, description="1 = off")
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = Field(
        None, description="logit -= this x the token's count in the output (OpenAI's definition)")
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = Field(
        None, description="logit -= this once the token is in the output")
    seed: Annotated[Int, Field(ge=-SEED_LIMIT, le=SEED_LIMIT)] | None = Field(
        None, description="choice i samples with seed + i")
    n: Annotated[Int, Field(ge=1, le=16)] = 1
    stop: str | Annotated[list[str], Field(max_length=16)] | None = Field(
        None, description="strings that end a choice (not included)")
    stream: Bool = False
    stream_options: StreamOptions | None = None
    speculative: Bool = Field(True, description="draft with the server's --draft-model, where it has one "
                                                "(false: decode token by token)")


class ChatMessage(Open):
    role: Literal[ROLES]
    content: str | list[dict[str, Any]] | dict[str, Any] | None = Field(
        None, description="text, or content parts: text, image_url, input_audio, video_url (a dict: a tool result)")
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of type object")


class Tool(Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Open):
    name: str


class NamedToolChoice(Open):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(Open):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Bool | None = None


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="none / minimal: thinking off; low / medium / high: on")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description='{"enable_thinking": true} turns thinking on')
    image_budget: Literal[BUDGETS] | None = Field(None, description="soft tokens per image (default 280)")
    logprobs: Bool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None


TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=64)] | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)] = Field(
            description="text (a <bos> is added), token ids as they are, or a list of either (a batch: the choices "
                        "of prompt p are indices p x n ... p x n + n - 1)")
    logprobs: Annotated[Int, Field(ge=0, le=20)] | None = Field(
        None, description="each token's log-probability and the top k (OpenAI's completions format)")
    echo: Bool = Field(False, description="the prompt before the completion (with logprobs: the prompt's too)")
    suffix: str | None = Field(None, description="refused: Gemma 4 has no fill-in-the-middle")


class TokenizeRequest(Open):
    """vLLM's /tokenize: a prompt (text), or chat messages rendered as /v1/chat/completions renders them."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: Bool = Field(True, description="a prompt: add <bos>")
    add_generation_prompt: Bool = Field(True, description="messages: end with the model's turn")
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(Open):
    model: str | None = None
    tokens: list[Annotated[Int, Field(ge=0)]]


# ---- responses ------------------------------------------------------------------------------------------------
class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str

class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


FinishReason = Literal["stop", "length", "tool_calls", "error", "cancelled"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(description="the thought, when thinking was on")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None  # what it is served from: the checkpoint, or the adapter's directory (as vLLM)
    parent: str | None = None  # a LoRA adapter's base model (as vLLM)
    max_model_len: int | None = None  # the context served (as vLLM)
    input_modalities: list[str] | None = None  # what its prompts may hold: text, and image / video / audio


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


def sse_response(model: type[BaseModel], what: str) -> dict:
    """An endpoint's 200 answer: `model` as JSON, or with "stream": true server-sent events (the schema of one
    event, as OpenAPI 3.1 documents event streams)."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": f"a {what} chunk as JSON, or an error object, then `[DONE]`"}}}
    return {"model": model, "content": {"text/event-stream": {"schema": event}}}


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "the request is malformed or cannot be served (the message says why)"),
    (401, "missing or wrong API key"),
    (404, "no such model, or no such path"),
    (413, "the request body is over --max-request-bytes (plain text when its Content-Length said so up front)"),
    (429, "too many requests waiting, or too many loading media"),
    (500, "the server failed this request (the message gives a reference to its log)"),
    (503, "the server is shutting down: the request was still running when its drain timeout ran out"),
)}
ERRORS[413]["content"] = {"text/plain": {"schema": {"type": "string"}}}
