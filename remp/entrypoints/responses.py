"""Engine outputs as OpenAI response bodies: choices (n per prompt), logprobs, prompt logprobs, tool calls, usage,
and the server-sent events of a stream. Pure formatting, apart from the stream, which iterates the engine's
outputs (several prompts' at once) and ends with an error event if the engine stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from remp.entrypoints.async_engine import EngineStopped
from remp.entrypoints.errors import error_body
from remp.entrypoints.tool_calls import ToolCall, ToolCallStream, parse_call, parse_tool_calls
from remp.outputs import CompletionOutput, Logprob, RequestOutput


def envelope(rid: str, object_: str, created: int, model: str) -> dict:
    return {"id": rid, "object": object_, "created": created, "model": model}


def usage(outs: list[RequestOutput]) -> dict:
    """Prompt tokens once per prompt, completion tokens of every choice."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_logprobs_json(out: RequestOutput) -> list | None:
    """vLLM's form: None for the first prompt token, then {token id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): vars(lp) for t, lp in e.items()} for e in out.prompt_logprobs]


# ---- /v1/completions ----------------------------------------------------------------------------------------
def completion_logprobs(
    token_ids: list[int], steps: list[dict[int, Logprob] | None], text_offset: int, tokenizer=None
) -> dict:
    """OpenAI's legacy logprobs of these tokens (a step of None: the prompt's first token, which has none)."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, step in zip(token_ids, steps, strict=True):
        chosen = step[tid] if step is not None else Logprob(None, None, tokenizer.decode([tid]))
        tokens.append(chosen.decoded_token)
        lps.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in step.values()} if step is not None else None)
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Echo:
    """The prompt before a completion's text (echo=true), with its logprobs when asked."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] | None  # None: logprobs not asked


class CompletionChoice:
    """One choice of /v1/completions, whole or as successive stream chunks."""

    def __init__(self, index: int, echo: Echo | None = None, tokenizer=None):
        self.index, self.echo, self.tokenizer = index, echo, tokenizer
        self.sent_text = self.sent_tokens = 0

    def body(self, c: CompletionOutput) -> dict:
        text = c.text
        logprobs = completion_logprobs(c.token_ids, c.logprobs, 0) if c.logprobs is not None else None
        if self.echo is not None:
            text = self.echo.text + text
            if logprobs is not None and self.echo.logprobs is not None:
                ids, steps = self.echo.token_ids + c.token_ids, self.echo.logprobs + c.logprobs
                logprobs = completion_logprobs(ids, steps, 0, self.tokenizer)
        return self._choice(text, logprobs, c)

    def chunks(self, c: CompletionOutput) -> list[dict]:
        delta = c.text[self.sent_text :]
        if not delta and c.finish_reason is None and not (self.echo is not None and self.sent_tokens == 0):
            return []
        logprobs = None
        if c.logprobs is not None:
            new = slice(self.sent_tokens, len(c.token_ids))
            logprobs = completion_logprobs(c.token_ids[new], c.logprobs[new], self.sent_text)
        if self.echo is not None and self.sent_tokens == 0 and self.sent_text == 0:
            delta = self.echo.text + delta
        self.sent_text, self.sent_tokens = len(c.text), len(c.token_ids)
        return [self._choice(delta, logprobs, c)]

    def _choice(self, text: str, logprobs: dict | None, c: CompletionOutput) -> dict:
        return {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }


# ---- /v1/chat/completions -----------------------------------------------------------------------------------
def chat_logprobs(c: CompletionOutput, start: int, stop: int | None = None) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tid, step in zip(c.token_ids[start:stop], c.logprobs[start:stop], strict=True):
        chosen = step[tid]
        top = sorted(step.values(), key=lambda lp: lp.rank or 0)
        content.append(
            {
                "token": chosen.decoded_token,
                "logprob": chosen.logprob,
                "bytes": list((chosen.decoded_token or "").encode()),
                "top_logprobs": [
                    {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}
                    for lp in top
                ],
            }
        )
    return {"content": content}


@dataclass(frozen=True)
class ToolMode:
    """How a chat's output carries tool calls: "none" (plain text), "auto" (Hermes <tool_call> blocks the model may
    write), "named" (the whole output is the arguments of `name`), "required" (a JSON array of calls)."""

    kind: str = "none"
    name: str | None = None
    parallel: bool = True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output."""
        if self.kind == "named":
            return None, [ToolCall(self.name, text)]
        if self.kind == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short (max_tokens): the client sees what came
            calls = [c for c in (parse_call(json.dumps(i)) for i in items) if c is not None]
            return None, calls[: None if self.parallel else 1]
        if self.kind == "auto":
            content, calls = parse_tool_calls(text)
            return content, calls[: None if self.parallel else 1]
        return text, []


