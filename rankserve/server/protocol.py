"""OpenAI-compatible request/response schemas, and the errors that become 4xx bodies.

Requests are validated strictly (a string where a number belongs is a 400, never silently coerced); the
sampling values themselves are checked by :meth:`SamplingParams.validate`, the one check the CLI uses too.
OpenAI fields that would change the answer but are not implemented (``logit_bias``, ``tools``, ``n`` > 1, ...)
are a 400 that names them; other unknown fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

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

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
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

    model_config = ConfigDict(extra="ignore")

    # Fields a client may send that rankserve does not implement, and the values that ask for nothing more
    # than what it does (so a client sending OpenAI's defaults keeps working).
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "n": (1,),
        "logit_bias": (None, {}),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
    }

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    min_p: Number = 0.0
    repetition_penalty: Number = 1.0
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

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

    def check_supported(self) -> None:
        """A 400 naming every field set to something rankserve would otherwise silently ignore."""
        bad = [k for k, ok in self.UNSUPPORTED.items() if not any(_same(getattr(self, k), v) for v in ok)]
        if bad:
            them = "it" if len(bad) == 1 else "them"
            raise APIError(
                400,
                f"not supported by this server: {', '.join(bad)}; remove {them} from the request",
                bad[0],
                "unsupported_parameter",
            )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _same(a, b) -> bool:
    """Equal and of the same kind (so ``True`` is not taken for ``1``)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]  # OpenAI's chat limit


class CompletionRequest(_Sampling):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **_Sampling.UNSUPPORTED,
        "echo": (False,),
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    logprobs: TopLogprobs | None = None  # the legacy shape: how many alternatives per token
    echo: StrictBool = False
    best_of: Any = None
    suffix: Any = None

    @property
    def top_logprobs_n(self) -> int | None:
        """Alternatives to report per token; None when logprobs are off."""
        return self.logprobs


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
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **_Sampling.UNSUPPORTED,
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
    }

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None  # the newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None

    @property
    def top_logprobs_n(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


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


def completion_chunk(
    rid: str, model: str, created: int, text: str, finish: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict, finish: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, u: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: empty choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def completion_response(
    rid: str, model: str, text: str, finish: str, u: dict, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": u,
    }


def chat_response(
    rid: str, model: str, text: str, finish: str, u: dict, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        ],
        "usage": u,
    }


def completion_logprobs(entries, text_of, offset: int = 0) -> dict:
    """OpenAI's legacy ``logprobs``: parallel lists per token; each top dict holds the sampled token too.

    ``entries`` have ``token``, ``logprob`` and ``top`` [(id, logprob)]; ``text_of(id)`` is a token's text;
    ``text_offset`` counts characters from the start of the completion (``offset`` for a later chunk).
    """
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        t = text_of(e.token)
        tokens.append(t)
        token_logprobs.append(e.logprob)
        top: dict[str, float] = {}
        for i, lp in [*e.top, (e.token, e.logprob)]:
            top.setdefault(text_of(i), lp)  # ids that share a text keep the likeliest (``top`` is sorted)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(entries, text_of) -> dict:
    """OpenAI's chat ``logprobs``: per token its text, log-probability, UTF-8 bytes and top alternatives."""

    def one(token: int, logprob: float) -> dict:
        t = text_of(token)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
