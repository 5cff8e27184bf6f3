"""A route's requests on the engine: queue them (a refusal becomes an API error) and wait for their final
outputs, aborting them all if the client goes away meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from remp.entrypoints.async_engine import AsyncLLMEngine, EngineStopped
from remp.entrypoints.errors import APIError
from remp.outputs import RequestOutput
from remp.sampling_params import SamplingParams


async def start(
    engine: AsyncLLMEngine, items: list[tuple[str, list[int], SamplingParams, str | None]]
) -> list[AsyncIterator[RequestOutput]]:
    """Queue (request id, prompt token ids, params, cache salt) together: all or none. One output iterator
    each."""
    if engine.dead is not None:
        raise APIError(503, f"the engine is not serving: {engine.dead}")
    try:
        return await engine.add_requests(
            [(rid, {"prompt_token_ids": ids, "cache_salt": salt}, p) for rid, ids, p, salt in items]
        )
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


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in outputs:
        last = out
    return last
