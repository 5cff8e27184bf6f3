"""What every route of the server shares: one typed object on `app.state.server`, reached from the request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from remp.engine import LLMEngine
from remp.entrypoints.async_engine import AsyncLLMEngine
from remp.entrypoints.metrics import ServerMetrics
from remp.entrypoints.prompts import PromptProcessor


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str  # the name clients ask for (--served-model-name)
    metrics: ServerMetrics
    prompts: PromptProcessor
    max_model_len: int
    generation_defaults: dict  # requests' sampling defaults: the model's generation_config.json, or {} (vLLM's)
    draining: bool = False  # set on the first SIGINT/SIGTERM: new /v1 and /admin requests get 503

    @property
    def core(self) -> LLMEngine:
        """The engine itself, for reads (topology, pool): its state is written by the engine thread alone."""
        return self.engine.engine


def server_state(request: Request) -> ServerState:
    return request.app.state.server
