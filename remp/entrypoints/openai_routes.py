"""The OpenAI API: /v1/models, /v1/completions, /v1/chat/completions. Each route checks its request, turns its
prompts into token ids (prompts.py), compiles its constraint off the engine thread, queues its requests on the
engine (generate.py), and answers with a body or a stream (responses.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request

from remp.entrypoints import responses
from remp.entrypoints.errors import APIError
from remp.entrypoints.generate import collect, start
from remp.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from remp.entrypoints.responses import ChatChoice, CompletionChoice, Echo, ToolMode
from remp.entrypoints.state import ServerState, server_state
from remp.guided import GuidedSpec
from remp.sampling_params import SamplingParams

router = APIRouter()


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model")


async def _params(
    state: ServerState,
    req: _Sampling,
    max_tokens: int | None,
    logprobs: int | None,
    guided: GuidedSpec | None,
    best_of: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams; its constraint compiled now, in a thread (the engine then finds it cached)."""
    try:
        params = req.sampling_params(max_tokens, logprobs, state.generation_defaults, guided, best_of)
        params.check_vocab(state.core.model_config.vocab_size)
        if guided is not None:
            await asyncio.to_thread(state.core.guides.compile, guided)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params


def _request_guided(req: _Sampling) -> GuidedSpec | None:
    try:
        return req.guided()
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _usage_options(req: _Sampling) -> tuple[bool, bool]:
    o = req.stream_options
    return bool(o and o.include_usage), bool(o and o.continuous_usage_stats)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = server_state(request)
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "remp",
                "root": state.model_name,
                "max_model_len": state.max_model_len,
            }
        ],
    }


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = server_state(request)
    check_model(state, req.model)
    batch = req.prompt
    if isinstance(batch, str) or (batch and isinstance(batch[0], int)):
        batch = [batch]
    if not batch:
        raise APIError(400, "prompt is empty", param="prompt")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise APIError(400, "best_of > n cannot be streamed: the best sequences are known at the end", param="best_of")
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:  # the echoed prompt carries its logprobs too
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
    params = await _params(state, req, req.max_tokens, req.logprobs, _request_guided(req), req.best_of)
    params.prompt_logprobs = prompt_logprobs
    rid, created = req.request_id or f"cmpl-{uuid.uuid4().hex}", int(time.time())
    ids = [
        await state.prompts.prompt_ids(
            p, params, "prompt" if len(batch) == 1 else f"prompt.{i}", req.add_special_tokens
        )
        for i, p in enumerate(batch)
    ]  # every prompt is checked before any is queued
    streams = await start(state.engine, [(f"{rid}-{i}", p, params, req.cache_salt) for i, p in enumerate(ids)])
    tokenizer = state.core.tokenizer

    def choice(i: int, j: int, out=None) -> CompletionChoice:
        echo = None
        if req.echo:
            text = batch[i] if isinstance(batch[i], str) else tokenizer.decode(ids[i])
            echo = Echo(text, ids[i], out.prompt_logprobs if out is not None and req.logprobs is not None else None)
        return CompletionChoice(i * req.n + j, echo, tokenizer)

    if req.stream:
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs cannot be streamed", param="echo")
        envelope = responses.envelope(rid, "text_completion", created, state.model_name)
        return responses.streaming_response(responses.stream_events(streams, envelope, choice, *_usage_options(req)))
    outs = await collect(streams, request)
    choices = []
    for i, out in enumerate(outs):
        for j, c in enumerate(out.outputs):
            body = choice(i, j, out).body(c)
            body["prompt_logprobs"] = responses.prompt_logprobs_json(out) if req.prompt_logprobs is not None else None
            choices.append(body)
    return {
        **responses.envelope(rid, "text_completion", created, state.model_name),
        "choices": choices,
        "usage": responses.usage(outs),
    }


def tool_mode(req: ChatCompletionRequest) -> tuple[ToolMode, GuidedSpec | None]:
    """How the output carries tool calls, and the constraint a forced call puts on it (its arguments' schema)."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if choice == "none":
        return ToolMode("none"), None
    if not req.tools:
        raise APIError(400, f"tool_choice {json.dumps(choice, default=vars)} needs `tools`", param="tool_choice")
    by_name = {t.function.name: t.function for t in req.tools}
    if choice == "auto":
        return ToolMode("auto", parallel=req.parallel_tool_calls), None
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": f.parameters or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, f in by_name.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolMode("required", parallel=req.parallel_tool_calls), _call_spec(schema)
    name = choice.function.name
    if name not in by_name:
        raise APIError(400, f"tool_choice names `{name}`, which is not among the tools", param="tool_choice")
    return ToolMode("named", name), _call_spec(by_name[name].parameters or {"type": "object"})


def _call_spec(schema: dict) -> GuidedSpec:
    """A forced call's JSON is written as json.dumps writes it (", " and ": ", no other whitespace): the server
    parses it, not a person, and free whitespace lets a model pad a call past max_tokens."""
    guidance = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return GuidedSpec.json_schema({**schema, "x-guidance": guidance})


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    state = server_state(request)
    check_model(state, req.model)
    tools, forced = tool_mode(req)
    guided = _request_guided(req)
    if forced is not None and guided is not None:
        raise APIError(400, "a forced tool call and a response format cannot both constrain one output")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = await _params(state, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, forced or guided)
    ids = await state.prompts.chat_ids(
        [m.to_template() for m in req.messages],
        params,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools and tools.kind != "none" else None,
        chat_template=req.chat_template,
        template_kwargs=req.chat_template_kwargs,
        add_special_tokens=req.add_special_tokens,
    )
    rid, created = req.request_id or f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await start(state.engine, [(rid, ids, params, req.cache_salt)])
    if req.stream:
        envelope = responses.envelope(rid, "chat.completion.chunk", created, state.model_name)
        events = responses.stream_events(streams, envelope, lambda _i, j: ChatChoice(j, tools), *_usage_options(req))
        return responses.streaming_response(events)
    (out,) = await collect(streams, request)
    body = {
        **responses.envelope(rid, "chat.completion", created, state.model_name),
        "choices": [ChatChoice(j, tools).body(c) for j, c in enumerate(out.outputs)],
        "usage": responses.usage([out]),
    }
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = responses.prompt_logprobs_json(out)
    return body
