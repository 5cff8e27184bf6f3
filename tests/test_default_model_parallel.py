"""The bundled SmolLM2 in float32 gives TP1's greedy text at TP=2 (uneven heads 6+3), TP=3, TP2xPP2 and PP=3,
or differs only after a near-tie (top-2 logprobs within 0.01 at the first differing token)."""

import pytest

from remp import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three reasons to learn Python:"]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


def generate(tp, pp):
    with LLM(dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=256,
             kv_cache_memory_gb=0.1) as llm:
        return [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def reference():
    return generate(1, 1)


@pytest.mark.parametrize("tp, pp", [(2, 1), (3, 1), (2, 2), (1, 3)])
def test_same_greedy_text_as_tp1(reference, tp, pp):
    for ref, out in zip(reference, generate(tp, pp)):
        if out.token_ids == ref.token_ids:
            continue
        i = next(k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)) if a != b)
        top2 = sorted((lp.logprob for lp in ref.logprobs[i].values()), reverse=True)[:2]
        assert top2[0] - top2[1] < 0.01, f"diverged at token {i} without a near-tie: {top2}"
