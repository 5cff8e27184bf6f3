"""OpenAI-compatible HTTP server (FastAPI + uvicorn), as vLLM serves it, plus an admin API to switch topology
live. This file assembles the app; each concept has its own file:

    state.py          ServerState: what the routes share (engine, model name, metrics, prompts, limits)
    access.py         refusals before routing: draining, API key, admin token
    errors.py         every error as OpenAI-shaped JSON; the request-body size limit
    openai_routes.py  /v1/models, /v1/completions, /v1/chat/completions
    tokenize_routes.py  /tokenize, /detokenize (vLLM's)
    tool_calls.py     tools in prompts (Hermes format) and tool calls parsed from outputs, whole or streamed
    prompts.py        prompts -> checked token ids, off the engine thread and the event loop
    generate.py       queue a route's requests on the engine; collect them, aborting if the client goes away
    responses.py      outputs -> response bodies (choices, logprobs, usage) and server-sent-event streams
    ops_routes.py     /health, /metrics, /version
    admin_routes.py   /admin/topology, /admin/reconfigure

Streams are server-sent events; a topology switch only pauses them. A request whose client goes away is
aborted, streaming or not; SIGINT/SIGTERM drain, then end open streams cleanly (serve.py)."""

from __future__ import annotations

from fastapi import FastAPI

from remp.entrypoints import admin_routes, openai_routes, ops_routes, tokenize_routes
from remp.entrypoints.access import Gate, refusal
from remp.entrypoints.async_engine import AsyncLLMEngine
from remp.entrypoints.errors import BodySizeLimit, install_error_handlers
from remp.entrypoints.metrics import ServerMetrics
from remp.entrypoints.prompts import PromptProcessor
from remp.entrypoints.state import ServerState

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


def build_app(
    engine: AsyncLLMEngine,
    model_name: str,
    api_key: str | None = None,
    admin_token: str | None = None,
    metrics: ServerMetrics | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    chat_template: str | None = None,
    generation_config: str = "auto",
) -> FastAPI:
    """The app; its ServerState is `app.state.server` (serve.py sets `draining` and closes `prompts`).
    chat_template: the template text for every chat (None: the model's); generation_config "auto": requests'
    sampling defaults from the model's generation_config.json, "vllm": vLLM's own, as `vllm serve` does."""
    core = engine.engine
    state = ServerState(
        engine=engine,
        model_name=model_name,
        metrics=metrics or ServerMetrics(model_name),
        prompts=PromptProcessor(core, chat_template),
        max_model_len=core.max_model_len,
        generation_defaults=dict(core.model_config.generation_defaults) if generation_config == "auto" else {},
    )
    app = FastAPI(title="remp", docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)

    def check(path: str, authorization: str):
        return refusal(path, authorization, draining=state.draining, api_key=api_key, admin_token=admin_token)

    app.add_middleware(Gate, check=check)
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)  # outermost: refuses before anything reads
    for routes in (openai_routes, tokenize_routes, ops_routes, admin_routes):
        app.include_router(routes.router)

    state.metrics.on_topology(core.topology)
    state.metrics.watch(core)
    return app
