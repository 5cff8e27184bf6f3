"""The bundled SmolLM2 in float32, switched TP4 -> TP2xPP2 -> PP4 -> TP4 mid-generation (TP4 splits 9 heads /
3 KV heads unevenly, with a replicated KV head), gives the text of an unswitched TP4 run (or differs only after a
near-tie: top-2 logprobs within 0.01 at the first differing token). A long extra (`make test-all`): the float64
switch tests on tiny models prove switches exact in `make test`."""

import pytest

from remp import LLMEngine, SamplingParams
from tests.engine_utils import assert_same_or_near_tie, run_with_switches

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def quicksort(xs):"]


def run(switches):
    engine = LLMEngine(
        dtype="float32", tensor_parallel_size=4, max_model_len=256, kv_cache_memory_gb=0.2, switch_precopy_duty=1.0
    )
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2))
    return run_with_switches(engine, switches)[0]


@pytest.mark.slow
def test_default_model_switches_keep_the_text():
    ref = run({})
    out = run({3: (2, 2), 8: (1, 4), 14: (4, 1)})
    assert ref.keys() == out.keys()
    for k in ref:
        assert_same_or_near_tie(ref[k], out[k])
