"""`remp serve`: the app under uvicorn, with a graceful shutdown.

On SIGINT or SIGTERM the server stops accepting connections (uvicorn closes its sockets) and answers 503 to
new requests on open ones; running requests get `shutdown_timeout_s` to finish; then every open stream ends
with an OpenAI-style error event and `[DONE]` (a waiting non-streaming request gets a 503). The engine thread
and the workers stop while the event loop still runs, and the process exits 0. A second signal forces exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import uvicorn

from remp.engine_args import EngineArgs
from remp.entrypoints.async_engine import AsyncLLMEngine
from remp.entrypoints.metrics import ServerMetrics
from remp.entrypoints.server import DEFAULT_MAX_REQUEST_BYTES, build_app
from remp.sockets import listening_socket, url_host


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[], None]):
        super().__init__(config)
        self._on_first_signal = on_first_signal

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self._on_first_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's, minus re-raising the signal after the shutdown: a drained stop is a clean exit (code 0)
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, listening before the engine starts (as vLLM binds first): the workers' rendezvous
    and the ephemeral ports of their connections can then never take the port, and a port in use fails at once
    rather than after the model has loaded. Port 0 takes any free port; the "serving ... on" line names it.
    Connections made while the model loads wait in the backlog."""
    try:
        return listening_socket(host, port)
    except OSError as e:
        raise SystemExit(f"remp serve: cannot listen on {host}:{port}: {e.strerror or e}") from None


async def _serve(app, engine: AsyncLLMEngine, sock: socket.socket, shutdown_timeout_s: float, log_level: str) -> None:
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        app.state.server.draining = True
        deadline = loop.time() + shutdown_timeout_s
        while engine.num_open_streams() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        engine.end_all(f"the server is shutting down (request not finished within {shutdown_timeout_s:g} s)")

    # uvicorn's own grace period is a backstop: drain() ends the streams first, so connections close by then
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s + 5)
    server = _Server(config, lambda: loop.call_soon_threadsafe(lambda: loop.create_task(drain())))
    try:
        await server.serve(sockets=[sock])
    finally:
        await loop.run_in_executor(None, engine.shutdown)  # before the loop closes: no late callbacks into it


def serve(
    args: EngineArgs,
    host: str,
    port: int,
    served_model_name: str | None,
    api_key: str | None,
    admin_token: str | None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    shutdown_timeout_s: float = 10.0,
    log_level: str = "info",
    chat_template: str | None = None,
    generation_config: str = "auto",
) -> None:
    name = served_model_name or args.model or "SmolLM2-135M-Instruct"
    metrics = ServerMetrics(name)
    with listen(host, port) as sock:
        engine = AsyncLLMEngine(args, on_step=metrics.on_step, on_abort=metrics.on_abort)
        try:
            app = build_app(
                engine, name, api_key, admin_token, metrics, max_request_bytes, chat_template, generation_config
            )
            if generation_config == "auto" and app.state.server.generation_defaults:
                defaults = app.state.server.generation_defaults
                print(f"remp: requests' sampling defaults from the model's generation_config.json: {defaults}")
            where = f"http://{url_host(sock)}:{sock.getsockname()[1]}"
            print(f"remp: serving {name} as {engine.engine.topology} on {where}", flush=True)
            asyncio.run(_serve(app, engine, sock, shutdown_timeout_s, log_level))
            app.state.server.prompts.close()
        finally:
            engine.shutdown()
