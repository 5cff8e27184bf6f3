"""OpenAI-compatible HTTP server (FastAPI + uvicorn), as vLLM serves it, plus an admin API to switch topology
live. Streams are server-sent events; a topology switch only pauses them. A request whose client goes away is
aborted, streaming or not; prompts are tokenized off the engine thread (prompts.py); every error is
OpenAI-shaped JSON (errors.py); SIGINT/SIGTERM drain, then end open streams cleanly (shutdown.py)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from remp.entrypoints.async_engine import AsyncLLMEngine, EngineStopped
from remp.entrypoints.errors import (
    APIError,
    BodySizeLimit,
    Gate,
    error_body,
    error_response,
    install_error_handlers,
)
from remp.entrypoints.metrics import ServerMetrics
from remp.entrypoints.prompts import PromptProcessor
from remp.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, ReconfigureRequest, _Sampling
from remp.executor import WorkerError
from remp.outputs import CompletionOutput, RequestOutput
from remp.sampling_params import SamplingParams
from remp.switch.on_driver import SwitchAborted, SwitchInProgress

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in outputs:
        last = out
    return last


def _sampling(req: _Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs, None)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def build_app(
    engine: AsyncLLMEngine,
    model_name: str,
    api_key: str | None = None,
    admin_token: str | None = None,
    metrics: ServerMetrics | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    app = FastAPI(title="remp", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.draining = False
    metrics = metrics or ServerMetrics(model_name)
    core = engine.engine
    max_model_len = core.max_model_len
    prompts = PromptProcessor(core)
    install_error_handlers(app)

    def gate(path: str, authorization: str) -> JSONResponse | None:
        """Refuse before routing: shutting down, API key, admin token (compared in constant time)."""
        if app.state.draining and path.startswith(("/v1", "/admin")):
            return error_response(503, "the server is shutting down")
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        if path.startswith("/v1") and api_key and not _same(token, api_key):
            return error_response(401, "invalid or missing API key")
        if path.startswith("/admin"):
            if not admin_token:
                return error_response(404, "the admin API is off: start the server with --admin-token")
            if token is None:
                return error_response(401, "admin API needs 'Authorization: Bearer <admin token>'")
            if not _same(token, admin_token):
                return error_response(403, "wrong admin token")
        return None

    app.add_middleware(Gate, check=gate)
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)  # outermost: refuses before anything reads

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")

    async def start(items: list[tuple[str, list[int], SamplingParams]]) -> list[AsyncIterator[RequestOutput]]:
        if engine.dead is not None:
            raise APIError(503, f"the engine is not serving: {engine.dead}")
        try:
            return await engine.add_requests([(rid, {"prompt_token_ids": ids}, p) for rid, ids, p in items])
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def collect(streams: list[AsyncIterator[RequestOutput]], request: Request) -> list[RequestOutput]:
        """The final outputs; a client that goes away meanwhile aborts them all within a step."""
        work = asyncio.ensure_future(asyncio.gather(*(_last(s) for s in streams)))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()  # each output iterator's cleanup aborts its request
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "client disconnected")
        try:
            return work.result()
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except RuntimeError as e:
            raise APIError(500, str(e)) from None

    def usage(out: RequestOutput) -> dict:
        n = len(out.outputs[0].token_ids)
        return {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": n,
            "total_tokens": len(out.prompt_token_ids) + n,
        }

    def completion_logprobs(c: CompletionOutput, start: int, text_offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for tid, step in zip(c.token_ids[start:], c.logprobs[start:]):
            chosen = step[tid]
            tokens.append(chosen.decoded_token)
            lps.append(chosen.logprob)
            tops.append({lp.decoded_token: lp.logprob for lp in step.values()})
            offsets.append(text_offset)
            text_offset += len(chosen.decoded_token or "")
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(c: CompletionOutput, start: int) -> dict | None:
        if c.logprobs is None:
            return None
        content = []
        for tid, step in zip(c.token_ids[start:], c.logprobs[start:]):
            chosen = step[tid]
            top = sorted(step.values(), key=lambda lp: lp.rank or 0)
            content.append(
                {
                    "token": chosen.decoded_token,
                    "logprob": chosen.logprob,
                    "bytes": list((chosen.decoded_token or "").encode()),
                    "top_logprobs": [
                        {
                            "token": lp.decoded_token,
                            "logprob": lp.logprob,
                            "bytes": list((lp.decoded_token or "").encode()),
                        }
                        for lp in top
                    ],
                }
            )
        return {"content": content}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(
        outputs: AsyncIterator[RequestOutput], envelope: dict, choice: Callable, include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE chunks: `envelope` (id, object, created, model) around choice(output, delta, first token index,
        first text index) for each new piece of text, then the usage chunk if asked, then [DONE]. An engine
        failure or a shutdown ends the stream in-band with an error event, as vLLM does."""
        sent_text, sent_tokens, last = 0, 0, None
        try:
            async for out in outputs:
                last, c = out, out.outputs[0]
                delta = c.text[sent_text:]
                if delta or c.finish_reason is not None:
                    yield sse({**envelope, "choices": [choice(c, delta, sent_tokens, sent_text)]})
                    sent_text, sent_tokens = len(c.text), len(c.token_ids)
        except EngineStopped as e:
            yield sse(error_body(503, str(e)))
        except RuntimeError as e:
            yield sse(error_body(500, str(e)))
        if include_usage and last is not None:
            yield sse({**envelope, "choices": [], "usage": usage(last)})
        yield "data: [DONE]\n\n"

    def streaming(req, outputs: AsyncIterator[RequestOutput], envelope: dict, choice) -> StreamingResponse:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream_events(outputs, envelope, choice, include), media_type="text/event-stream")

    # ---- OpenAI endpoints -----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "remp",
                    "root": model_name,
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
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
            await prompts.prompt_ids(p, params, "prompt" if len(batch) == 1 else f"prompt.{i}")
            for i, p in enumerate(batch)
        ]  # every prompt is checked before any is queued
        streams = await start([(f"{rid}-{i}", p, params) for i, p in enumerate(ids)])
        if req.stream:

            def choice(c: CompletionOutput, delta: str, tok0: int, text0: int) -> dict:
                return {
                    "index": 0,
                    "text": delta,
                    "logprobs": completion_logprobs(c, tok0, text0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }

            envelope = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            return streaming(req, streams[0], envelope, choice)
        outs = await collect(streams, request)
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for out in outs:
            for k, v in usage(out).items():
                total[k] += v
        choices = [
            {
                "index": i,
                "text": out.outputs[0].text,
                "logprobs": completion_logprobs(out.outputs[0], 0, 0),
                "finish_reason": out.outputs[0].finish_reason,
                "stop_reason": out.outputs[0].stop_reason,
            }
            for i, out in enumerate(outs)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": total,
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await prompts.chat_ids(messages, req.add_generation_prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        (outputs,) = await start([(rid, ids, params)])
        if req.stream:
            first = [True]

            def choice(c: CompletionOutput, delta: str, tok0: int, _text0: int) -> dict:
                d = {"role": "assistant", "content": delta} if first[0] else {"content": delta}
                first[0] = False
                return {
                    "index": 0,
                    "delta": d,
                    "logprobs": chat_logprobs(c, tok0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }

            envelope = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            return streaming(req, outputs, envelope, choice)
        (out,) = await collect([outputs], request)
        c = out.outputs[0]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, 0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            ],
            "usage": usage(out),
        }

    # ---- operations -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:
            return error_response(503, f"the engine is not serving: {engine.dead}")
        if app.state.draining:
            return error_response(503, "the server is shutting down")
        if core.recovering:  # requests queue and streams wait: nothing is lost
            return JSONResponse({"status": "degraded", "reason": "recovering from a lost worker"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/topology")
    async def topology() -> dict:
        t = core.topology
        return {
            "topology": str(t),
            "tensor_parallel_size": t.tp,
            "pipeline_parallel_size": t.pp,
            "placement": list(t.placement),
            "num_workers": getattr(core.executor, "pool_size", 1),
            "max_workers": core.max_workers,
            "pool_generation": getattr(core.executor, "generation", 0),
            "switching_to": engine.switching,
            "switches": [
                {
                    "time": ev.time,
                    "from": ev.report.old_topology,
                    "to": ev.report.new_topology,
                    "mode": ev.report.mode,
                    "wall_s": ev.report.wall_s,
                    "pause_s": ev.report.pause_s,
                }
                for ev in engine.switches
            ],
            "policy": core.policy.to_json() if core.policy is not None else {"policy": "manual"},
        }

    @app.post("/admin/reconfigure")
    async def reconfigure(req: ReconfigureRequest) -> dict:
        try:
            report = await engine.reconfigure(
                req.tensor_parallel_size, req.pipeline_parallel_size, req.layer_split, req.mode
            )
        except SwitchInProgress as e:
            raise APIError(409, f"a switch to {e} is in progress; try again when it is done") from None
        except (ValueError, OverflowError) as e:
            raise APIError(400, f"switch refused, still serving {core.topology}: {e}") from None
        except SwitchAborted as e:
            raise APIError(503, str(e)) from None
        except WorkerError as e:
            raise APIError(500, f"switch failed: {e}") from None
        t = core.topology
        metrics.on_topology(t.tp, t.pp, report)
        return report.to_dict()

    metrics.on_topology(core.topology.tp, core.topology.pp)
    metrics.watch(core)
    app.state.prompts = prompts
    return app
