"""Continuous batching, chunked prefill and preemption change nothing about the tokens (float64 tiny model)."""

import pytest

from remp import LLM, LLMEngine, SamplingParams
from remp.scheduler import BlockPool
from tests.engine_utils import assert_same_tokens

PROMPTS = [[256] + [(i * 37 + k * 11) % 256 for k in range(n)] for i, n in enumerate([5, 40, 17, 90, 3, 64, 33])]


def run(path, **kwargs):
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=0),
    ]
    with LLM(str(path), dtype="float64", **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params[i % 2] for i in range(len(PROMPTS))])
        preemptions = llm.llm_engine.scheduler.num_preemptions
    return [
        (o.outputs[0].token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outs
    ], preemptions


def assert_same(a, b):
    for i, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(a, b, strict=True)):
        assert_same_tokens(ids_a, ids_b, f"request {i}")
        assert lp_a == pytest.approx(lp_b, abs=1e-9)  # approx of lists compares their lengths too


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return run(tiny_llama)[0]


def test_each_request_alone_equals_batch(tiny_llama, reference):
    for i, prompt in enumerate(PROMPTS[:3]):
        with LLM(str(tiny_llama), dtype="float64") as llm:
            p = SamplingParams(
                max_tokens=24 if i % 2 == 0 else 30,
                temperature=0 if i % 2 == 0 else 0.8,
                top_p=1.0 if i % 2 == 0 else 0.9,
                seed=None if i % 2 == 0 else 7,
                ignore_eos=True,
                logprobs=0,
            )
            out = llm.generate({"prompt_token_ids": prompt}, p)[0]
        assert out.outputs[0].token_ids == reference[i][0]


def test_chunked_prefill_equals_unchunked(tiny_llama, reference):
    out, _ = run(tiny_llama, max_num_batched_tokens=16)
    assert_same(out, reference)


def test_preemption_under_tiny_pool(tiny_llama, reference):
    # 16 blocks of 8 tokens: not even two of the long requests fit at once
    out, preemptions = run(tiny_llama, num_kv_blocks=16, block_size=8, max_model_len=128)
    assert preemptions > 0
    assert_same(out, reference)


def test_max_num_seqs_limits_running(tiny_llama):
    engine = LLMEngine(model=str(tiny_llama), dtype="float64", max_num_seqs=2)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=4, ignore_eos=True))
    finished = set()
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert len(engine.scheduler.running) <= 2
        finished |= {o.request_id for o in outs if o.finished}
    assert finished == {str(i) for i in range(len(PROMPTS))}
    assert engine.scheduler.pool.num_free == engine.num_kv_blocks


def test_block_pool():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.allocate(2) is None and pool.num_free == 1
    pool.release(a)
    assert pool.num_free == 4 and pool.usage == 0
