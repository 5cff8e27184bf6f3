"""OpenAI API request bodies (the fields vLLM accepts that remp implements), validated strictly by pydantic: a
field of the wrong type is a 400 that names it, and nothing is coerced (no "yes" -> true, no true -> 1)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from remp.planner.mode import LIVE, MODE_NAMES
from remp.sampling_params import SamplingParams

INT64 = {"ge": -(2**63), "le": 2**63 - 1}  # bounds of integers that reach torch or numpy
TOKEN_COUNT = {"ge": 0, "le": 2**31 - 1}
STRICT = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored: clients send many


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = STRICT

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, **INT64)
    min_p: float | None = None
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(**INT64)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, **TOKEN_COUNT)
    n: int = Field(1, **INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, default_max_tokens: int | None
    ) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by remp (must be 0)")
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


TokenId = Annotated[int, Field(**INT64)]


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(16, **TOKEN_COUNT)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **TOKEN_COUNT)
    max_completion_tokens: int | None = Field(None, **TOKEN_COUNT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


PARALLEL_SIZE = {"ge": 1, "le": 1024}


class ReconfigureRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    tensor_parallel_size: int = Field(**PARALLEL_SIZE)
    pipeline_parallel_size: int = Field(**PARALLEL_SIZE)
    data_parallel_size: int = Field(1, **PARALLEL_SIZE)
    layer_split: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = None
    mode: Literal[MODE_NAMES] = LIVE.name
