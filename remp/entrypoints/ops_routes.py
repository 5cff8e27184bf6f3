"""Operations: /health (for load balancers and launchers), /metrics (Prometheus), /version."""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from remp.entrypoints.errors import error_response
from remp.entrypoints.state import server_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    state = server_state(request)
    if state.engine.dead is not None:
        return error_response(503, f"the engine is not serving: {state.engine.dead}")
    if state.draining:
        return error_response(503, "the server is shutting down")
    if state.core.recovering:  # requests queue and streams wait: nothing is lost
        return JSONResponse({"status": "degraded", "reason": "recovering from a lost worker"})
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict:
    return {"version": importlib.metadata.version("remp")}
