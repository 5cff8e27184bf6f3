"""OpenAI-compatible HTTP server (FastAPI + uvicorn), as vLLM serves it, plus an admin API to switch topology
live. Streams are server-sent events; a topology switch only pauses them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from remp.engine_args import EngineArgs
from remp.entrypoints.async_engine import AsyncLLMEngine
from remp.entrypoints.metrics import ServerMetrics
from remp.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, ReconfigureRequest
from remp.executor import WorkerError
from remp.outputs import CompletionOutput, RequestOutput


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def build_app(
    engine: AsyncLLMEngine,
    model_name: str,
    api_key: str | None = None,
    admin_token: str | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    app = FastAPI(title="remp", docs_url=None, redoc_url=None)
    app.state.engine = engine
    metrics = metrics or ServerMetrics(model_name)
    core = engine.engine
    max_model_len = core.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}", "BadRequestError")
        msg = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errs
        )
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(400, msg, "BadRequestError", param)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1") and api_key and _bearer(request) != api_key:
            return error_response(401, "invalid or missing API key", "AuthenticationError")
        if path.startswith("/admin"):
            if not admin_token:
                return error_response(404, "the admin API is off: start the server with --admin-token", "NotFoundError")
            token = _bearer(request)
            if token is None:
                return error_response(
                    401, "admin API needs 'Authorization: Bearer <admin token>'", "AuthenticationError"
                )
            if token != admin_token:
                return error_response(403, "wrong admin token", "PermissionDeniedError")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    async def start(prompt: Any, params, request_id: str) -> AsyncIterator[RequestOutput]:
        if engine.dead is not None:
            raise APIError(503, f"the engine is not serving: {engine.dead}", "ServiceUnavailableError")
        try:
            return await engine.add_request(prompt, params, request_id)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def final(outputs: AsyncIterator[RequestOutput], request: Request, request_id: str) -> RequestOutput:
        last = None
        try:
            async for out in outputs:
                last = out
                if await request.is_disconnected():
                    engine.abort_nowait(request_id)
                    raise APIError(499, "client disconnected", "ClientClosedRequest")
        except RuntimeError as e:
            raise APIError(500, str(e), "InternalServerError") from None
        return last

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
        outputs: AsyncIterator[RequestOutput], envelope: dict, choice, include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE chunks: `envelope` (id, object, created, model) around choice(output, delta, first token index,
        first text index) for each new piece of text, then the usage chunk if asked, then [DONE]."""
        sent_text, sent_tokens, last = 0, 0, None
        try:
            async for out in outputs:
                last, c = out, out.outputs[0]
                delta = c.text[sent_text:]
                if delta or c.finish_reason is not None:
                    yield sse({**envelope, "choices": [choice(c, delta, sent_tokens, sent_text)]})
                    sent_text, sent_tokens = len(c.text), len(c.token_ids)
        except RuntimeError as e:  # the engine failed mid-stream: say so in-band, as vLLM does
            yield sse({"error": {"message": str(e), "type": "InternalServerError", "code": 500}})
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
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        try:
            params = req.sampling_params(req.max_tokens, req.logprobs, None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        p0 = prompts[0]
        prompt = {"prompt_token_ids": p0} if isinstance(p0, list) else p0
        if req.stream:
            outputs = await start(prompt, params, rid)

            def choice(c: CompletionOutput, delta: str, tok0: int, text0: int) -> dict:
                return {
                    "index": 0,
                    "text": delta,
                    "logprobs": completion_logprobs(c, tok0, text0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }

            envelope = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            return streaming(req, outputs, envelope, choice)
        choices, total = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i, p in enumerate(prompts):
            sub = f"{rid}-{i}"
            out = await final(
                await start({"prompt_token_ids": p} if isinstance(p, list) else p, params, sub), request, sub
            )
            c = out.outputs[0]
            choices.append(
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": completion_logprobs(c, 0, 0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
            for k, v in usage(out).items():
                total[k] += v
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
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = req.sampling_params(max_tokens, logprobs, None)
            ids = await engine.tokenize_chat(
                [{"role": m.role, "content": m.text()} for m in req.messages], req.add_generation_prompt
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = await start({"prompt_token_ids": ids}, params, rid)
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
        out = await final(outputs, request, rid)
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
            return error_response(503, f"the engine is not serving: {engine.dead}", "ServiceUnavailableError")
        return Response(status_code=200)

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
        }

    @app.post("/admin/reconfigure")
    async def reconfigure(req: ReconfigureRequest) -> dict:
        try:
            report = await engine.reconfigure(
                req.tensor_parallel_size, req.pipeline_parallel_size, req.layer_split, req.mode
            )
        except ValueError as e:
            raise APIError(400, f"switch refused, still serving {core.topology}: {e}") from None
        except WorkerError as e:
            raise APIError(500, f"switch failed: {e}", "InternalServerError") from None
        t = core.topology
        metrics.on_topology(t.tp, t.pp, report)
        return report.to_dict()

    metrics.on_topology(core.topology.tp, core.topology.pp)
    return app


def serve(
    args: EngineArgs,
    host: str,
    port: int,
    served_model_name: str | None,
    api_key: str | None,
    admin_token: str | None,
    log_level: str = "info",
) -> None:
    import uvicorn

    name = served_model_name or args.model or "SmolLM2-135M-Instruct"
    metrics = ServerMetrics(name)
    engine = AsyncLLMEngine(args, on_step=metrics.on_step)
    try:
        app = build_app(engine, name, api_key, admin_token, metrics)
        print(f"remp: serving {name} as {engine.engine.topology} on http://{host}:{port}", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
