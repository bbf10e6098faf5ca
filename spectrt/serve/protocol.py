"""The OpenAI-compatible request bodies and response objects `spectrt serve` speaks.

Requests are validated by pydantic: an unknown field, a wrong type or an unsupported value is a 400
error naming the field. Fields map onto `GenerateConfig`; spectrt's own options (`draft`, `width`,
`top_k`, `accept`, `pacing`, and the constraints `regex`, `grammar`, `choice`) ride along as extra
body fields (`extra_body=` in the openai client). Structured output: OpenAI's `response_format`
(`{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}` or `{"type": "json_object"}`)
becomes the `json_schema` constraint.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Union[dict[str, Any], bool] = Field(default=True, alias="schema")  # absent: any JSON value
    strict: Optional[bool] = None  # spectrt always enforces the schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    def to_json_schema(self) -> Union[dict[str, Any], bool, None]:
        """The JSON schema this format asks for (None: plain text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_ if self.json_schema is not None else True
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI's predicted output: `{"type": "content", "content": "..." | [{"type": "text", "text": "..."}]}`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["content"]
    content: Union[str, list[TextPart]]

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: Union[str, list[TextPart]]) -> Union[str, list[TextPart]]:
        if not (value if isinstance(value, str) else "".join(part.text for part in value)):
            raise ValueError("prediction content is empty")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    logprobs: Optional[Union[bool, int]] = Field(default=None)
    user: Optional[str] = None
    # spectrt's own options
    top_k: int = Field(default=0, ge=0)
    draft: Literal["auto", "model", "head", "ngram", "ngram+model", "ngram+head", "none", "grammar", "grammar+model",
                   "grammar+ngram"] = "auto"
    width: Union[Literal["auto"], int] = "auto"
    accept: Literal["coupled", "rejection"] = "coupled"
    reuse_prefix: bool = True  # keep cached KV rows of a prompt prefix an earlier request computed
    pacing: Optional[Literal["raw", "paced"]] = None  # default: the server's --pacing
    # structured output (at most one): OpenAI's response_format, or spectrt's regex / grammar (Lark) / choice
    response_format: Optional[ResponseFormat] = None
    regex: Optional[str] = None
    grammar: Optional[str] = Field(default=None, min_length=1)
    choice: Optional[list[str]] = Field(default=None, min_length=1)
    prediction: Optional[Prediction] = None  # text the output is expected to repeat (an edit's original)
    # the suffix cache across requests: OpenAI's prompt_cache_key names the partition (tenant) this request reads
    # and writes; suffix_cache false keeps it out of the cache altogether
    prompt_cache_key: Optional[str] = Field(default=None, max_length=256)
    suffix_cache: bool = True

    @model_validator(mode="after")
    def _one_constraint(self) -> "SamplingFields":
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and self.response_format.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object with a schema")
        given = [name for name in ("regex", "grammar", "choice") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise ValueError(f"pass at most one constraint (got {', '.join(given)})")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return value

    @field_validator("logprobs", "echo", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported by spectrt serve")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def generate_options(self, default_max_tokens: int) -> dict[str, Any]:
        """The `GenerateConfig` fields of this request."""
        options = {"max_new_tokens": self.max_tokens or default_max_tokens, "temperature": self.temperature,
                   "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": self.stops(),
                   "draft": self.draft, "width": self.width, "accept": self.accept, "reuse_prefix": self.reuse_prefix,
                   "suffix_cache": self.suffix_cache, "suffix_cache_key": self.prompt_cache_key or ""}
        schema = self.response_format.to_json_schema() if self.response_format is not None else None
        constraints = {"json_schema": schema, "regex": self.regex, "grammar": self.grammar, "choice": self.choice}
        if self.prediction is not None:
            options["prediction"] = self.prediction.text()
        return options | {name: value for name, value in constraints.items() if value is not None}


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str]]
    echo: bool = Field(default=False, description="not supported: must be false")
    best_of: int = Field(default=1, ge=1, le=1)
    suffix: Optional[str] = Field(default=None, max_length=0)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Union[str, list[int], list[str]]) -> Union[str, list[int], list[str]]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request")
        if not value:
            raise ValueError("the prompt is empty")
        return value

    def prompt_input(self) -> dict[str, Any]:
        if isinstance(self.prompt, str):
            return {"prompt": self.prompt}
        if isinstance(self.prompt[0], str):
            return {"prompt": self.prompt[0]}
        return {"prompt_ids": list(self.prompt)}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: passed to the chat template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart]]

    def as_template_message(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {**(self.model_extra or {}), "role": "system" if self.role == "developer" else self.role,
                "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def prompt_input(self) -> dict[str, Any]:
        return {"messages": [m.as_template_message() for m in self.messages]}

    def generate_options(self, default_max_tokens: int) -> dict[str, Any]:
        options = super().generate_options(default_max_tokens)
        if self.max_completion_tokens is not None:
            options["max_new_tokens"] = self.max_completion_tokens
        return options


def usage(metrics: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage plus this request's speculative statistics."""
    return {
        "prompt_tokens": metrics["prompt_tokens"],
        "completion_tokens": metrics["generated_tokens"],
        "total_tokens": metrics["prompt_tokens"] + metrics["generated_tokens"],
        **{key: metrics[key] for key in ("drafted_tokens", "accepted_tokens", "acceptance_rate", "rounds",
                                          "fallback_rounds", "draft_misses", "reused_prompt_tokens")},
        "exact": metrics.get("exact"),  # the target's calls stayed on one numeric path (see GET /health)
        "completion_tokens_details": {  # OpenAI's names; both 0 without a prediction
            "accepted_prediction_tokens": metrics.get("accepted_prediction_tokens", 0),
            "rejected_prediction_tokens": metrics.get("rejected_prediction_tokens", 0)},
    }


class ResponseIds:
    """id / created / model of one response (shared by all chunks of a stream)."""

    def __init__(self, kind: str, model: str):
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.kind = kind

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, text: str, finish_reason: str, metrics: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": FINISH_REASONS[finish_reason]}
            return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage(metrics)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH_REASONS[finish_reason]}
        return {**self._envelope("text_completion"), "choices": [choice], "usage": usage(metrics)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        reason = FINISH_REASONS[finish_reason] if finish_reason else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._envelope("text_completion"), "choices": [choice]}

    def usage_chunk(self, metrics: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage(metrics)}


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
