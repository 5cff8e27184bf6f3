"""Live switches (float64, tiny models): the weights move while the engine steps, and the tokens and logprobs
are those of a run without switches, with requests arriving, aborted and preempted during the pre-copy; a
switch called off (timeout) or refused leaves the old topology serving; a worker killed during the pre-copy
is the usual clear engine failure; bytes moved equal the planner's minimum; a small staging budget falls back
to stop-the-world."""

import os
import signal
import time

import pytest

from remp import LLMEngine, SamplingParams
from remp.engine import EngineDeadError
from remp.executor import WorkerError
from remp.switch.on_driver import SwitchAborted, SwitchInProgress
from tests.engine_utils import run_with_switches
from tests.test_reconfigure import ENGINE, PROMPTS, assert_same, params
from tests.test_worker_failures import wait_dead

LATE = [[256] + [(7 * i + 3) % 256 for i in range(n)] for n in (9, 30)]  # arrive during the pre-copy
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True, logprobs=2)  # still running at the cut-over


def scripted_run(path, switch_at: int | None, target=(1, 4), duty=1.0, **kw):
    """Requests from the start, two more arriving and one aborted a few steps later; a live switch started
    (not awaited) at step `switch_at`, throttled to `duty` so that it spans those steps (and paced to end
    within a second). Returns the outputs
    and whether the arrivals and the abort happened while the switch was in pre-copy."""
    kw = {**ENGINE, "max_model_len": 512, "num_kv_blocks": 256, **kw}
    engine = LLMEngine(model=str(path), tensor_parallel_size=2, pipeline_parallel_size=2, **kw)
    engine.switcher.precopy_duty = duty
    engine.switcher.max_precopy_s = 1.0  # the goal ends a slow pre-copy while the long requests still run
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    outs, reports, during, done = {}, [], [], set()
    try:
        while engine.has_unfinished_requests() or engine.switching:
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
            n = engine.num_steps
            if switch_at is not None and n >= switch_at and "switch" not in done:
                engine.start_reconfigure(*target, on_done=lambda r, e: reports.append((r, e)))
                done.add("switch")
            for k in (4, 5):  # arrivals (the longer one likely mid-prefill at the cut-over)
                if n >= k and k not in done:
                    engine.add_request(f"late{k}", {"prompt_token_ids": LATE[k - 4]}, LONG)
                    during.append(engine.switching is not None)
            if n >= 6 and "abort" not in done:
                engine.abort_request("3")
                during.append(engine.switching is not None)
            done |= {k for k, step in ((4, 4), (5, 5), ("abort", 6)) if n >= step}
            if not engine.has_unfinished_requests() and engine.switching:
                engine.advance_switch(wait_s=0.05)
    finally:
        engine.shutdown()
    outs.pop("3", None)  # aborted: how far it got depends on timing, in any run
    return outs, reports, during


@pytest.mark.parametrize("model, target", [("tiny_llama", (1, 4)), ("tiny_qwen2", (4, 1))])
def test_live_switch_with_arrivals_and_aborts_during_precopy(model, target, request):
    path = request.getfixturevalue(model)
    ref, _, _ = scripted_run(path, None)
    out, reports, during = scripted_run(path, 3, target, duty=0.05)
    assert_same(ref, out)
    ((report, error),) = reports
    assert error is None and report.mode == "live" and report.new_topology.startswith(f"TP{target[0]}xPP{target[1]}")
    assert all(during), "the arrivals and the abort should fall inside the pre-copy"
    assert report.precopy_s > 0 and report.bytes_moved_in_pause["weights"] == 0
    assert 0 < report.bytes_moved_in_pause["kv"] < report.bytes_moved["kv"]  # most KV moved before the pause
    assert sum(report.bytes_moved.values()) == sum(report.min_bytes.values())
    assert report.executor_bytes_received == sum(report.bytes_moved.values()) + report.kv_bytes_stale
    assert report.tokens_per_s_during is not None and report.longest_step_gap_s > 0


def test_live_switch_under_kv_pressure_preempts_and_loses_nothing(tiny_llama):
    """TP2xPP2 -> TP4 halves the KV blocks a memory budget buys (TP4 replicates KV heads): the cut-over
    preempts the youngest requests, which recompute; nothing is lost, tokens are unchanged."""
    per_block_tp4 = 4 * (4 * 1 * 2 * 8 * 16 * 8)
    budget = dict(kv_cache_memory_gb=24 * per_block_tp4 / 2**30)
    engine_ref = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE, **budget)
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE, **budget)
    for e in (engine_ref, engine):
        for i, p in enumerate(PROMPTS):
            e.add_request(str(i), {"prompt_token_ids": p}, params(i))
    ref, _ = run_with_switches(engine_ref, {})
    out, reports = run_with_switches(engine, {8: (4, 1)})
    assert_same(ref, out)
    assert reports[0].mode == "live" and reports[0].num_kv_blocks == 24 and reports[0].preempted


def test_stop_mode_and_staging_fallback_give_the_same_tokens(tiny_llama):
    def run(mode, **kw):
        engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=4, **{**ENGINE, **kw})
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
        return run_with_switches(engine, {3: (2, 2), 9: (1, 4)}, mode)

    ref, _ = run("live", num_kv_blocks=64)
    stop, stop_reports = run("stop", num_kv_blocks=64)
    fallback, fallback_reports = run("live", num_kv_blocks=64, switch_staging_gb=0)
    assert_same(ref, stop)
    assert_same(ref, fallback)
    for r in stop_reports + fallback_reports:
        assert r.mode == "stop" and r.precopy_s == 0
        assert r.bytes_moved_in_pause == r.bytes_moved and r.executor_bytes_received == sum(r.bytes_moved.values())
    assert all(r.fallback is None for r in stop_reports)
    assert all("switch_staging_gb" in r.fallback for r in fallback_reports)


def test_timed_out_precopy_is_called_off_and_the_old_topology_serves(tiny_llama):
    slow = {**ENGINE, "switch_timeout_s": 0.3, "switch_precopy_duty": 0.001}
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **slow)
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
        engine.step()
        with pytest.raises(SwitchAborted, match="within 0.3 s"):
            engine.reconfigure(1, 4)
        assert str(engine.topology).startswith("TP2xPP2") and engine.switching is None
        with pytest.raises(SwitchInProgress):  # one at a time
            engine.start_reconfigure(4, 1)
            engine.start_reconfigure(1, 4)
        while engine.switching:
            engine.advance_switch(wait_s=0.05)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    finally:
        engine.shutdown()
    ref = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    for i, p in enumerate(PROMPTS):
        ref.add_request(str(i), {"prompt_token_ids": p}, params(i))
    assert_same(run_with_switches(ref, {})[0], outs)


def test_worker_killed_during_precopy_is_a_clear_engine_failure(tiny_llama):
    """With recovery off (test_recovery.py has it on)."""
    slow = {**ENGINE, "worker_timeout_s": 10, "switch_precopy_duty": 0.001, "worker_recovery": False}
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=4, **slow)
    pids = [p.pid for p in engine.executor.procs]
    try:
        engine.add_request("a", {"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=100, ignore_eos=True))
        engine.step()
        engine.start_reconfigure(2, 2)
        engine.step()
        os.kill(pids[3], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="worker 3"):
            for _ in range(1000):
                engine.step()
        assert time.monotonic() - t0 < 30
        with pytest.raises(EngineDeadError):
            engine.step()
    finally:
        engine.shutdown()
    assert not wait_dead(pids)
