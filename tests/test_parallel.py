"""Every TP x PP topology with tp*pp <= 4 gives the single-worker engine's tokens and logprobs (float64, 1e-9),
with chunked prefill, several micro-batches in flight and preemption under a small KV pool, for every family
(Qwen3's q/k norm; Mixtral's 3 experts split 2+1 on TP2, 1+1+1 on TP3, none on TP4's last rank)."""

import pytest

from remp import LLM, SamplingParams
from tests.engine_utils import assert_same_logprobs, assert_same_tokens

TOPOLOGIES = [(2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2)]
PROMPTS = [[256] + [(i * 37 + k * 11) % 256 for k in range(n)] for i, n in enumerate([5, 40, 17, 70, 3, 52, 33])]
ENGINE = dict(
    dtype="float64", num_kv_blocks=24, block_size=8, max_model_len=128, max_num_batched_tokens=48, worker_timeout_s=60
)


def run(path, tp, pp, **kw):
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=11, ignore_eos=True, logprobs=3),
    ]
    with LLM(str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE, **kw) as llm:
        assert str(llm.llm_engine.topology) == f"TP{tp}xPP{pp}"
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params[i % 2] for i in range(len(PROMPTS))])
        preempted = llm.llm_engine.scheduler.num_preemptions
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], preempted


def assert_equal(ref, out):
    for i, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(ref, out, strict=True)):
        assert_same_tokens(ids_a, ids_b, f"request {i}")
        assert_same_logprobs(lp_a, lp_b, 1e-9, f"request {i}")


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2", "tiny_llama3_rope", "tiny_qwen3", "tiny_mixtral"])
def model_and_reference(request):
    path = request.getfixturevalue(request.param)
    ref, preempted = run(path, 1, 1)
    assert preempted > 0, "the pool should be small enough to force preemption"
    return path, ref


@pytest.mark.parametrize("tp, pp", TOPOLOGIES, ids=[f"tp{t}pp{p}" for t, p in TOPOLOGIES])
def test_topology_matches_single_worker(model_and_reference, tp, pp):
    path, ref = model_and_reference
    out, _ = run(path, tp, pp)
    assert_equal(ref, out)


def test_single_worker_process_matches_in_process(model_and_reference):
    """`remp serve` runs even one worker in its own process ("mp"): same tokens as in-process."""
    path, ref = model_and_reference
    out, _ = run(path, 1, 1, distributed_executor_backend="mp")
    assert_equal(ref, out)
