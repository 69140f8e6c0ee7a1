"""The OpenAI wire format, both ways: request models, their checks, the chat template, responses and errors.

Requests are parsed strictly from the raw body (a string where a number belongs is a 400, not coerced), as
the documented OpenAI fields plus vLLM's `top_k` and hiermem's own `memory`, `router`, `block_level` and `rag`.
Fields are honoured where generation can (sampling, penalties, logit_bias, stop, n, seed, logprobs, echo,
streaming with usage) and ignored where they do not change the output here (`user`, `metadata`, `store`,
`service_tier`, ...); a value this server cannot honour (tools, JSON output, suffix, audio, ...) is a 400 that
names the field. Unknown fields are ignored, as vLLM does. Every error is OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hiermem.config import MEMORY_MODES

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_RAG = 16  # retrieved documents a request may ask for
CHAT_STOP = "\nUser:"  # the native chat template's next turn: a reply ends before it


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status plus {"error": {...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # extra fields: ignored, as vLLM does


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields completions and chat share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: no top-k
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - 4096)  # a choice's seed is seed + its index
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # hiermem's extensions: which memory, routed how; how many training documents to retrieve (RAG)
    memory: Literal[MEMORY_MODES] | None = None
    router: Literal["centroid", "knn"] | None = None
    block_level: int | None = Field(None, ge=0)
    rag: int | None = Field(None, ge=0, le=MAX_RAG)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} sequences, got {len(stops)}", "stop")
        return stops

    def bias(self, vocab_size: int) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise bad_request(f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
            if not -100 <= value <= 100:
                raise bad_request(f"logit_bias: the bias of token {key} must be in [-100, 100], got {value}",
                                  "logit_bias")
            out[int(key)] = float(value)
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check(self) -> None:
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                                  "messages")
            parts.append(part.text)
        return "".join(parts)


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def check(self) -> None:
        unsupported = [("tools", bool(self.tools)), ("functions", bool(self.functions)),
                       ("tool_choice", self.tool_choice not in (None, "none", "auto")),
                       ("audio", self.audio is not None), ("prediction", self.prediction is not None),
                       ("web_search_options", self.web_search_options is not None),
                       ("modalities", self.modalities not in (None, ["text"])),
                       ("response_format", self.response_format is not None and self.response_format.type != "text")]
        for name, bad in unsupported:
            if bad:
                raise bad_request(f"{name}: this server generates plain text only; the value given is not "
                                  "supported", name)
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class RouteRequest(_Strict):
    """The explorer's question: where does this prompt go, and what is in its leaf?"""

    prompt: str
    router: Literal["centroid", "knn"] | None = None
    block_level: int | None = Field(None, ge=0)
    documents: int = Field(5, ge=0, le=20)


def parse(model: type[BaseModel], raw: bytes):
    """The request model from a raw body; malformed JSON or a wrong type or value is a 400 naming the field."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not _union_branch(x)]
        if err["type"] == "json_invalid":
            raise bad_request(f"the body is not valid JSON ({err['msg']})") from None
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        raise bad_request(f"{where}: {err['msg']}", param) from None


def _union_branch(x) -> bool:
    """pydantic names the union branch it tried in an error's location ("stop.str"); the field is what matters."""
    return isinstance(x, str) and (x in {"str", "int", "float", "bool"} or "[" in x)


def chat_prompt(messages: list[ChatMessage]) -> tuple[str, str]:
    """The native anchors' chat template, and the text the prompt is routed on (the last user message).

        System: <system or developer message>
        User: <message>
        Assistant: <message>
        ...
        Assistant:

    A reply stops before a new "\\nUser:" turn (CHAT_STOP)."""
    label = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    lines = [f"{label[m.role]}: {m.text(i)}" for i, m in enumerate(messages)]
    users = [m.text(i) for i, m in enumerate(messages) if m.role == "user"]
    return "\n".join(lines + ["Assistant:"]), (users[-1] if users else lines[-1])


def checkpoint_chat_template(checkpoint: str):
    """The chat template of a Hugging Face checkpoint folder (a post-hoc run's model.hf), as a function
    messages -> (prompt, route text), or None when its tokenizer has none (the native template then applies).
    Rendered by transformers' own apply_chat_template, with the generation prompt appended; a reply ends at the
    checkpoint's eos, which generation already stops at."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)  # a local folder: nothing is downloaded
    if not getattr(tok, "chat_template", None):
        return None

    def render(messages: list[ChatMessage]) -> tuple[str, str]:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                 for i, m in enumerate(messages)]
        users = [t["content"] for t in turns if t["role"] == "user"]
        prompt = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return prompt, (users[-1] if users else turns[-1]["content"])

    return render


# -- responses ----------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(id: str, object: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]] | None]], offset: int) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for text, lp, top in entries:
        tokens.append(text)
        lps.append(lp)
        tops.append(None if top is None else {t: v for t, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]] | None]]) -> dict:
    def item(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(text, lp), "top_logprobs": [item(t, v) for t, v in (top or [])]}
                        for text, lp, top in entries]}


__all__ = ["APIError", "CHAT_STOP", "ChatCompletionRequest", "CompletionRequest", "RouteRequest", "bad_request",
           "chat_logprobs", "chat_prompt", "checkpoint_chat_template", "completion_logprobs", "envelope", "new_id", "parse", "usage"]
