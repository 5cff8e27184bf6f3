"""AsyncLLMEngine: the LLMEngine driven by one background thread, so an asyncio server stays responsive while the
model runs. Requests, aborts and topology switches are commands the engine thread applies between steps (a
switch pauses stepping; requests that arrive meanwhile queue and start after it). Each request's outputs are
delivered to its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from remp.engine import LLMEngine
from remp.engine_args import EngineArgs
from remp.outputs import RequestOutput
from remp.sampling_params import SamplingParams
from remp.switch_report import SwitchReport


@dataclass
class SwitchEvent:
    time: float
    report: SwitchReport


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, args: EngineArgs, on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None):
        self.engine = LLMEngine(args)
        self.on_step = on_step  # called on the engine thread after every step (metrics)
        self.switches: list[SwitchEvent] = []
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="remp-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._apply_commands()
            if self.dead is not None or not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
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

    def _apply_commands(self) -> None:
        while True:
            try:
                fn, future, loop = self._commands.get_nowait()
            except queue.Empty:
                return
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
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    # ---- asyncio side ---------------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, future, loop))
        self._wake.set()
        return await future

    async def add_request(
        self, prompt: str | list[int] | dict, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request (raises ValueError for bad input, before anything is streamed) and return the
        iterator of its outputs. Leaving the iterator early (client gone) aborts the request."""
        if self.dead is not None:
            raise RuntimeError(f"the engine is dead: {self.dead}")
        stream = _Stream(asyncio.get_running_loop())

        def add() -> None:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = stream

        await self._call(add)
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}")
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort from anywhere, without waiting (safe inside a cancelled task's cleanup)."""

        def abort() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._commands.put((abort, None, None))
        self._wake.set()

    async def reconfigure(
        self, tp: int, pp: int, layer_split: list[int] | None = None, mode: str = "switch"
    ) -> SwitchReport:
        def switch() -> SwitchReport:
            report = self.engine.reconfigure(tp, pp, layer_split, mode)
            self.switches.append(SwitchEvent(time.time(), report))
            return report

        return await self._call(switch)

    async def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tok.encode(text, add_special_tokens=False)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
