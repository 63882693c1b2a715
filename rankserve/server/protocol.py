"""OpenAI-compatible request/response schemas, and the errors that become 4xx bodies.

Requests are validated strictly (a string where a number belongs is a 400, never silently coerced). Unknown
fields are ignored, as OpenAI-compatible servers usually do, so newer clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from rankserve.runtime.sampling import SamplingParams

Number = StrictInt | StrictFloat


class APIError(Exception):
    """An error that reaches the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = {
            400: "invalid_request_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            503: "service_unavailable",
        }.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(e: ValidationError) -> APIError:
    """A 400 naming the offending top-level parameter (a union reports each alternative it tried)."""
    errors = e.errors()
    if errors[0].get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {errors[0].get('msg')}", None, "invalid_json")
    loc = errors[0].get("loc", ())
    param = str(loc[0]) if loc else None
    msgs = list(
        dict.fromkeys(err["msg"] for err in errors if tuple(err.get("loc", ()))[:1] == tuple(loc[:1]))
    )
    where = f" for '{param}'" if param else ""
    return APIError(400, f"invalid value{where}: {' or '.join(msgs[:4])}", param, "invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Parameters shared by both endpoints (top_k, min_p and repetition_penalty are extensions)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=0)] = 0
    min_p: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0)] = 1.0
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None  # torch.Generator's range
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            repetition_penalty=float(self.repetition_penalty),
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        ).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None  # the newer name for max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, u: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: empty choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def completion_response(rid: str, model: str, text: str, finish: str, u: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": u,
    }


def chat_response(rid: str, model: str, text: str, finish: str, u: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": u,
    }
