"""The OpenAI API: /v1/models, /v1/completions, /v1/chat/completions. Each route checks its request, turns
its prompts into token ids (prompts.py), queues them on the engine (generate.py), and answers with a body or
a stream (responses.py)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from remp.entrypoints import responses
from remp.entrypoints.errors import APIError
from remp.entrypoints.generate import collect, start
from remp.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from remp.entrypoints.state import ServerState, server_state
from remp.sampling_params import SamplingParams

router = APIRouter()


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model")


def _sampling(req: _Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs, None)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _include_usage(req: _Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


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
    _check_model(state, req.model)
    batch = req.prompt
    if isinstance(batch, str) or (batch and isinstance(batch[0], int)):
        batch = [batch]
    if not batch:
        raise APIError(400, "prompt is empty", param="prompt")
    if req.stream and len(batch) > 1:
        raise APIError(400, "streaming supports one prompt per request", param="prompt")
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    params = _sampling(req, req.max_tokens, req.logprobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    ids = [
        await state.prompts.prompt_ids(p, params, "prompt" if len(batch) == 1 else f"prompt.{i}")
        for i, p in enumerate(batch)
    ]  # every prompt is checked before any is queued
    streams = await start(state.engine, [(f"{rid}-{i}", p, params) for i, p in enumerate(ids)])
    if req.stream:
        envelope = responses.envelope(rid, "text_completion", created, state.model_name)
        return responses.streaming_response(
            streams[0], envelope, responses.completion_chunk_choice, _include_usage(req)
        )
    outs = await collect(streams, request)
    return responses.completion_body(rid, created, state.model_name, outs)


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    state = server_state(request)
    _check_model(state, req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    ids = await state.prompts.chat_ids(messages, req.add_generation_prompt, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    (outputs,) = await start(state.engine, [(rid, ids, params)])
    if req.stream:
        envelope = responses.envelope(rid, "chat.completion.chunk", created, state.model_name)
        return responses.streaming_response(outputs, envelope, responses.chat_chunk_choices(), _include_usage(req))
    (out,) = await collect([outputs], request)
    return responses.chat_body(rid, created, state.model_name, out)
