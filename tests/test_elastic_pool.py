"""The pool grows and shrinks with the topology (float64, tiny model): tokens and logprobs equal a run at a
fixed topology, in live and stop modes; workers that leave exit, and no shared memory is left behind."""

import os

import pytest

from remp import LLMEngine
from tests.engine_utils import run_with_switches
from tests.test_reconfigure import ENGINE, PROMPTS, assert_same, params


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def run(path, switches, mode="live", **kw):
    engine = LLMEngine(model=str(path), **{**ENGINE, "num_kv_blocks": 64, **kw})
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    seen = list(getattr(engine.executor, "procs", []))  # every worker process the run ever had
    if seen:
        spawn = engine.executor._spawn
        engine.executor._spawn = lambda *a: (spawn(*a), seen.append(engine.executor.procs[-1]))
    outs, reports = run_with_switches(engine, switches, mode)
    return outs, reports, seen


@pytest.mark.parametrize("mode", ["live", "stop"])
def test_grow_and_shrink_match_a_fixed_topology(tiny_llama, mode):
    before = shm_segments()
    ref, *_ = run(tiny_llama, {})
    out, reports, procs = run(
        tiny_llama, {2: (2, 1), 5: (2, 2), 8: (1, 1)}, mode, max_workers=4, distributed_executor_backend="mp"
    )
    assert_same(ref, out)
    assert [(r.new_topology, r.pool_size, r.mode) for r in reports] == [
        ("TP2xPP1", 2, mode),
        ("TP2xPP2", 4, mode),
        ("TP1xPP1", 1, mode),
    ]
    for r in reports:
        assert sum(r.bytes_moved.values()) == sum(r.min_bytes.values())
    assert len(procs) == 4 and not any(p.is_alive() for p in procs)
    assert shm_segments() <= before


def test_grow_from_one_worker_and_back(tiny_llama):
    """TP1 -> TP4 -> TP1xPP2 -> TP1 (issue 12's sequence): the pool follows, the tokens do not change."""
    ref, *_ = run(tiny_llama, {})
    out, reports, procs = run(tiny_llama, {1: (4, 1), 4: (1, 2), 7: (1, 1)}, max_workers=4)
    assert_same(ref, out)
    assert [r.pool_size for r in reports] == [4, 2, 1]
    assert not any(p.is_alive() for p in procs)


def test_pool_limits(tiny_llama):
    engine = LLMEngine(model=str(tiny_llama), **{**ENGINE, "num_kv_blocks": 64}, max_workers=2)
    try:
        with pytest.raises(ValueError, match="pool has at most 2"):
            engine.reconfigure(2, 2)
        assert engine.topology.size == 1 and engine.executor.pool_size == 1
    finally:
        engine.shutdown()
    one = LLMEngine(model=str(tiny_llama), **{**ENGINE, "num_kv_blocks": 64})
    try:
        with pytest.raises(ValueError, match="max_workers \\(--max-workers\\) of at least 2"):
            one.reconfigure(2, 1)
    finally:
        one.shutdown()
    with pytest.raises(ValueError, match="max_workers must be an integer of at least dp\\*tp\\*pp = 4"):
        LLMEngine(model=str(tiny_llama), tensor_parallel_size=4, max_workers=2)
