"""Engine outputs as OpenAI response bodies: choices, logprobs, usage, and the server-sent events of a stream.
Pure formatting, apart from the stream, which iterates the engine's outputs and ends with an error event if
the engine stops."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from remp.entrypoints.async_engine import EngineStopped
from remp.entrypoints.errors import error_body
from remp.outputs import CompletionOutput, RequestOutput

# choice(output so far, new text, index of its first token, index of its first character) -> one chunk's choice
ChunkChoice = Callable[[CompletionOutput, str, int, int], dict]


def envelope(rid: str, object_: str, created: int, model: str) -> dict:
    return {"id": rid, "object": object_, "created": created, "model": model}


def usage(out: RequestOutput) -> dict:
    n = len(out.outputs[0].token_ids)
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": n,
        "total_tokens": len(out.prompt_token_ids) + n,
    }


def total_usage(outs: list[RequestOutput]) -> dict:
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for out in outs:
        for k, v in usage(out).items():
            total[k] += v
    return total


# ---- /v1/completions ----------------------------------------------------------------------------------------
def completion_logprobs(c: CompletionOutput, start: int, text_offset: int) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for tid, step in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = step[tid]
        tokens.append(chosen.decoded_token)
        lps.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in step.values()})
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(index: int, c: CompletionOutput, text: str, tok0: int = 0, text0: int = 0) -> dict:
    """The choice for `text`, which starts at token `tok0` and character `text0` of the output."""
    return {
        "index": index,
        "text": text,
        "logprobs": completion_logprobs(c, tok0, text0),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def completion_chunk_choice(c: CompletionOutput, delta: str, tok0: int, text0: int) -> dict:
    return completion_choice(0, c, delta, tok0, text0)


def completion_body(rid: str, created: int, model: str, outs: list[RequestOutput]) -> dict:
    choices = [completion_choice(i, out.outputs[0], out.outputs[0].text) for i, out in enumerate(outs)]
    return {**envelope(rid, "text_completion", created, model), "choices": choices, "usage": total_usage(outs)}


# ---- /v1/chat/completions -----------------------------------------------------------------------------------
def chat_logprobs(c: CompletionOutput, start: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tid, step in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = step[tid]
        top = sorted(step.values(), key=lambda lp: lp.rank or 0)
        content.append(
            {
                "token": chosen.decoded_token,
                "logprob": chosen.logprob,
                "bytes": list((chosen.decoded_token or "").encode()),
                "top_logprobs": [
                    {
                        "token": lp.decoded_token,
                        "logprob": lp.logprob,
                        "bytes": list((lp.decoded_token or "").encode()),
                    }
                    for lp in top
                ],
            }
        )
    return {"content": content}


def chat_chunk_choices() -> ChunkChoice:
    """The choice of each chunk of one chat stream; the first names the role, as OpenAI's first chunk does."""
    first = True

    def choice(c: CompletionOutput, delta: str, tok0: int, _text0: int) -> dict:
        nonlocal first
        d = {"role": "assistant", "content": delta} if first else {"content": delta}
        first = False
        return {
            "index": 0,
            "delta": d,
            "logprobs": chat_logprobs(c, tok0),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    return choice


def chat_body(rid: str, created: int, model: str, out: RequestOutput) -> dict:
    c = out.outputs[0]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": chat_logprobs(c, 0),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }
    return {**envelope(rid, "chat.completion", created, model), "choices": [choice], "usage": usage(out)}


# ---- streams ------------------------------------------------------------------------------------------------
def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_events(
    outputs: AsyncIterator[RequestOutput], envelope: dict, choice: ChunkChoice, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks: `envelope` (id, object, created, model) around choice(output, delta, first token index,
    first text index) for each new piece of text, then the usage chunk if asked, then [DONE]. An engine
    failure or a shutdown ends the stream in-band with an error event, as vLLM does."""
    sent_text, sent_tokens, last = 0, 0, None
    try:
        async for out in outputs:
            last, c = out, out.outputs[0]
            delta = c.text[sent_text:]
            if delta or c.finish_reason is not None:
                yield sse({**envelope, "choices": [choice(c, delta, sent_tokens, sent_text)]})
                sent_text, sent_tokens = len(c.text), len(c.token_ids)
    except EngineStopped as e:
        yield sse(error_body(503, str(e)))
    except RuntimeError as e:
        yield sse(error_body(500, str(e)))
    if include_usage and last is not None:
        yield sse({**envelope, "choices": [], "usage": usage(last)})
    yield "data: [DONE]\n\n"


def streaming_response(
    outputs: AsyncIterator[RequestOutput], envelope: dict, choice: ChunkChoice, include_usage: bool
) -> StreamingResponse:
    return StreamingResponse(stream_events(outputs, envelope, choice, include_usage), media_type="text/event-stream")
