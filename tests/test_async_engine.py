"""The asyncio front of the engine: a request that races the engine's failure, or comes after its shutdown, is
refused, never left waiting."""

import asyncio
import queue
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


def test_calls_after_shutdown_are_refused_not_left_hanging(tiny_llama):
    engine = AsyncLLMEngine(EngineArgs(model=str(tiny_llama), dtype="float64", max_model_len=64))
    engine.shutdown()

    async def after() -> None:
        with pytest.raises(EngineStopped, match="shut down"):
            await asyncio.wait_for(engine.add_request("abc", SamplingParams(max_tokens=2), "r1"), 10)
        with pytest.raises(EngineStopped, match="shut down"):
            await asyncio.wait_for(engine.reconfigure(1, 1), 10)

    asyncio.run(after())


def test_a_call_queued_as_the_engine_shuts_down_is_refused():
    """The engine thread has read its last command; a call queued after that is ended by shutdown."""
    engine = AsyncLLMEngine.__new__(AsyncLLMEngine)  # only the command queue is needed: no model, no thread
    engine._commands, engine._wake, engine._stop = queue.Queue(), threading.Event(), False

    async def race() -> None:
        call = asyncio.ensure_future(engine._call(lambda: 1))
        await asyncio.sleep(0.05)  # queued, and no engine thread will ever read it
        engine._stop = True
        engine._refuse_commands()  # what shutdown does after joining the engine thread
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(call, 10)

    asyncio.run(race())
