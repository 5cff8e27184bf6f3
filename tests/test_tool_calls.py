"""Hermes-format tool calls (pure): parsed whole and while streaming, alike however the text is cut; a tool history
written for a template without tools."""

import json

import pytest

from remp.entrypoints.tool_calls import ToolCallStream, hermes_messages, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXTS = [
    "no call at all",
    CALL,
    f"Let me look.\n{CALL}",
    f"{CALL}\n{CALL.replace('Paris', 'Oslo')}",
    "<tool_call>not json</tool_call> and more",
    "an unclosed <tool_call>{",
    "a < sign and <tool_ca",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_streamed_calls_equal_the_whole_parse(text, cut):
    content, calls = parse_tool_calls(text)
    stream, got, streamed = ToolCallStream(), "", []
    for i in range(0, len(text), cut):
        delta, done = stream.feed(text[i : i + cut])
        got += delta
        streamed += done
    got += stream.finish()
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    assert got.strip() == (content or "").strip()


def test_calls_and_content_are_split():
    content, calls = parse_tool_calls(f"Let me look.\n{CALL}")
    assert content == "Let me look." and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert parse_tool_calls(CALL)[0] is None  # only a call: no content
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_a_tool_history_for_a_template_without_tools():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    ]
    out = hermes_messages(messages, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"get_weather"' in out[0]["content"]
    assert parse_tool_calls(out[2]["content"])[1][0].arguments == '{"city": "Paris"}'
    assert out[3]["content"] == "<tool_response>\n18 C\n</tool_response>"
