"""The OpenAI surface through the official openai client (tiny float64 model): structured output that validates
against its schema, tool calls (forced, then the round trip with the tool's answer), streamed and not, n > 1,
echo and prompt logprobs, /tokenize, /detokenize, /version, and the README's table of request fields: every
field is honoured (declared) or refused by name, none ignored."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema_rs
import openai
import pytest

from remp.tools.random_model import write_random_llama
from tests.server_utils import get, post, remp_server

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,  # else a random model may write extra keys until max_tokens
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A byte-level tokenizer spells the tools' prompt in a token a character: a context of 2048."""
    model = write_random_llama(tmp_path_factory.mktemp("llama_2k"), seed=1, max_position_embeddings=2048)
    args = [str(model), "--dtype", "float64", "--served-model-name", "tiny"]
    with remp_server(*args) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_outputs_validate(client):
    """20 prompts at once (one batch), each output valid JSON that validates against the schema."""
    validator = jsonschema_rs.validator_for(SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}

    def ask(seed: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"trip {seed}"}], response_format=fmt,
            max_tokens=200, temperature=1.0, seed=seed,
        )  # fmt: skip

    with ThreadPoolExecutor(20) as pool:
        for r in pool.map(ask, range(20)):
            assert r.choices[0].finish_reason == "stop"
            validator.validate(json.loads(r.choices[0].message.content))


def test_a_tool_call_round_trip_streamed_and_not(client):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(
        model="tiny", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=600
    )
    (call,) = r.choices[0].message.tool_calls[:1]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8)
    assert answer.choices[0].message.content is not None
    # streamed: the named tool's arguments arrive as deltas of one call
    chunks = client.chat.completions.create(
        model="tiny", messages=ask, tools=[WEATHER], stream=True, max_tokens=600,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    name, args = None, ""
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            name = d.function.name or name
            args += d.function.arguments or ""
    assert name == "get_weather" and json.loads(args)["city"] in ("Paris", "Oslo")
    streamed = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], stream=True, max_tokens=8
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


def test_n_choices_echo_and_prompt_logprobs(client, server):
    r = client.completions.create(model="tiny", prompt="abc", n=3, max_tokens=5, temperature=1.0, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 15
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=4, stream=True, temperature=1.0
    )
    assert {c.choices[0].index for c in chat if c.choices} == {0, 1}
    e = client.completions.create(model="tiny", prompt="hello", echo=True, max_tokens=3, logprobs=1, temperature=0)
    assert e.choices[0].text.startswith("hello") and e.choices[0].logprobs.token_logprobs[0] is None
    code, body = post(server, "/v1/completions", {"prompt": "hello there", "max_tokens": 1, "prompt_logprobs": 1})
    lps = body["choices"][0]["prompt_logprobs"]
    assert code == 200 and lps[0] is None and all(len(step) >= 1 for step in lps[1:])


def test_tokenize_detokenize_version(server):
    code, t = post(server, "/tokenize", {"prompt": "hello world"})
    assert code == 200 and t["count"] == len(t["tokens"]) > 0
    code, d = post(server, "/detokenize", {"tokens": t["tokens"]})
    assert code == 200 and "hello world" in d["prompt"]
    code, c = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True})
    assert code == 200 and len(c["token_strs"]) == c["count"]
    assert post(server, "/detokenize", {"tokens": [10**9]})[0] == 400
    code, v = get(server, "/version")
    assert code == 200 and json.loads(v)["version"]


def field_table() -> list[tuple[str, str, str]]:
    """(field, endpoint, honoured | refused) rows of the README's table."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("<!-- request fields -->")[1].split("<!-- /request fields -->")[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z, ]+) \| (honoured|refused) \|", table, re.M)
    return [(f, e.strip(), s) for f, endpoints, s in rows for e in endpoints.split(",")]


ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
BASE = {
    "chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "completions": {"prompt": "hi", "max_tokens": 2},
}


def test_the_readme_field_table_is_true(server):
    """Every refused field is refused by name; every honoured one is declared by the request model (a wrong type
    is a 400 naming the field as a type error, not as an unknown field)."""
    from remp.entrypoints.protocol import ChatCompletionRequest, CompletionRequest

    rows = field_table()
    assert len(rows) > 60, "the table lists the OpenAI and vLLM fields"
    models = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
    for field, endpoint, status in rows:
        declared = field in models[endpoint].model_fields
        assert declared == (status == "honoured"), (field, endpoint, status)
        if status == "refused":
            code, err = post(server, ROUTES[endpoint], {**BASE[endpoint], field: None})
            assert code == 400 and f"`{field}`" in err["error"]["message"], (field, err)