class ChatChoice:
    """One choice of /v1/chat/completions, whole or as successive stream chunks (the first names the role)."""

    def __init__(self, index: int, tools: ToolMode):
        self.index, self.tools = index, tools
        self.sent_text = self.sent_tokens = 0
        self.calls = 0
        self.started = False
        self.parser = ToolCallStream() if tools.kind == "auto" else None

    def _finish_reason(self, c: CompletionOutput, has_calls: bool) -> str | None:
        if c.finish_reason == "stop" and has_calls and self.tools.kind != "named":
            return "tool_calls"
        return c.finish_reason

    def body(self, c: CompletionOutput) -> dict:
        content, calls = self.tools.parse(c.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.to_json() for call in calls]
        return {
            "index": self.index,
            "message": message,
            "logprobs": chat_logprobs(c, 0),
            "finish_reason": self._finish_reason(c, bool(calls)),
            "stop_reason": c.stop_reason,
        }

    def chunks(self, c: CompletionOutput) -> list[dict]:
        delta_text = c.text[self.sent_text :]
        if not delta_text and c.finish_reason is None:
            return []
        logprobs = chat_logprobs(c, self.sent_tokens)
        self.sent_text, self.sent_tokens = len(c.text), len(c.token_ids)
        delta: dict[str, Any] = {} if self.started else {"role": "assistant"}
        calls: list[ToolCall] = []
        if self.tools.kind == "named":  # the output is the arguments: streamed as they come
            first = {} if self.started else {"id": ToolCall(self.tools.name, "").id, "type": "function"}
            name = {} if self.started else {"name": self.tools.name}
            delta["tool_calls"] = [{"index": 0, **first, "function": {**name, "arguments": delta_text}}]
            self.calls = 1
        elif self.tools.kind == "required":  # a JSON array: its calls once it is whole
            if c.finish_reason is not None:
                content, calls = self.tools.parse(c.text)
                if content:
                    delta["content"] = content
        else:
            content, calls = self.parser.feed(delta_text) if self.parser else (delta_text, [])
            if self.parser is not None and c.finish_reason is not None:
                content += self.parser.finish()
            if not self.tools.parallel:
                calls = calls[: max(0, 1 - self.calls)]
            if content or not self.started:
                delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.to_json(self.calls + i) for i, call in enumerate(calls)]
            self.calls += len(calls)
        if len(delta) == (0 if self.started else 1) and c.finish_reason is None:
            return []  # nothing to say yet (a tag held back, an array not whole)
        self.started = True
        finish = self._finish_reason(c, self.calls > 0)
        return [{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]


# ---- streams ------------------------------------------------------------------------------------------------
def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several requests' streams as they come: (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out, None))
        except Exception as e:  # the engine stopped: passed on in order
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            i, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                open_ -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def stream_events(
    streams: list[AsyncIterator[RequestOutput]],
    envelope: dict,
    choices: Callable[[int, int], CompletionChoice | ChatChoice],
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """SSE chunks: `envelope` around the chunks of choices(stream index, completion index) for each new piece of
    each completion, then the usage chunk if asked, then [DONE]. An engine failure or a shutdown ends the stream
    in-band with an error event, as vLLM does."""
    made: dict[tuple[int, int], CompletionChoice | ChatChoice] = {}
    last: dict[int, RequestOutput] = {}
    try:
        async for i, out in merged(streams):
            last[i] = out
            for j, c in enumerate(out.outputs):
                key = (i, j)
                if key not in made:
                    made[key] = choices(i, j)
                for choice in made[key].chunks(c):
                    chunk = {**envelope, "choices": [choice]}
                    if continuous_usage:
                        chunk["usage"] = usage(list(last.values()))
                    yield sse(chunk)
    except EngineStopped as e:
        yield sse(error_body(503, str(e)))
    except RuntimeError as e:
        yield sse(error_body(500, str(e)))
    if include_usage and last:
        yield sse({**envelope, "choices": [], "usage": usage(list(last.values()))})
    yield "data: [DONE]\n\n"


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")
