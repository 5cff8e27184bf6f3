"""Tool calls in the Hermes format (SmolLM2, Qwen2/2.5, Hermes models): the tool list the model is shown, how a
conversation's tool calls and results are written for a template that has no notion of them, and the calls
parsed back out of what the model writes, whole or while it streams:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def tools_prompt(tools: list[dict]) -> str:
    """The system text that shows the model its tools (the Hermes / Qwen2.5 wording)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """A conversation with tools, as plain chat turns for a template that knows no tools: the tool list in the
    system turn, an assistant's tool calls as <tool_call> blocks in its text, each tool result as a user turn
    in <tool_response> tags."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)}, ensure_ascii=False)}\n{CLOSE}"
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        preamble = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _arguments(call: dict) -> object:
    """A call's arguments as the model wrote them: a JSON object (OpenAI sends them as a JSON string)."""
    args = call["function"].get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_call(text: str) -> ToolCall | None:
    """One {"name": ..., "arguments": ...} object, or None if `text` is not one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The text outside <tool_call> blocks (None if only calls) and the calls; a block that does not parse stays
    in the text, as the model wrote it."""
    content, calls, rest = [], [], text
    while (start := rest.find(OPEN)) >= 0:
        end = rest.find(CLOSE, start)
        if end < 0:
            break
        call = parse_call(rest[start + len(OPEN) : end].strip())
        content.append(rest[:start] if call is not None else rest[: end + len(CLOSE)])
        if call is not None:
            calls.append(call)
        rest = rest[end + len(CLOSE) :]
    content.append(rest)
    text_out = "".join(content).strip()
    return (text_out or None) if calls else text, calls


class ToolCallStream:
    """Splits a stream of text into content deltas and whole tool calls: text is passed on until a <tool_call>
    tag may be starting (held back while it could still be one), a call is given once its closing tag arrives."""

    def __init__(self):
        self.pending, self.in_call, self.calls = "", False, []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The content to send now, and the calls completed by this delta."""
        self.pending += delta
        content, done = "", []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return content, done
                body, self.pending = self.pending[:end], self.pending[end + len(CLOSE) :]
                call = parse_call(body.strip())
                if call is None:
                    content += OPEN + body + CLOSE  # not a call after all: the model's text
                else:
                    done.append(call)
                    self.calls.append(call)
                self.in_call = False
                continue
            start = self.pending.find(OPEN)
            if start >= 0:
                content += self.pending[:start]
                self.pending, self.in_call = self.pending[start + len(OPEN) :], True
                continue
            keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.pending.endswith(OPEN[:k])), 0)
            cut = len(self.pending) - keep
            content, self.pending = content + self.pending[:cut], self.pending[cut:]
            return content, done

    def finish(self) -> str:
        """What is left when the stream ends: an unclosed call or a partial tag is the model's text."""
        rest = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return rest
