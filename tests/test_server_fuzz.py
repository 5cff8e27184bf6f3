"""Schemathesis against the server's own OpenAPI schema, in process (ASGI), on a tiny float64 model: whatever a
generated request holds, the answer is never a 5xx, and errors are OpenAI-shaped. Bounded to about a minute."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from remp.engine_args import EngineArgs
from remp.entrypoints.async_engine import AsyncLLMEngine
from remp.entrypoints.server import build_app

ADMIN = "adm"


@pytest.fixture(scope="module")
def api_schema(tiny_llama):
    # max_model_len 48 keeps every generated request short; a small body limit is part of what is fuzzed
    engine = AsyncLLMEngine(EngineArgs(model=str(tiny_llama), dtype="float64", max_model_len=48))
    app = build_app(engine, "tiny", admin_token=ADMIN, max_request_bytes=64 * 1024)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.shutdown()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_5xx_and_openai_errors(api_schema, mode):
    """POSITIVE: bodies the schema allows (they must be served or refused with a 4xx); NEGATIVE: bodies that
    break it (wrong types, missing fields), which must all be 4xx."""

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data):
        case = data.draw(api_schema.as_strategy(mode))
        response = case.call(headers={"authorization": f"Bearer {ADMIN}"})
        assert response.status_code < 500, (case.path, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code

    check()
