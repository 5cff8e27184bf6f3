"""The asyncio front of the engine: a request that races the engine's failure, or comes after its shutdown, is
refused, never left waiting; shutdown ends the streams and the switch still open."""

import asyncio
import queue
import threading
import types

import pytest

from remp import SamplingParams
from remp.engine_args import EngineArgs
from remp.entrypoints.async_engine import AsyncLLMEngine, EngineStopped, _Stream


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


def test_shutdown_ends_queued_calls_open_streams_and_a_switch_in_progress():
    """What the engine thread will not do any more once it has stopped, shutdown does."""
    engine = AsyncLLMEngine.__new__(AsyncLLMEngine)  # no model, and an engine thread that has already exited
    engine._commands, engine._wake, engine._stop, engine.stopping = queue.Queue(), threading.Event(), False, None
    engine._thread = threading.Thread(target=lambda: None)
    engine._thread.start()
    engine._thread.join()
    engine._streams, engine._switch_done = {}, None
    engine.engine = types.SimpleNamespace(shutdown=lambda: None)

    async def shut_down_with_work_left() -> None:
        loop = asyncio.get_running_loop()
        call = asyncio.ensure_future(engine._call(lambda: 1))
        engine._streams["r1"] = stream = _Stream(loop)
        engine._switch_done = (loop, switch := loop.create_future())
        await asyncio.sleep(0.05)  # the call is queued, and no engine thread will read it
        engine.shutdown()
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(call, 10)
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(switch, 10)
        assert isinstance(await asyncio.wait_for(stream.queue.get(), 10), EngineStopped)

    asyncio.run(shut_down_with_work_left())
