"""The asyncio front of the engine: a request that races the engine's failure is refused, never left waiting."""

import asyncio
import threading

import pytest

from remp import SamplingParams
from remp.engine_args import EngineArgs
from remp.entrypoints.async_engine import AsyncLLMEngine, EngineStopped


def test_a_request_added_as_the_engine_fails_is_refused_not_left_hanging(tiny_llama):
    """The engine fails after add_requests checked it and before its add ran on the engine thread (a worker
    died as the request came in): the request must be refused, not registered with a stream nobody feeds."""
    engine = AsyncLLMEngine(EngineArgs(model=str(tiny_llama), dtype="float64", max_model_len=64))
    try:
        release = threading.Event()
        engine._commands.put((lambda: release.wait(10), None, None))  # the engine thread waits here ...
        engine._commands.put((lambda: engine._fail_all(RuntimeError("worker 1 died")), None, None))  # ... then fails
        engine._wake.set()

        async def race() -> None:
            adding = asyncio.ensure_future(engine.add_request("abc", SamplingParams(max_tokens=2), "r1"))
            await asyncio.sleep(0.2)  # add_requests found the engine alive and queued its add behind the failure
            release.set()
            with pytest.raises(EngineStopped, match="worker 1 died"):
                await asyncio.wait_for(adding, 10)

        asyncio.run(race())
    finally:
        engine.shutdown()
