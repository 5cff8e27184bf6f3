"""OpenAI API request bodies (the OpenAI and vLLM fields remp implements), validated strictly by pydantic: a field of
the wrong type is a 400 that names it, nothing is coerced (no "yes" -> true, no true -> 1), and a field not
declared here is refused by name (fields.py). Every field declared here is honoured."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from remp.guided import GuidedSpec, guided_spec_from_request
from remp.planner.mode import LIVE, MODE_NAMES
from remp.sampling_params import SamplingParams

INT64 = {"ge": -(2**63), "le": 2**63 - 1}  # bounds of integers that reach torch or numpy
TOKEN_COUNT = {"ge": 0, "le": 2**31 - 1}
STRICT = ConfigDict(strict=True, extra="forbid")  # a field not declared here is refused by name (fields.py)
TokenId = Annotated[int, Field(**INT64)]
JSONSchema = dict[str, Any] | bool


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _Sampling(BaseModel):
    model_config = STRICT

    model: str | None = None
    # None: the model's generation_config.json default where it has one (--generation-config auto), else vLLM's
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, **INT64)
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, **TOKEN_COUNT)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # structured output (at most one)
    response_format: dict[str, Any] | None = None
    guided_json: JSONSchema | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    cache_salt: str | None = None  # prefix-cache blocks are shared only among requests with the same salt
    request_id: str | None = Field(None, max_length=256)  # the response's id (vLLM)
    user: str | None = None

    def guided(self) -> GuidedSpec | None:
        return guided_spec_from_request(
            response_format=self.response_format,
            guided_json=self.guided_json,
            guided_regex=self.guided_regex,
            guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
            structured_outputs=self.structured_outputs,
        )

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        defaults: dict[str, Any],
        guided: GuidedSpec | None,
        best_of: int | None = None,
    ) -> SamplingParams:
        """`defaults`: the model's generation_config.json sampling defaults (empty: vLLM's)."""

        def pick(name: str, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n,
            best_of=best_of,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            seed=self.seed,
            max_tokens=max_tokens if max_tokens is not None else defaults.get("max_new_tokens"),
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            guided=guided,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(16, **TOKEN_COUNT)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt (and, with logprobs, its logprobs) before each choice's text
    best_of: int | None = Field(None, ge=1, le=128)
    add_special_tokens: bool = True


class ContentPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported: remp serves text models")
        return data


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = ""
    name: str | None = None  # the participant's name, for templates that show it
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def to_template(self) -> dict:
        """The message as chat templates read it."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # the arguments always follow `parameters` when the call is forced (see tool_choice)


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **TOKEN_COUNT)
    max_completion_tokens: int | None = Field(None, **TOKEN_COUNT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message goes on, no new turn
    add_special_tokens: bool = False
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or a chat rendered with its template."""

    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for a chat (its template has them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[TokenId]


PARALLEL_SIZE = {"ge": 1, "le": 1024}


class ReconfigureRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    tensor_parallel_size: int = Field(**PARALLEL_SIZE)
    pipeline_parallel_size: int = Field(**PARALLEL_SIZE)
    data_parallel_size: int = Field(1, **PARALLEL_SIZE)
    layer_split: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = None
    mode: Literal[MODE_NAMES] = LIVE.name
