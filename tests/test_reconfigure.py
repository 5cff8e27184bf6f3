"""Switching topology mid-generation gives the tokens and logprobs of an unswitched run (float64, 1e-9), with
requests mid-prefill, preempted, uneven TP and KV-head replication; the executor moves exactly the planned
bytes; capacity loss preempts and loses nothing; bad targets are refused; a failure mid-switch is an error."""

import os
import signal

import pytest

from remp import LLMEngine, SamplingParams
from remp.engine import EngineDeadError
from remp.executor import WorkerError
from tests.engine_utils import assert_same_logprobs, assert_same_tokens, run_with_switches

PROMPTS = [[256] + [(i * 37 + k * 11) % 256 for k in range(n)] for i, n in enumerate([5, 40, 17, 70, 3, 52, 33])]
ENGINE = dict(
    dtype="float64",
    block_size=8,
    max_model_len=128,
    max_num_batched_tokens=40,
    worker_timeout_s=60,
    switch_precopy_duty=1.0,  # unthrottled: switches finish within a few steps of these short runs
)


def params(i):
    if i % 3 == 2:
        return SamplingParams(max_tokens=36, temperature=0.9, top_p=0.95, seed=5 + i, ignore_eos=True, logprobs=2)
    return SamplingParams(max_tokens=44, temperature=0, ignore_eos=True, logprobs=2)


def run(path, switches, tp=4, pp=1, mode="live", **kw):
    engine = LLMEngine(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **{**ENGINE, **kw})
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    outs, reports = run_with_switches(engine, switches, mode)
    return outs, reports, engine.scheduler.num_preemptions


def assert_same(ref, out):
    assert ref.keys() == out.keys()
    for k in ref:
        assert_same_tokens(ref[k].token_ids, out[k].token_ids, k)
        assert_same_logprobs(ref[k].logprobs, out[k].logprobs, 1e-9, k)


SEQUENCE = {2: (2, 2), 4: (1, 4), 7: (4, 1), 9: (2, 2, [1, 3]), 12: (1, 4), 15: (4, 1)}


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mixtral"])
def test_switch_sequence_matches_unswitched(model, request):
    path = request.getfixturevalue(model)
    ref, *_ = run(path, {}, num_kv_blocks=64)
    out, reports, _ = run(path, SEQUENCE, num_kv_blocks=64)
    assert_same(ref, out)
    assert [r.new_topology.split("[")[0] for r in reports] == [
        "TP2xPP2",
        "TP1xPP4",
        "TP4xPP1",
        "TP2xPP2",
        "TP1xPP4",
        "TP4xPP1",
    ]
    for r in reports:
        assert r.executor_bytes_received == sum(r.bytes_moved.values()) + r.kv_bytes_stale
        assert sum(r.bytes_moved.values()) == sum(r.min_bytes.values())
        assert r.peak_extra_bytes > 0 and not r.preempted
    # live switches run steps of their own: the last ones may find every request done
    assert sum(r.kv_blocks_moved > 0 for r in reports) >= 3


def test_switch_with_preempted_requests_in_a_tight_pool(tiny_llama):
    ref, _, ref_preemptions = run(tiny_llama, {}, num_kv_blocks=20)
    out, reports, preemptions = run(tiny_llama, {3: (2, 2), 8: (1, 4), 14: (4, 1)}, num_kv_blocks=20)
    assert_same(ref, out)
    assert ref_preemptions > 0 and preemptions > 0  # the scheduler preempted (recompute) around the switches
    assert len(reports) == 3 and not any(r.preempted for r in reports)  # same pool size: the switch needs none


def test_capacity_loss_preempts_and_loses_nothing(tiny_llama):
    """TP4 replicates each KV head twice: under the same memory budget it has half PP4's blocks."""
    per_block_tp4 = 4 * (4 * 1 * 2 * 8 * 16 * 8)  # workers x (layers x kv heads x k/v x block x head_dim x 8 B)
    budget = dict(kv_cache_memory_gb=24 * per_block_tp4 / 2**30)  # 24 blocks at TP4, 48 at PP4
    ref, *_ = run(tiny_llama, {}, tp=1, pp=4, **budget)
    out, reports, _ = run(tiny_llama, {8: (4, 1)}, tp=1, pp=4, **budget)
    assert_same(ref, out)
    assert reports[0].num_kv_blocks == 24 and reports[0].preempted


def test_restart_baseline_gives_the_same_tokens(tiny_llama):
    ref, *_ = run(tiny_llama, {}, num_kv_blocks=64)
    out, reports, _ = run(tiny_llama, {3: (2, 2), 9: (1, 4)}, num_kv_blocks=64, mode="restart")
    assert_same(ref, out)
    assert all(r.mode == "restart" and r.recomputed_tokens > 0 for r in reports)


def test_invalid_target_refused_and_old_topology_keeps_serving(tiny_llama):
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    try:
        engine.add_request("a", {"prompt_token_ids": PROMPTS[1]}, params(0))
        engine.step()
        for bad, match in [
            ((4, 2), "needs dp\\*tp\\*pp = 8 workers, but the pool has at most 4"),
            ((1, 5), "pool has at most 4"),
            ((2, 2, [3, 3]), "summing to 4"),
            ((2, 2, [0, 4]), "positive"),
        ]:
            with pytest.raises(ValueError, match=match):
                engine.reconfigure(*bad)
            assert str(engine.topology) == "TP2xPP2"
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()


def test_worker_death_during_switch_is_a_clear_error(tiny_llama):
    """With recovery off (test_recovery.py has it on)."""
    kw = {**ENGINE, "worker_timeout_s": 10, "worker_recovery": False}
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=4, **kw)
    pids = [p.pid for p in engine.executor.procs]
    try:
        engine.add_request("a", {"prompt_token_ids": PROMPTS[1]}, params(0))
        engine.step()
        os.kill(pids[2], signal.SIGKILL)
        with pytest.raises(WorkerError, match="worker 2"):
            engine.reconfigure(1, 4)
        with pytest.raises(EngineDeadError):
            engine.step()
    finally:
        engine.shutdown()
