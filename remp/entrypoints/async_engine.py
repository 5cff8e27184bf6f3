"""AsyncLLMEngine: the LLMEngine driven by one background thread, so an asyncio server stays responsive while the
model runs. Requests, aborts and topology switches are commands the engine thread applies between steps (a
switch pauses stepping; requests that arrive meanwhile queue and start after it). Each request's outputs are
delivered to its own asyncio queue; an abort (client gone, shutdown) takes effect before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from remp.engine import LLMEngine
from remp.engine_args import EngineArgs
from remp.outputs import RequestOutput
from remp.planner.mode import LIVE, SwitchMode
from remp.sampling_params import SamplingParams
from remp.switch.on_driver import SwitchInProgress
from remp.switch.report import SwitchReport


@dataclass
class SwitchEvent:
    time: float
    report: SwitchReport


class EngineStopped(RuntimeError):
    """The request was refused or ended because the engine serves no more: the server is shutting down, or the
    engine failed."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    def __init__(
        self,
        args: EngineArgs,
        on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None,
        on_abort: Callable[[str], None] | None = None,
    ):
        self.engine = LLMEngine(args)
        self.on_step = on_step  # called on the engine thread after every step (metrics)
        self.on_abort = on_abort  # called with the reason of every abort (metrics)
        self.switches: list[SwitchEvent] = []
        self.switching: str | None = None  # the target of the switch in progress
        self.stopping: str | None = None  # set by end_all: why no request is taken any more
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.dead: BaseException | None = None
        self._switch_done: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._thread = threading.Thread(target=self._loop, name="remp-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._apply_commands()
            if self.dead is None and not self.engine.has_unfinished_requests() and self.engine.switching:
                try:
                    self.engine.advance_switch(wait_s=0.02)  # nothing to step: wait for the workers instead
                except BaseException as e:
                    self._fail_all(e)
                continue
            if self.dead is not None or not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                if self.dead is None:
                    try:
                        self.engine.check_workers()  # a worker lost while idle is recovered from now
                    except BaseException as e:
                        self._fail_all(e)
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:
                self._fail_all(e)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            if self.on_step:
                self.on_step(self.engine, outputs)

    def _queued(self) -> Iterator[tuple[Callable[[], Any], asyncio.Future | None, asyncio.AbstractEventLoop | None]]:
        """The commands queued now, taken off the queue one by one."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply_commands(self) -> None:
        for fn, future, loop in self._queued():
            try:
                result = fn()
            except BaseException as e:
                if future is not None:
                    loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                if future is not None:
                    loop.call_soon_threadsafe(_set_result, future, result)

    def _fail_all(self, error: BaseException) -> None:
        self.dead = error
        self._end_streams(error)

    def _end_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    # ---- asyncio side ---------------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._stop:
            raise EngineStopped("the engine has shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, future, loop))
        self._wake.set()
        if self._stop:  # shut down meanwhile: the engine thread may have read its last command already
            self._refuse_commands()
        return await future

    def _refuse_commands(self) -> None:
        """Once stopping: end whatever is still queued with EngineStopped (no engine thread will apply it)."""
        for _, future, loop in self._queued():
            if future is not None:
                _fail_soon(loop, future, EngineStopped("the engine has shut down"))

    async def add_request(
        self, prompt: str | list[int] | dict, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request (raises ValueError for bad input, before anything is streamed) and return the
        iterator of its outputs. Leaving the iterator early (client gone) aborts the request."""
        return (await self.add_requests([(request_id, prompt, params)]))[0]

    async def add_requests(
        self, requests: list[tuple[str, str | list[int] | dict, SamplingParams]]
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue several requests at once: all of them, or (ValueError) none."""
        self._refuse_if_not_serving()
        loop = asyncio.get_running_loop()
        streams = [_Stream(loop) for _ in requests]

        def add() -> None:
            # again on the engine thread: the engine may have failed or stopped since the check above, and a
            # stream registered after _fail_all or end_all would never hear from it
            self._refuse_if_not_serving()
            added = []
            try:
                for request_id, prompt, params in requests:
                    self.engine.add_request(request_id, prompt, params)
                    added.append(request_id)
            except BaseException:
                self.engine.abort_request(added)
                raise
            self._streams.update(zip(added, streams))

        await self._call(add)
        return [self._outputs(r[0], s) for r, s in zip(requests, streams)]

    def _refuse_if_not_serving(self) -> None:
        if self.dead is not None:
            raise EngineStopped(f"the engine is not serving: {self.dead}")
        if self.stopping is not None:
            raise EngineStopped(self.stopping)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, EngineStopped):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}")
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str, reason: str = "client_disconnected") -> None:
        """Abort from anywhere, without waiting (safe inside a cancelled task's cleanup)."""

        def abort() -> None:
            if self._streams.pop(request_id, None) is not None and self.on_abort:
                self.on_abort(reason)
            self.engine.abort_request(request_id)

        self._commands.put((abort, None, None))
        self._wake.set()

    def num_open_streams(self) -> int:
        return len(self._streams)

    def end_all(self, message: str) -> None:
        """Shutdown: end every open stream with EngineStopped(message), abort its request, take no new one."""
        self.stopping = message

        def end() -> None:
            for request_id, stream in list(self._streams.items()):
                stream.put(EngineStopped(message))
                del self._streams[request_id]
                if self.on_abort:
                    self.on_abort("shutdown")
                self.engine.abort_request(request_id)

        self._commands.put((end, None, None))
        self._wake.set()

    async def reconfigure(
        self, tp: int, pp: int, layer_split: list[int] | None = None, mode: str | SwitchMode = LIVE, dp: int = 1
    ) -> SwitchReport:
        """One switch at a time: a second one while the first runs gets SwitchInProgress (its target). Steps go
        on while a live switch pre-copies; this returns once the new topology serves."""
        if self.switching is not None:
            raise SwitchInProgress(self.switching)
        self.switching = f"{'' if dp == 1 else f'DP{dp}x'}TP{tp}xPP{pp}"
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done(report: SwitchReport | None, error: BaseException | None) -> None:
            if report is not None:
                self.switches.append(SwitchEvent(time.time(), report))
            loop.call_soon_threadsafe(_set_exception if error else _set_result, done, error or report)

        self._switch_done = (loop, done)  # shutdown ends it, should the switch never finish
        try:
            await self._call(
                lambda: self.engine.start_reconfigure(tp, pp, layer_split, mode, on_done, data_parallel_size=dp)
            )
            return await done
        finally:
            self.switching, self._switch_done = None, None

    def shutdown(self) -> None:
        """Stop the engine thread, then the workers. Idempotent."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._refuse_commands()
        # what the engine thread no longer will: end the open streams (end_all's command may never have run) and a
        # switch in progress
        stopped = EngineStopped(self.stopping or "the engine has shut down")
        if not self._thread.is_alive():
            self._end_streams(stopped)
        if self._switch_done is not None:
            _fail_soon(*self._switch_done, stopped)
        self.engine.shutdown()


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _fail_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: BaseException) -> None:
    """From any thread: fail a future of `loop` (unless that loop is closed: then nobody waits for it)."""
    try:
        loop.call_soon_threadsafe(_set_exception, future, error)
    except RuntimeError:
        pass
