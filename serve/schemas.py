"""Request bodies of the HTTP API (pydantic): OpenAI's shapes plus ``perspectives``, ``decoding`` and ``backend``.

Static bounds live here (FastAPI turns violations into 422s naming the field); bounds that depend on the
serve config (``max_tokens_limit``, ``max_perspectives``, prompt tokens, known perspectives) are checked by
the aggregator and answered with 422s in the same shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DecodingParams(_Strict):
    """Pluralistic decoding (DESIGN §1 step 4); unset fields take the server's defaults."""

    mode: Literal["mean", "cad", "dvd"] | None = None
    alpha: float | None = Field(None, ge=0, le=10, description="contrast strength (cad, dvd)")
    tau: float | None = Field(None, gt=0, le=100, description="entropy temperature (dvd)")
    top_k: int | None = Field(None, ge=1, le=1000, description="tokens in each entropy; tokens sampled from")
    reference: bool = Field(False, description="reproduce the reference implementation's arithmetic")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | list[Stop] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported (must be 0)")
    perspectives: list[Name] | None = Field(
        None, max_length=64, description="perspectives to combine; omitted: all served; []: the unsteered model"
    )
    decoding: DecodingParams | None = None
    backend: Literal["replicas", "fused"] | None = Field(None, description="where the perspectives run")
    ignore_eos: bool = Field(False, description="generate exactly max_tokens tokens")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Generation):
    prompt: Annotated[str, StringConstraints(min_length=1)] | list[Annotated[str, StringConstraints(min_length=1)]]
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probabilities per token (+ per perspective)")
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _nonempty_list(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class DistributionRequest(_Strict):
    """The next-token distribution over ``options`` (label words or option letters) at the end of the prompt,
    per perspective, unsteered, and combined: what GlobalOpinionQA-style readouts need."""

    model: str | None = Field(None, max_length=256)
    prompt: str | None = Field(None, min_length=1, description="a complete model input")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=256, description="or a chat (the assistant turn is opened)"
    )
    options: list[Label] = Field(min_length=1, max_length=26)
    perspectives: list[Name] | None = Field(None, max_length=64)
    decoding: DecodingParams | None = None
    backend: Literal["replicas", "fused"] | None = None


__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "DecodingParams",
    "DistributionRequest",
    "StreamOptions",
]
