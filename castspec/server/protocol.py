"""The OpenAI wire format: request bodies (validated strictly, extra fields ignored) and response shapes.

Clients send fields we do not implement (`user`, `logprobs`, `frequency_penalty`, ...): they are ignored, like other
OpenAI-compatible servers do. A field we do read must have the right type and a valid value, else the request is
refused with 400 and the field named; "16" is not a number of tokens. Defaults are OpenAI's (temperature 1, top_p 1);
send `temperature: 0` for greedy decoding, the output then equals the target model's own.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 2048  # chat has no fixed default upstream; we use what fits in the context, at most this

PositiveInt = Annotated[int, Field(ge=1)]
Stop = Annotated[str, Field(min_length=1)]


class ApiError(Exception):
    """An error answered with OpenAI's error body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints share. `model` may be left out: the server serves one model."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; llama.cpp and vLLM take it too (0: off)
    seed: int | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=16)] | None = None
    n: Literal[1] | None = None  # one choice per request
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        """The plain {role, content} a chat template expects (text parts joined)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens; wins when both are given


def parse(model: type[_Body], raw: bytes) -> Any:
    """Validate a request body, or raise a 400 `ApiError` naming the first bad field."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = max(errors, key=lambda e: len(e["loc"]))  # within a union, the member that got furthest says most
        if first["type"] in ("json_invalid", "json_type"):
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
        message = first["msg"] if param is None else f"{param}: {first['msg']}"
        raise ApiError(400, message, param=param) from None


def _is_union_tag(part: object) -> bool:
    """pydantic names the union member it tried in the error location (`str`, `list[int]`); not a field."""
    return isinstance(part, str) and (part in ("str", "int", "bool", "float") or "[" in part or "-" in part)


# --- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, request_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    """The fields every response and chunk starts with."""
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens not prefilled (a kept prefix)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
